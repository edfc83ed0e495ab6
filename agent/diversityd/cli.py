"""diversityctl: validate, render, plan, install, status, restart, reload, failover-test,
history, rollback.

Exit codes: 0 ok, 2 bad configuration or usage, 1 anything else. Tracebacks only with --debug.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

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
    from diversityd.parts import default_config_dir  # light: `status` must not load yaml

    return config_dir if config_dir is not None else default_config_dir()


def print_findings(findings: list[Finding], *, stream: Any = None) -> None:
    out = stream or sys.stderr
    for finding in findings:
        click.echo(finding.format(), file=out)


class _LazyGroup(click.Group):
    """Commands whose modules are heavy load on first use: `status` stays fast."""

    lazy: ClassVar[dict[str, str]] = {"plan": "diversityd.plancli"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            import importlib

            command = getattr(importlib.import_module(self.lazy[cmd_name]), cmd_name)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of unexpected errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Keep the local LLM servers and their LiteLLM gateway alive.

    diversityctl talks to the diversityd daemon over the user bus (status, restart, reload,
    failover-test, history, rollback), works on the configuration alone (validate, render,
    plan) and installs the daemon as a systemd user service (install).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def load_report(config_dir: Path) -> Any:
    from diversityd.validation import check_config_dir

    return check_config_dir(config_dir, os.environ)


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


# ---------------------------------------------------------------------------------------
# Commands that talk to the daemon


def _uptime(since: str | None) -> str:
    if not since:
        return "-"
    from datetime import UTC, datetime

    seconds = int((datetime.now(UTC) - datetime.fromisoformat(since)).total_seconds())
    if seconds < 0:
        return "-"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _probe_text(probe: dict[str, Any] | None) -> str:
    if not probe:
        return "-"
    if probe.get("ok"):
        return f"ok {probe.get('latency_ms', 0):.0f}ms"
    return str(probe.get("outcome", "error"))


def format_status(document: dict[str, Any]) -> str:
    """The status table: one row per provider, then the daemon and gateway lines."""
    header = ("PROVIDER", "UNIT", "STATE", "PID", "UPTIME", "PROBE", "MODELS", "GPU LAYERS", "VRAM")
    rows = [header]
    for p in document.get("providers", []):
        vram = p.get("vram_mib")
        rows.append(
            (
                p["name"],
                p.get("unit") or "(watched)",
                p["state"],
                str(p["pid"]) if p.get("pid") else "-",
                _uptime(p.get("since")),
                _probe_text(p.get("probe")),
                ",".join(p.get("models") or []) or "-",
                "-" if p.get("n_gpu_layers") is None else str(p["n_gpu_layers"]),
                "-" if vram is None else f"{vram} MiB",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    daemon = document.get("daemon", {})
    if daemon.get("running"):
        lines.append(f"daemon: running (pid {daemon.get('pid')}, since {daemon.get('since')})")
    else:
        lines.append(f"daemon: DOWN ({daemon.get('reason', 'not on the user bus')})")
    for p in document.get("providers", []):
        if p.get("error"):
            lines.append(f"  {p['name']}: {p['error']}")
        model_file = p.get("model_file") or {}
        if model_file.get("error"):
            lines.append(
                f"  {p['name']}: model file refused: {model_file['error']} "
                f"(still serving {model_file.get('target')})"
            )
        if p.get("models_missing"):
            lines.append(f"  {p['name']}: configured, not served: {', '.join(p['models_missing'])}")
        if p.get("models_extra"):
            lines.append(f"  {p['name']}: served, not configured: {', '.join(p['models_extra'])}")
    gateway = document.get("gateway") or {}
    if gateway.get("owned"):
        line = f"gateway: {gateway.get('state', 'unknown')} at {gateway.get('url')}"
        if gateway.get("unit"):
            line += f" ({gateway['unit']}, pid {gateway.get('pid') or '-'})"
        lines.append(line)
        lines.append(f"  config {gateway.get('config')}; key file {gateway.get('key_file')}")
        last = gateway.get("last_reload") or {}
        if last and not last.get("ok"):
            lines.append(f"  last reload FAILED: {last.get('error')}")
        if gateway.get("pinned"):
            lines.append(f"  pinned to {gateway['pinned']} by a rollback")
        if gateway.get("left_out"):
            lines.append(f"  not served (no live fallback): {', '.join(gateway['left_out'])}")
    elif gateway:
        lines.append(f"gateway: {gateway.get('state', 'unknown')} (not owned)")
    return "\n".join(lines)


async def _status_from_systemd(config_dir: Path, reason: str) -> dict[str, Any]:
    """The daemon is down: say what systemd (and a quick probe) says about each provider."""
    from diversityd.adapters import probes
    from diversityd.adapters.systemd import Systemd, SystemdError
    from diversityd.config import load_config
    from diversityd.state import derive_state, unit_state
    from diversityd.units import unit_name

    providers: list[dict[str, Any]] = []
    try:
        config, _ = load_config(config_dir)
    except ConfigError:
        config = None
    try:
        systemd: Systemd | None = await Systemd.connect()
    except SystemdError:
        systemd = None
    if config is not None:
        client = probes.new_client(0.5)
        try:
            for name, provider in config.providers.items():
                if not provider.active:
                    continue
                owned = name in config.settings.owned
                unit = unit_name(name) if owned else None
                snapshot = await systemd.snapshot(unit) if systemd and unit else None
                view = snapshot.view() if snapshot is not None else None
                probe = None
                if provider.is_local and (not owned or unit_state(view) is None):
                    probe = await probes.probe(client, provider, 0.5)
                state = derive_state(
                    owned=owned,
                    unit=view,
                    probe=probe,
                    answered_since_start=bool(probe and probe.ok),
                )
                providers.append(
                    {
                        "name": name,
                        "owned": owned,
                        "unit": unit,
                        "state": state.value,
                        "pid": snapshot.main_pid if snapshot and snapshot.main_pid else None,
                        "since": None,
                        "models": [],
                        "probe": None
                        if probe is None
                        else {
                            "outcome": probe.outcome.value,
                            "ok": probe.ok,
                            "latency_ms": round(probe.latency_ms, 1),
                            "error": probe.error,
                        },
                        "n_gpu_layers": None,
                        "vram_mib": None,
                        "error": None if probe is None or probe.ok else probe.error,
                    }
                )
        finally:
            await client.aclose()
    if systemd is not None:
        systemd.disconnect()
    return {
        "daemon": {"running": False, "reason": reason},
        "providers": providers,
        "gateway": {"state": "unknown"},
    }


def _fetch_status(config_dir: Path) -> dict[str, Any]:
    """The daemon's answer over a light blocking client (the fast path); when the daemon
    is not there, what systemd and a quick probe say."""
    from diversityd.adapters import busclient

    try:
        answer = busclient.call_string(
            busclient.session_bus_address(),
            busclient.BUS_NAME,
            busclient.OBJECT_PATH,
            busclient.INTERFACE,
            "Status",
            timeout_s=5,
        )
    except busclient.BusCallError as exc:
        if exc.name not in busclient.NO_SUCH_NAME:
            raise DiversitydError(f"the daemon failed to answer: {exc}") from exc
        reason = "diversityd is not running on the user bus"
    except OSError as exc:
        reason = f"no user bus: {exc}"
    else:
        return dict(json.loads(answer))
    import asyncio  # only now: the fast path does without it

    return asyncio.run(_status_from_systemd(config_dir, reason))


@cli.command()
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(config_dir: Path | None, as_json: bool) -> None:
    """Show every provider: unit, state, PID, uptime, probe, models, GPU layers, VRAM.

    When the daemon is not running, shows what systemd says and that the daemon is down.
    """
    document = _fetch_status(resolve_config_dir(config_dir))
    click.echo(json.dumps(document, indent=2) if as_json else format_status(document))


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


def run_job(
    config_dir: str | None,
    member: str,
    args: tuple[str | bool, ...],
    show: Callable[[dict[str, Any]], str | None],
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
                line = show(payload)
                if line:
                    click.echo(line, err=True)

            report = await client.follow_job(started["job"], progress, timeout_s)
            return dict(report.get("result") or {})
        finally:
            client.close()

    return asyncio.run(run())


def _real_dir(config_dir: Path | None) -> str | None:
    return os.path.realpath(config_dir) if config_dir is not None else None


@cli.command()
@click.argument("provider", required=False, default="")
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--timeout", "timeout_s", default=900.0, show_default=True, help="Seconds to wait.")
def restart(provider: str, config_dir: Path | None, as_json: bool, timeout_s: float) -> None:
    """Restart PROVIDER (or every owned one, one at a time) and wait until it answers.

    Reports how long each took; exit 1 if one did not come back.
    """

    def show(payload: dict[str, Any]) -> str | None:
        if not as_json and payload.get("step") == "restarting":
            return f"restarting {payload['provider']} ..."
        return None

    result = run_job(_real_dir(config_dir), "Restart", (provider,), show, timeout_s)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for entry in result.get("providers", []):
            verdict = "ready" if entry["ok"] else f"NOT BACK ({entry['state']})"
            click.echo(f"{entry['provider']}: {verdict} after {entry['elapsed_ms'] / 1000:.2f} s")
        if result.get("error"):
            click.echo(f"error: {result['error']}", err=True)
    sys.exit(EXIT_OK if result.get("ok") else EXIT_FAILURE)


@cli.command()
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def reload(config_dir: Path | None, as_json: bool) -> None:
    """Make the daemon re-read its configuration. An invalid one is refused (exit 2) and the
    daemon keeps running on the old one."""
    import asyncio

    wanted = _real_dir(config_dir)

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
    else:
        for error in result.get("errors", []):
            click.echo(Finding(Severity.ERROR, **error).format(), err=True)
        click.echo("configuration refused; the daemon keeps the previous one", err=True)
    sys.exit(EXIT_OK if result.get("ok") else EXIT_USAGE)


def format_drills(result: dict[str, Any]) -> str:
    header = ("PROVIDER", "MODE", "SENT", "FAILED", "P50", "P99", "SETTLED AFTER", "RESTORED")
    rows = [header]
    for d in result.get("drills", []):
        rows.append(
            (
                d["provider"],
                d["mode"],
                str(d["sent"]),
                str(d["failed"]),
                f"{d['p50_ms']:.0f} ms",
                f"{d['p99_ms']:.0f} ms",
                f"{d['settle_ms'] / 1000:.1f} s",
                "yes" if d["restored"] else "NO",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in rows]
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


@cli.command("failover-test")
@click.argument("provider", required=False, default="")
@click.option(
    "--mode",
    type=click.Choice(["kill", "stop", "hang"]),
    default="kill",
    show_default=True,
    help="kill: SIGKILL (systemd restarts it); stop: systemctl stop, then start; "
    "hang: SIGSTOP, then SIGCONT.",
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

    def show(payload: dict[str, Any]) -> str | None:
        if not as_json and payload.get("step") in ("taking down", "restoring"):
            return f"{payload['step']} {payload.get('provider', '')} ..."
        return None

    result = run_job(
        _real_dir(config_dir), "FailoverTest", (provider, mode, force), show, timeout_s
    )
    click.echo(json.dumps(result, indent=2) if as_json else format_drills(result))
    sys.exit(EXIT_OK if result.get("ok") else EXIT_FAILURE)


@cli.command()
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def history(config_dir: Path | None, as_json: bool) -> None:
    """List the gateway's last configs (newest first); `rollback ID` goes back to one."""
    import asyncio

    wanted = _real_dir(config_dir)

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


