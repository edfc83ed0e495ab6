"""diversityctl: validate, render, plan, status, restart, reload, failover-test.

Exit codes: 0 ok, 2 bad configuration or usage, 1 anything else. Tracebacks only with --debug.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from diversityd.errors import ConfigError, DiversitydError, Finding, Severity, UsageError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def config_dir_option(function: F) -> F:
    return click.option(
        "--config-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="DIVERSITYD_CONFIG_DIR",
        default=None,
        help="Directory holding providers.yaml, model-mappings.yaml and diversityd.yaml "
        "[default: $XDG_CONFIG_HOME/diversityd].",
    )(function)


def resolve_config_dir(config_dir: Path | None) -> Path:
    from diversityd.config import default_config_dir

    return config_dir if config_dir is not None else default_config_dir()


def print_findings(findings: list[Finding], *, stream: Any = None) -> None:
    out = stream or sys.stderr
    for finding in findings:
        click.echo(finding.format(), file=out)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of unexpected errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Keep the local LLM servers and their LiteLLM gateway alive.

    diversityctl talks to the diversityd daemon over the user bus (status, restart,
    reload, failover-test) and works on the configuration alone (validate, render, plan).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def load_report(config_dir: Path) -> Any:
    from diversityd.config import load_config
    from diversityd.validation import validate

    try:
        config, parse_findings = load_config(config_dir)
    except ConfigError as exc:
        config, parse_findings = None, list(exc.findings)
    return validate(config, parse_findings, os.environ)


@cli.command()
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def validate(config_dir: Path | None, as_json: bool) -> None:
    """Check the configuration: types, fallback cycles, missing targets, failure domains.

    Exit 0 when it is sound (warnings allowed), 2 when it has errors.
    """
    report = load_report(resolve_config_dir(config_dir))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        print_findings(list(report.findings), stream=sys.stdout)
        errors, warnings, info = (len(report.of(s)) for s in Severity)
        verdict = "ok" if report.ok else "invalid"
        click.echo(f"{verdict}: {errors} errors, {warnings} warnings, {info} notes")
    sys.exit(EXIT_OK if report.ok else EXIT_USAGE)


@cli.command()
@config_dir_option
@click.option(
    "--down",
    "down",
    multiple=True,
    metavar="PROVIDER",
    help="Render as if this provider were down (repeatable); every other active one is up.",
)
def render(config_dir: Path | None, down: tuple[str, ...]) -> None:
    """Print the LiteLLM gateway config diversityd would write."""
    from diversityd.gateway import Availability, render_gateway

    report = load_report(resolve_config_dir(config_dir))
    if not report.ok:
        print_findings(report.of(Severity.ERROR))
        raise UsageError("the configuration is invalid; nothing rendered")
    config = report.config
    unknown = sorted(set(down) - set(config.providers))
    if unknown:
        raise UsageError(
            f"--down names unknown provider {', '.join(unknown)}",
            hint=f"use one of: {', '.join(config.providers)}",
        )
    availability = Availability.all_up_except(config, frozenset(down))
    plan = render_gateway(config, report.catalog, availability)
    click.echo(plan.text(), nl=False)
    for name in plan.left_out:
        click.echo(
            f"note: {name!r} left out: its provider is down and no fallback is live", err=True
        )


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(prog_name="diversityctl", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_FAILURE)
    except ConfigError as exc:
        print_findings(list(exc.findings))
        sys.exit(EXIT_USAGE)
    except DiversitydError as exc:
        if debug:
            raise
        click.echo(f"diversityctl: {exc}", err=True)
        if exc.hint:
            click.echo(f"    fix: {exc.hint}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        click.echo(f"diversityctl: unexpected error: {type(exc).__name__}: {exc}", err=True)
        click.echo("    (run with --debug for the traceback)", err=True)
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":
    main()
