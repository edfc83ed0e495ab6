"""Commands that talk to the daemon over the user bus: restart, reload, failover-test,
history, rollback. Long ones start a job in the daemon and follow it to its end."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from diversityd.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    config_dir_option,
    real_dir,
)
from diversityd.errors import Finding, Severity, UsageError
from diversityd.statusdoc import format_table


async def _connect_daemon(config_dir: str | None = None) -> Any:
    """The daemon on the user bus; with `config_dir` (a real path), also check that it is
    the daemon of that configuration."""
    from diversityd.adapters.control import ControlClient, DaemonUnavailableError

    client = await ControlClient.connect()
    if not await client.daemon_running():
        client.close()
        raise DaemonUnavailableError(
            "diversityd is not running", hint="systemctl --user start diversityd"
        )
    if config_dir is not None:
        daemon_dir = (await client.call("Status"))["daemon"]["config_dir"]
        if daemon_dir != config_dir:
            client.close()
            raise UsageError(
                f"the daemon on this bus reads {daemon_dir}, not {config_dir}",
                hint=f"edit the files in {daemon_dir}, or reinstall the daemon with "
                f"`diversityctl install --config-dir {config_dir}`",
            )
    return client


def show_progress(payload: dict[str, Any]) -> str | None:
    """A job's step as a line for stderr: what it does, and what it waits for."""
    step, provider = payload.get("step"), payload.get("provider", "")
    if step == "waiting":
        return f"{provider}: waiting for {payload.get('for')} ..."
    if step in ("restarting", "taking down", "restoring", "starting", "stopping"):
        return f"{step} {provider} ..."
    return None


def run_job(
    config_dir: str | None,
    member: str,
    args: tuple[str | bool, ...],
    show: Callable[[dict[str, Any]], str | None] | None,
    timeout_s: float,
) -> dict[str, Any]:
    """Start a daemon job and follow it to its end; `show(progress)` may return a line
    for stderr. Returns the job's result."""
    import asyncio

    async def run() -> dict[str, Any]:
        client = await _connect_daemon(config_dir)
        try:
            await client.subscribe_jobs()  # before the call: no signal is missed
            started = await client.call(member, *args)

            def progress(payload: dict[str, Any]) -> None:
                line = show(payload) if show is not None else None
                if line:
                    click.echo(line, err=True)

            report = await client.follow_job(started["job"], progress, timeout_s)
            return dict(report.get("result") or {})
        finally:
            client.close()

    return asyncio.run(run())


@click.command()
@click.argument("provider", required=False, default="")
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--timeout", "timeout_s", default=900.0, show_default=True, help="Seconds to wait.")
def restart(provider: str, config_dir: Path | None, as_json: bool, timeout_s: float) -> None:
    """Restart PROVIDER (or every owned one, one at a time) and wait until it answers.

    With no PROVIDER, those you stopped (`diversityctl stop`) and those held while their
    model file is rewritten are left as they are. Reports how long each took; exit 1 if
    one did not come back.
    """

    show = None if as_json else show_progress
    result = run_job(real_dir(config_dir), "Restart", (provider,), show, timeout_s)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for entry in result.get("providers", []):
            verdict = "ready" if entry["ok"] else f"NOT BACK ({entry['state']})"
            click.echo(f"{entry['provider']}: {verdict} after {entry['elapsed_ms'] / 1000:.2f} s")
        for name, why in (result.get("skipped") or {}).items():
            click.echo(f"{name}: skipped ({why})")
        if result.get("error"):
            click.echo(f"error: {result['error']}", err=True)
    sys.exit(EXIT_OK if result.get("ok") else EXIT_FAILURE)


@click.command()
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def reload(config_dir: Path | None, as_json: bool) -> None:
    """Make the daemon re-read its configuration. An invalid one is refused (exit 2) and the
    daemon keeps running on the old one."""
    import asyncio

    wanted = real_dir(config_dir)

    async def run() -> dict[str, Any]:
        client = await _connect_daemon(wanted)
        try:
            return dict(await client.call("Reload", timeout_s=60))
        finally:
            client.close()

    result = asyncio.run(run())
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif result.get("ok"):
        restarting = ", ".join(result.get("restarting") or []) or "nothing"
        click.echo(f"reloaded; restarting {restarting}")
        gateway = result.get("gateway")
        if gateway:
            how = {
                "none": "unchanged",
                "in-process": "routes changed in-process",
                "new process": "a new process",
            }.get(gateway.get("change"), gateway.get("change"))
            click.echo(f"gateway: {how} ({gateway.get('reason')})")
    else:
        for error in result.get("errors", []):
            click.echo(Finding(Severity.ERROR, **error).format(), err=True)
        click.echo("configuration refused; the daemon keeps the previous one", err=True)
    sys.exit(EXIT_OK if result.get("ok") else EXIT_USAGE)


def format_drills(result: dict[str, Any]) -> str:
    header = (
        "PROVIDER", "MODE", "SENT", "FAILED", "CUT", "P50", "P99", "SETTLED AFTER", "RESTORED"
    )  # fmt: skip
    rows = [header]
    for d in result.get("drills", []):
        rows.append(
            (
                d["provider"],
                d["mode"],
                str(d["sent"]),
                str(d["failed"]),
                str(d.get("cut_mid_stream", 0)),
                f"{d['p50_ms']:.0f} ms",
                f"{d['p99_ms']:.0f} ms",
                f"{d['settle_ms'] / 1000:.1f} s",
                "yes" if d["restored"] else "NO",
            )
        )
    lines = format_table(rows)
    for d in result.get("drills", []):
        answered = ", ".join(f"{base}: {n}" for base, n in sorted(d["answered_by"].items()))
        lines.append(f"{d['provider']}: answered by {answered or 'nobody'}")
        for failure in d.get("failures", []):
            lines.append(
                f"  failed: {failure['model']} stream={failure['stream']}: {failure['error']}"
            )
        if d.get("error"):
            lines.append(f"  error: {d['error']}")
    lines.append("ok" if result.get("ok") else "FAILED")
    return "\n".join(lines)