@cli.command()
@click.argument("entry_id", metavar="ID")
@config_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def rollback(entry_id: str, config_dir: Path | None, as_json: bool) -> None:
    """Serve the gateway config ID again (blue/green, like any reload) and pin it: automatic
    reloads pause until `diversityctl reload`. Exit 1 if the proxy would not start."""

    result = run_job(_real_dir(config_dir), "Rollback", (entry_id,), lambda _: None, 600)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif result.get("ok"):
        click.echo(f"serving {result['history_id']} ({result['instance']}), pinned")
    else:
        click.echo(f"rollback failed: {result.get('error')}", err=True)
    sys.exit(EXIT_OK if result.get("ok") else EXIT_FAILURE)


@cli.command()
@config_dir_option
@click.option("--now", is_flag=True, help="Also start (or restart) diversityd.service.")
@click.option(
    "--unit-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where diversityd.service is written [default: diversityd.yaml `unit_dir`, else "
    "$XDG_CONFIG_HOME/systemd/user]; the daemon writes the providers' units to `unit_dir`.",
)
def install(config_dir: Path | None, now: bool, unit_dir: Path | None) -> None:
    """Write and enable diversityd.service (a systemd user unit) for this configuration."""
    import asyncio

    from diversityd import parts
    from diversityd.adapters.files import write_atomic
    from diversityd.adapters.systemd import Systemd
    from diversityd.adapters.unitfiles import machine_context
    from diversityd.parts import default_unit_dir
    from diversityd.units import DAEMON_UNIT, render_daemon_unit

    directory = resolve_config_dir(config_dir).resolve()
    report = load_report(directory)
    if not report.ok:
        print_findings(report.of(Severity.ERROR))
        raise UsageError("the configuration is invalid; nothing installed")
    settings_dir = report.config.settings.unit_dir
    target_dir = unit_dir or (
        Path(settings_dir).expanduser() if settings_dir else default_unit_dir()
    )
    unit = render_daemon_unit(
        str(directory),
        machine_context(sys.executable),
        environment={"DIVERSITYD_CACHE_DIR": str(parts.cache_root())},
    )
    write_atomic(target_dir / unit.name, unit.text)

    async def apply() -> None:
        systemd = await Systemd.connect()
        try:
            await systemd.reload_manager()
            await systemd.enable([DAEMON_UNIT])
            if now:
                result = await systemd.restart(DAEMON_UNIT, timeout_s=120)
                if result != "done":
                    raise DiversitydError(
                        f"diversityd.service did not start ({result})",
                        hint="journalctl --user -u diversityd",
                    )
        finally:
            systemd.disconnect()

    asyncio.run(apply())
    click.echo(f"installed {target_dir / unit.name}" + (" and started it" if now else ""))


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
