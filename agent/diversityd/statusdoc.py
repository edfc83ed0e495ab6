"""The status document: one typed definition for `diversityctl status --json`, built by the
daemon (over D-Bus), by `status` when the daemon is down, and read by the table formatter.
Pure and light: `status` imports it on its fast path.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NotRequired, TypedDict

from diversityd.state import ProbeResult


class ProbeStatus(TypedDict):
    outcome: str
    ok: bool
    latency_ms: float
    error: str | None
    age_s: float
    models: list[str] | None


class ModelFileStatus(TypedDict):
    path: str
    target: str | None
    error: str | None  # a refused re-point (the accepted file keeps serving)


class RevivalStatus(TypedDict):
    """A unit systemd gave up on, being started again with backoff."""

    attempts: int
    next_try: str | None  # when (None: stopped by the user, or waiting for a job)
    last_failure: str | None


class ProviderStatus(TypedDict):
    name: str
    owned: bool
    unit: str | None
    state: str
    pid: int | None
    since: str | None  # when the running process became active
    models: list[str]
    probe: ProbeStatus | None
    n_gpu_layers: int | None
    vram_mib: int | None
    gpu_warnings: list[str]
    error: str | None
    type: str
    base_url: str
    state_since: str | None
    restarts: int | None
    last_unit_event_monotonic: float | None
    last_state_change_monotonic: float | None
    last_exit_monotonic: float | None
    left_ready_monotonic: float | None
    models_missing: list[str]
    models_extra: list[str]
    model_file: ModelFileStatus | None
    stopped_by_user: bool  # stopped on purpose: stays stopped, never revived
    revival: RevivalStatus | None
    # requests the gateway is sending it now (None: not known, no gateway answered)
    in_flight: NotRequired[int | None]
    draining: NotRequired[bool]  # out of the routes, its answers finishing, to be stopped


class ReloadOutcome(TypedDict):
    """The last `diversityctl reload`: adopted (what changed) or refused (why)."""

    ok: bool
    at: str
    errors: NotRequired[list[dict[str, Any]]]
    changed: NotRequired[list[str]]
    started: NotRequired[list[str]]
    job: NotRequired[str | None]


class DaemonStatus(TypedDict):
    running: bool
    reason: str | None  # why it is not running
    pid: int | None
    version: str | None
    since: str | None
    config_dir: str
    unit_dir: str | None
    host: str | None
    last_reload: ReloadOutcome | None
    jobs_running: list[str]
    unit_files_error: str | None  # why unit files could not be written (retried)
    # units that could not be rendered (the last good one stays): unit -> why
    unit_render_errors: NotRequired[dict[str, str]]
    own_unit_stale: NotRequired[str | None]  # diversityd.service needs `diversityctl install`


class CardStatus(TypedDict):
    index: int
    name: str | None
    total_mib: int
    free_mib: int | None
    others_mib: int
    budget_mib: int
    planned_mib: int
    warnings: list[str]


class GpuStatus(TypedDict):
    cpu_only_reason: str | None
    error: str | None  # the last NVML failure (the plan in force stays)
    cards: list[CardStatus]
    planned_s_ago: float | None


class GatewayReload(TypedDict):
    ok: bool
    at: str
    elapsed_ms: float
    instance: str
    history_id: str
    reason: str
    error: NotRequired[str]


class GatewayChange(TypedDict):
    """How the last change reached the gateway: in-process or a new process."""

    change: str  # gatewaysync.Change
    reason: str
    at: str
    elapsed_ms: float
    ok: bool
    error: NotRequired[str]


class GatewayInstanceStatus(TypedDict):
    unit: str
    state: str
    pid: int | None
    routes_digest: str | None


class GatewayStatus(TypedDict):
    owned: bool
    state: str
    url: NotRequired[str]
    unit: NotRequired[str | None]
    pid: NotRequired[int | None]
    config: NotRequired[str | None]
    config_sha256: NotRequired[str | None]
    applied_at: NotRequired[str | None]
    history_id: NotRequired[str | None]
    key_file: NotRequired[str]
    last_reload: NotRequired[GatewayReload | None]
    reloads: NotRequired[int]
    route_updates: NotRequired[int]
    last_change: NotRequired[GatewayChange | None]
    instances: NotRequired[list[GatewayInstanceStatus]]
    in_sync: NotRequired[bool]
    pinned: NotRequired[str | None]
    models: NotRequired[list[str]]
    substituted: NotRequired[dict[str, str]]
    left_out: NotRequired[list[str]]
    warnings: NotRequired[list[str]]


class StatusDocument(TypedDict):
    daemon: DaemonStatus
    providers: list[ProviderStatus]
    gpus: GpuStatus
    gateway: GatewayStatus
    # the fleet (fleet.FleetState.to_status): Redis, the peers, their heartbeats and probes
    fleet: NotRequired[dict[str, Any] | None]


NO_GPU_STATUS: GpuStatus = {
    "cpu_only_reason": None,
    "error": None,
    "cards": [],
    "planned_s_ago": None,
}


def probe_status(probe: ProbeResult, now: float) -> ProbeStatus:
    """`now`: time.monotonic(), for the probe's age."""
    return {
        "outcome": probe.outcome.value,
        "ok": probe.ok,
        "latency_ms": round(probe.latency_ms, 1),
        "error": probe.error,
        "age_s": round(now - probe.at, 1),
        "models": sorted(probe.models) if probe.models is not None else None,
    }


# ---------------------------------------------------------------------------------------
# The table


