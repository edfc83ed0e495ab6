"""Logs are events: dotted names, fixed snake_case fields (`FIELDS`).

The core only names events (`get_logger().info("unit.started", provider=...)`); where they
go is set once per process by adapters/journal.py's `configure_logging` (journald's native
fields, a console, or JSON lines).
"""

from __future__ import annotations

from typing import Any

import structlog

# The field names every event may carry; values are rendered as text.
FIELDS = (
    "provider", "unit", "model", "elapsed_ms", "error", "state", "pid", "path", "job",
    "in_flight",
)  # fmt: skip


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)


# What each event says in words, before its fields, in the journal (EVENT= keeps its name).
EVENT_TEXT: dict[str, str] = {
    "config.invalid": "the configuration is invalid",
    "config.rejected": "a configuration reload was refused; the previous one stays",
    "config.reloaded": "the configuration was reloaded",
    "daemon.bus_lost": "lost the user bus; exiting so that systemd restarts diversityd",
    "daemon.event_failed": "an event could not be handled",
    "daemon.failed": "diversityd failed",
    "daemon.fault_injected": "killed at a named step (a fault drill)",
    "daemon.ready": "diversityd is ready",
    "daemon.start_failed": "starting the providers failed",
    "daemon.stopping": "diversityd is stopping; the providers keep running",
    "daemon.task_failed": "a background task failed",
    "daemon.unit_stale": "diversityd's own unit is out of date",
    "drill.finished": "failover drill finished",
    "drill.takedown": "failover drill: taking the provider down",
    "gateway.adopted": "gateway instance adopted as the serving one",
    "gateway.instance_down": "the serving gateway instance went down; starting one",
    "gateway.key_generated": "generated the gateway's master key",
    "gateway.key_unsafe": "the gateway's key file is unsafe",
    "gateway.loop_failed": "the gateway loop failed; trying again",
    "gateway.pinned": "gateway config pinned by a rollback",
    "gateway.providers_slow": "the providers were slow to answer; rendering the gateway anyway",
    "gateway.reload_failed": "gateway reload failed; the previous instance keeps serving",
    "gateway.reloaded": "gateway reloaded: a new process serves (blue/green)",
    "gateway.routes_updated": "gateway routes changed in-process (no new process)",
    "gateway.routes_failed": "gateway routes not changed in-process; starting a new process",
    "gateway.channel_silent": "a gateway instance's control channel did not answer; asking again",
    "gateway.second_starting": "starting the second gateway instance",
    "gateway.spare_stopped": "a spare gateway instance runs beside the serving one; stopping it",
    "gateway.spare_stop_failed": "a spare gateway instance could not be stopped",
    "gateway.second_failed": "the second gateway instance did not start",
    "gateway.reloading": "reloading the gateway",
    "gateway.socket_started": "started the gateway's socket",
    "gpu.check_failed": "looking at the GPUs failed",
    "gpu.cpu_only": "no GPU to use: planning the servers on the CPU",
    "gpu.nvml_failed": "reading NVML failed; the plan in force stays",
    "gpu.planned": "GPU plan",
    "http.listen_failed": "cannot listen for metrics and answers",
    "http.listening": "listening for metrics and answers",
    "model.changed": "model link re-pointed; rolling the servers",
    "model.invalid": "the model link does not lead to a whole GGUF",
    "model.rejected": "model link re-pointed to a bad file; refused",
    "probe.changed": "probe result changed",
    "probe.failed": "a probe failed",
    "provider.hung_killed": "killed a hung server; systemd restarts it",
    "fleet.peer_joined": "a peer joined the fleet",
    "fleet.peer_expired": "a peer's record expired in Redis; routed to while its gateway answers",
    "fleet.peer_probe": "a peer's gateway changed: it answers, or stopped answering",
    "fleet.redis_down": "the fleet's Redis cannot be reached; peers as last probed",
    "fleet.redis_back": "the fleet's Redis answers again",
    "fleet.loop_failed": "a fleet loop failed; trying again",
    "fleet.key_unsafe": "the fleet's key file is missing or readable by others",
    "provider.drained": "drained before a planned stop (out of the gateway's routes, "
    "its requests in flight finished)",
    "provider.state": "provider state changed",
    "provider.stopped_by_user": "provider stopped from outside; left stopped",
    "state.damaged": "the state file is damaged; rebuilt from systemd and the unit files",
    "state.unreadable": "the state file cannot be read",
    "state.write_failed": "writing the state file failed",
    "systemd.reloaded": "systemd re-read the unit files",
    "unit.dir_rewatched": "watching the unit folder again",
    "unit.environment_written": "wrote a unit's environment file (the server restarts)",
    "unit.exited": "a provider's process exited",
    "unit.foreign": "a unit file of this name is not diversityd's; left alone",
    "unit.held": "holding a server stopped",
    "unit.kill_failed": "killing a unit failed",
    "unit.port_conflict": "another process holds a provider's port",
    "unit.released": "starting held servers again",
    "unit.removed": "removed a unit file",
    "unit.render_failed": "a unit could not be rendered; the last good one stays",
    "unit.restart_failed": "restart failed: the provider did not come back",
    "unit.restarted": "provider restarted and answering",
    "unit.restarting": "restarting a provider",
    "unit.restored": "a hand-edited unit file was put back",
    "unit.revival_failed": "reviving failed units failed",
    "unit.revival_scheduled": "systemd gave up on a provider; starting it again later",
    "unit.reviving": "starting a failed provider again",
    "unit.start_failed": "starting a provider failed",
    "unit.started": "provider started",
    "unit.starting": "starting a provider",
    "unit.stop_failed": "stopping a unit failed",
    "unit.stopping": "stopping a provider",
    "unit.thaw_failed": "thawing a stopped server failed",
    "unit.thawed": "thawed a server found stopped (SIGSTOP)",
    "unit.write_failed": "writing unit files failed; retrying",
    "unit.written": "wrote a unit file",
}


def event_text(event: str) -> str:
    """The words for an event (its name, read aloud, when it has none of its own)."""
    return EVENT_TEXT.get(event) or event.replace(".", " ").replace("_", " ")
