"""The daemon's Prometheus metrics: names, kinds, labels and help, in one place. Pure data.

The daemon serves them (daemon/metrics.py, `metrics:` in diversityd.yaml); the Grafana
dashboard and the alert rules in packaging/ use them, and the tests check that every name
those files use is one of these (or LiteLLM's own, from the gateway's `/metrics`).
Names follow Prometheus' conventions: `_total` for counters, base units (seconds, bytes).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.StrEnum):
    GAUGE = "gauge"
    COUNTER = "counter"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricSpec:
    name: str  # counters without their `_total` suffix is prometheus-client's form; here with
    kind: Kind
    labels: tuple[str, ...]
    help: str


PROBE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

METRICS: tuple[MetricSpec, ...] = (
    # providers
    MetricSpec("diversityd_provider_up", Kind.GAUGE, ("provider",),
               "1 while the provider answers its probe (ready), else 0."),
    MetricSpec("diversityd_provider_state", Kind.GAUGE, ("provider", "state"),
               "1 for the provider's current state (starting, ready, busy, hung, down, failed, "
               "stopped, unknown), 0 for the others."),
    MetricSpec("diversityd_provider_owned", Kind.GAUGE, ("provider",),
               "1 when diversityd owns the provider's unit, 0 when it only watches it."),
    MetricSpec("diversityd_provider_stopped_by_user", Kind.GAUGE, ("provider",),
               "1 while the provider is stopped on purpose (diversityctl stop, systemctl "
               "stop): not revived, not alerted on."),
    MetricSpec("diversityd_probe_duration_seconds", Kind.HISTOGRAM, ("provider",),
               "How long a probe of the provider took (answered or not)."),
    MetricSpec("diversityd_probe_failures_total", Kind.COUNTER, ("provider", "outcome"),
               "Probes that did not succeed, by outcome (refused, timeout, error)."),
    MetricSpec("diversityd_provider_state_changes_total", Kind.COUNTER, ("provider", "state"),
               "Changes of the provider's state, by the state entered."),
    MetricSpec("diversityd_provider_exits_total", Kind.COUNTER, ("provider",),
               "Times the provider's main process went away (crash, kill, stop)."),
    MetricSpec("diversityd_provider_restarts_total", Kind.COUNTER, ("provider",),
               "Restarts diversityd made (rolling restarts: a user's, a changed unit's)."),
    MetricSpec("diversityd_provider_revivals_total", Kind.COUNTER, ("provider",),
               "Times diversityd started a unit systemd had given up on (failed)."),
    MetricSpec("diversityd_provider_systemd_restarts", Kind.GAUGE, ("provider",),
               "systemd's own restart count of the unit (NRestarts)."),
    # models and their chains
    MetricSpec("diversityd_model_servable", Kind.GAUGE, ("model",),
               "1 while the gateway can serve the name (it or a member of its fallback "
               "chain is live), 0 while every member is down."),
    MetricSpec("diversityd_model_chain_members_up", Kind.GAUGE, ("model",),
               "Live providers among those serving the name and its fallback chain."),
    # the gateway
    MetricSpec("diversityd_gateway_up", Kind.GAUGE, (),
               "1 while a gateway instance (LiteLLM proxy) is active on the socket."),
    MetricSpec("diversityd_gateway_in_sync", Kind.GAUGE, (),
               "1 when the config in force is what the providers' state renders now."),
    MetricSpec("diversityd_fleet_redis_up", Kind.GAUGE, (),
               "1 while the fleet's Redis answers (0: peers as last probed)."),
    MetricSpec("diversityd_fleet_peer_routed", Kind.GAUGE, ("peer",),
               "1 while a peer's gateway answers this host's probes (its models are routed)."),
    MetricSpec("diversityd_fleet_peer_heartbeat_age_seconds", Kind.GAUGE, ("peer",),
               "Seconds since a peer's record last moved in Redis (this host's clock)."),
    MetricSpec("diversityd_gateway_pinned", Kind.GAUGE, (),
               "1 while a rollback pins the gateway's config (automatic reloads paused)."),
    MetricSpec("diversityd_gateway_reloads_total", Kind.COUNTER, ("outcome",),
               "New gateway processes started for a change (blue/green), by outcome (ok, failed)."),
    MetricSpec("diversityd_gateway_route_updates_total", Kind.COUNTER, ("outcome",),
               "Route changes sent to the running gateway in-process, by outcome (ok, failed)."),
    MetricSpec("diversityd_gateway_config_info", Kind.GAUGE, ("sha256", "history_id"),
               "1 for the gateway config in force."),
    # GPUs
    MetricSpec("diversityd_gpu_total_bytes", Kind.GAUGE, ("gpu",),
               "The card's memory, as NVML reads it."),
    MetricSpec("diversityd_gpu_free_bytes", Kind.GAUGE, ("gpu",),
               "The card's free memory at the last NVML reading."),
    MetricSpec("diversityd_gpu_others_bytes", Kind.GAUGE, ("gpu",),
               "Memory held by processes diversityd does not own, when the plan was made."),
    MetricSpec("diversityd_gpu_budget_bytes", Kind.GAUGE, ("gpu",),
               "What diversityd's servers may share on the card (total - others - margin)."),
    MetricSpec("diversityd_gpu_planned_bytes", Kind.GAUGE, ("gpu",),
               "What the plan gives diversityd's servers on the card."),
    MetricSpec("diversityd_provider_planned_vram_bytes", Kind.GAUGE, ("provider", "gpu"),
               "What the plan gives one server on its card."),
    MetricSpec("diversityd_provider_gpu_layers", Kind.GAUGE, ("provider",),
               "The --n-gpu-layers a llama server's unit is given."),
    MetricSpec("diversityd_provider_on_cpu", Kind.GAUGE, ("provider",),
               "1 when a server set on a GPU is planned onto the CPU (nothing fits, no NVML)."),
    MetricSpec("diversityd_nvml_errors_total", Kind.COUNTER, (),
               "NVML readings that failed (the plan in force stays)."),
    # drills
    MetricSpec("diversityd_drills_total", Kind.COUNTER, ("provider", "mode", "result"),
               "Failover drills, by result (ok, failed)."),
    MetricSpec("diversityd_drill_requests_total", Kind.COUNTER,
               ("provider", "mode", "outcome"),
               "Requests sent through the gateway during drills, by outcome (ok, failed)."),
    MetricSpec("diversityd_drill_answers_total", Kind.COUNTER,
               ("provider", "mode", "answered_by"),
               "Who answered the drills' requests (the deployment's api_base)."),
    MetricSpec("diversityd_drill_settle_seconds", Kind.GAUGE, ("provider", "mode"),
               "How long the gateway kept trying the provider in its last drill."),
    # the daemon
    MetricSpec("diversityd_daemon_info", Kind.GAUGE, ("version",), "1, with the version."),
    MetricSpec("diversityd_jobs_running", Kind.GAUGE, (),
               "Jobs (restarts, drills, rollbacks) under way."),
)  # fmt: skip

METRIC_NAMES = frozenset(m.name for m in METRICS)
