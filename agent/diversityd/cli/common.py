"""What every diversityctl command shares: exit codes, the --config-dir option, findings
printed, the one top-level handler that turns errors into exit codes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from diversityd.errors import ConfigError, DiversitydError, Finding

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
    from diversityd.parts import default_config_dir  # light: `status` must not load yaml

    return config_dir if config_dir is not None else default_config_dir()


def real_dir(config_dir: Path | None) -> str | None:
    return os.path.realpath(config_dir) if config_dir is not None else None


def print_findings(findings: Sequence[Finding], *, stream: Any = None) -> None:
    out = stream or sys.stderr
    for finding in findings:
        click.echo(finding.format(), file=out)


def load_report(config_dir: Path) -> Any:
    from diversityd.validation import check_config_dir

    return check_config_dir(config_dir, os.environ)


def run_click(command: click.Command, prog_name: str, argv: Sequence[str] | None = None) -> None:
    """Run a click command with diversityctl's exit codes: 0 ok, 2 bad configuration or
    usage, 1 anything else; tracebacks only with --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        command.main(args=args, prog_name=prog_name, standalone_mode=False)
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
    sys.exit(EXIT_OK)