def uptime(since: str | None, now: datetime | None = None) -> str:
    if not since:
        return "-"
    seconds = int(((now or datetime.now(UTC)) - datetime.fromisoformat(since)).total_seconds())
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


def _probe_text(probe: ProbeStatus | None) -> str:
    if not probe:
        return "-"
    if probe["ok"]:
        return f"ok {probe['latency_ms']:.0f}ms"
    return probe["outcome"]


def format_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def format_status(document: StatusDocument) -> str:
    """The status table: one row per provider, then the daemon and gateway lines."""
    header = (
        "PROVIDER", "UNIT", "STATE", "PID", "UPTIME", "PROBE", "IN-FLIGHT", "MODELS", "GPU LAYERS",
        "VRAM",
    )  # fmt: skip
    rows = [header]
    for p in document["providers"]:
        vram = p["vram_mib"]
        rows.append(
            (
                p["name"],
                p["unit"] or "(watched)",
                p["state"] + (" (draining)" if p.get("draining") else ""),
                str(p["pid"]) if p["pid"] else "-",
                uptime(p["since"]),
                _probe_text(p["probe"]),
                "-" if p.get("in_flight") is None else str(p.get("in_flight")),
                ",".join(p["models"]) or "-",
                "-" if p["n_gpu_layers"] is None else str(p["n_gpu_layers"]),
                "-" if vram is None else f"{vram} MiB",
            )
        )
    lines = format_table(rows)
    daemon = document["daemon"]
    if daemon["running"]:
        lines.append(f"daemon: running (pid {daemon['pid']}, since {daemon['since']})")
        if daemon["unit_files_error"]:
            lines.append(f"  unit files NOT written (retrying): {daemon['unit_files_error']}")
        for error in (daemon.get("unit_render_errors") or {}).values():
            lines.append(f"  unit NOT rendered (the last good one stays): {error}")
        if daemon.get("own_unit_stale"):
            lines.append(f"  {daemon.get('own_unit_stale')}")
    else:
        lines.append(f"daemon: DOWN ({daemon['reason'] or 'not on the user bus'})")
    for p in document["providers"]:
        if p["error"]:
            lines.append(f"  {p['name']}: {p['error']}")
        if p["stopped_by_user"]:
            lines.append(f"  {p['name']}: stopped on purpose (`diversityctl start {p['name']}`)")
        revival = p["revival"]
        if revival is not None:
            lines.append(
                f"  {p['name']}: reviving: {revival['attempts']} tries, next at "
                f"{revival['next_try'] or '-'}; failed last: {revival['last_failure'] or '-'}"
            )
        model_file = p["model_file"]
        if model_file is not None and model_file["error"]:
            lines.append(
                f"  {p['name']}: model file refused: {model_file['error']} "
                f"(still serving {model_file['target']})"
            )
        if p["models_missing"]:
            lines.append(f"  {p['name']}: configured, not served: {', '.join(p['models_missing'])}")
        if p["models_extra"]:
            lines.append(f"  {p['name']}: served, not configured: {', '.join(p['models_extra'])}")
    lines += _gateway_lines(document["gateway"])
    lines += fleet_lines(document.get("fleet"))
    return "\n".join(lines)


def fleet_lines(fleet: dict[str, Any] | None) -> list[str]:
    if not fleet:
        return []
    redis = fleet["redis"]
    state = "ok" if redis["ok"] else f"DOWN {redis['down_s']} s ({redis['error']})"
    if redis["ok"] is None:
        state = "not reached yet"
    lines = [f"fleet: {fleet['name']}; redis {redis['url']}: {state}"]
    for peer in fleet["peers"]:
        probe = peer["probe"]
        seen = "answers" if probe["ok"] else f"NOT answering ({probe['error'] or 'no probe yet'})"
        record = (
            f"heartbeat {peer['heartbeat_age_s']} s ago"
            if peer["in_redis"]
            else "record expired (daemon gone or cut off)"
        )
        verdict = "routed to" if peer["usable"] else "not routed to"
        lines.append(
            f"  {peer['host']} {peer['gateway_url']}: {seen}; {record}; {verdict}; "
            f"models {', '.join(peer['models']) or '-'}"
        )
    for chain in fleet.get("single_host_chains") or []:
        lines.append(f"  chain never leaves this host: {chain}")
    return lines


def _gateway_lines(gateway: GatewayStatus) -> list[str]:
    if not gateway["owned"]:
        return [f"gateway: {gateway['state']} (not owned)"]
    line = f"gateway: {gateway['state']} at {gateway.get('url')}"
    if gateway.get("unit"):
        line += f" ({gateway.get('unit')}, pid {gateway.get('pid') or '-'})"
    lines = [line, f"  config {gateway.get('config')}; key file {gateway.get('key_file')}"]
    spares = [i for i in gateway.get("instances", []) if i["unit"] != gateway.get("unit")]
    for spare in spares:
        if spare["state"] == "active":
            lines.append(f"  also serving: {spare['unit']}, pid {spare['pid'] or '-'}")
    change = gateway.get("last_change")
    if change:
        lines.append(
            f"  routes: {gateway.get('route_updates', 0)} changes in-process, "
            f"{gateway.get('reloads', 0)} new processes; last: {change['change']} "
            f"({change['reason']}) at {change['at']}"
        )
    last = gateway.get("last_reload")
    if last and not last["ok"]:
        lines.append(f"  last reload FAILED: {last.get('error')}")
    if gateway.get("pinned"):
        lines.append(f"  pinned to {gateway.get('pinned')} by a rollback")
    if gateway.get("left_out"):
        lines.append(f"  not served (no live fallback): {', '.join(gateway.get('left_out', []))}")
    return lines