@click.command("failover-test")
@click.argument("provider", required=False, default="")
@click.option(
    "--mode",
    type=click.Choice(["kill", "stop", "outside-stop", "hang"]),
    default="kill",
    show_default=True,
    help="kill: SIGKILL (systemd restarts it); stop: a planned stop (drained first: it "
    "loses nothing), then start; outside-stop: systemctl stop unannounced, as another tool "
    "would (streams cut are counted apart), then start; hang: SIGSTOP, then SIGCONT.",
)
@click.option("--force", is_flag=True, help="Drill even where a model has no live fallback.")
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--timeout", "timeout_s", default=900.0, show_default=True, help="Seconds to wait.")
def failover_test(
    *,
    provider: str,
    mode: str,
    force: bool,
    config_dir: Path | None,
    as_json: bool,
    timeout_s: float,
) -> None:
    """A live drill through the gateway: take PROVIDER down (every owned one in turn without
    PROVIDER) while requests for its models flow, plain and streaming; then restore it.

    Reports requests, failures, p50/p99 latency, how long the gateway kept trying the dead
    provider, and whether it came back. Exit 1 if a request failed or something was not
    restored; 2 (refused) when a model would have no live fallback, unless --force.
    """

    show = None if as_json else show_progress
    result = run_job(real_dir(config_dir), "FailoverTest", (provider, mode, force), show, timeout_s)
    click.echo(json.dumps(result, indent=2) if as_json else format_drills(result))
    sys.exit(EXIT_OK if result.get("ok") else EXIT_FAILURE)


@click.command()
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def history(config_dir: Path | None, as_json: bool) -> None:
    """List the gateway's last configs (newest first); `rollback ID` goes back to one."""
    import asyncio

    wanted = real_dir(config_dir)

    async def run() -> dict[str, Any]:
        client = await _connect_daemon(wanted)
        try:
            return dict(await client.call("History"))
        finally:
            client.close()

    result = asyncio.run(run())
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for entry in result["history"]:
        marker = "*" if entry["current"] else " "
        click.echo(f"{marker} {entry['id']}  {entry['created']}  {entry['path']}")
    if result.get("pinned"):
        click.echo(f"pinned to {result['pinned']} (automatic reloads resume on `reload`)")


@click.command()
@click.argument("entry_id", metavar="ID")
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def rollback(entry_id: str, config_dir: Path | None, as_json: bool) -> None:
    """Serve the gateway config ID again (blue/green, like any reload) and pin it: automatic
    reloads pause until `diversityctl reload`. Exit 1 if the proxy would not start."""

    result = run_job(real_dir(config_dir), "Rollback", (entry_id,), None, 600)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif result.get("ok"):
        click.echo(f"serving {result['history_id']} ({result['instance']}), pinned")
    else:
        click.echo(f"rollback failed: {result.get('error')}", err=True)
    sys.exit(EXIT_OK if result.get("ok") else EXIT_FAILURE)


@click.command()
@click.argument("provider")
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--timeout", "timeout_s", default=900.0, show_default=True, help="Seconds to wait.")
def stop(provider: str, config_dir: Path | None, as_json: bool, timeout_s: float) -> None:
    """Stop PROVIDER on purpose (to free its VRAM, say). It leaves the gateway's routes
    first and the answers it is sending finish (`supervision.drain_s`); then it stops, and
    stays stopped, across daemon restarts too, never revived, until `diversityctl start
    PROVIDER`. (`systemctl --user stop` of its unit counts the same while diversityd runs,
    without the drain.)"""
    _start_or_stop("Stop", provider, config_dir, as_json, timeout_s)


@click.command()
@click.argument("provider")
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--timeout", "timeout_s", default=900.0, show_default=True, help="Seconds to wait.")
def start(provider: str, config_dir: Path | None, as_json: bool, timeout_s: float) -> None:
    """Start PROVIDER (stopped on purpose, or failed) and wait until it answers."""
    _start_or_stop("Start", provider, config_dir, as_json, timeout_s)


def _start_or_stop(
    member: str, provider: str, config_dir: Path | None, as_json: bool, timeout_s: float
) -> None:
    show = None if as_json else show_progress
    result = run_job(real_dir(config_dir), member, (provider,), show, timeout_s)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        verdict = "ok" if result.get("ok") else "FAILED"
        click.echo(f"{result.get('provider', provider)}: {result.get('state')} ({verdict})")
        drain = result.get("drain")
        if drain and drain.get("bound_s"):
            click.echo(
                f"drained first: {drain['in_flight']} answers in flight, "
                f"{drain['waited_s']:g} s (at most {drain['bound_s']:g} s)"
                + (f"; {drain['left']} still in flight were cut" if drain.get("left") else "")
            )
        if result.get("error"):
            click.echo(f"error: {result['error']}", err=True)
    sys.exit(EXIT_OK if result.get("ok") else EXIT_FAILURE)
