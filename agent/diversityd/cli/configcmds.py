"""Commands on the configuration alone (no daemon needed): validate, render."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from diversityd.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    config_dir_option,
    load_report,
    print_findings,
    resolve_config_dir,
)
from diversityd.errors import Severity, UsageError


@click.command()
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


@click.command()
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
    states = {name: "down" if name in down else "ready" for name in config.providers}
    plan = render_gateway(config, report.catalog, availability, states=states)
    click.echo(plan.text(), nl=False)
    for name in plan.left_out:
        click.echo(
            f"note: {name!r}: its provider is down and no fallback is live (the gateway "
            "answers it with a retryable 503 that says why)",
            err=True,
        )
