"""The daemon's Prometheus metrics (names, kinds and help: metricspec.py).

Events (probes, state changes, exits, restarts, revivals, reloads, drills) count into
prometheus-client's counters and histogram as they happen, from the state loop or a job;
everything that is a state (provider up, the gateway in sync, the VRAM plan, NVML's
readings) is read off the store when Prometheus scrapes. Labelled counters are created at
0 for every provider, so `increase()` sees their first event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from diversityd import __version__
from diversityd.daemon.gatewayrecord import GatewayRecord
from diversityd.daemon.store import Store, sha256_text
from diversityd.drill import DrillReport
from diversityd.gateway import chain_health
from diversityd.metricspec import METRICS, PROBE_BUCKETS_S, Kind
from diversityd.state import ProbeResult, ProviderState, is_serving

_SPECS = {spec.name: spec for spec in METRICS}


def _counter(registry: CollectorRegistry, name: str) -> Counter:
    spec = _SPECS[name]
    assert spec.kind is Kind.COUNTER
    return Counter(name.removesuffix("_total"), spec.help, spec.labels, registry=registry)


class Metrics:
    def __init__(
        self,
        store: Store,
        *,
        gateway: Callable[[], GatewayRecord | None],
        jobs_running: Callable[[], int],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._probe_seconds = Histogram(
            "diversityd_probe_duration_seconds",
            _SPECS["diversityd_probe_duration_seconds"].help,
            ("provider",),
            buckets=PROBE_BUCKETS_S,
            registry=self.registry,
        )
        self._probe_failures = _counter(self.registry, "diversityd_probe_failures_total")
        self._state_changes = _counter(self.registry, "diversityd_provider_state_changes_total")
        self._exits = _counter(self.registry, "diversityd_provider_exits_total")
        self._restarts = _counter(self.registry, "diversityd_provider_restarts_total")
        self._revivals = _counter(self.registry, "diversityd_provider_revivals_total")
        self._reloads = _counter(self.registry, "diversityd_gateway_reloads_total")
        self._route_updates = _counter(self.registry, "diversityd_gateway_route_updates_total")
        self._nvml_errors = _counter(self.registry, "diversityd_nvml_errors_total")
        self._drills = _counter(self.registry, "diversityd_drills_total")
        self._drill_requests = _counter(self.registry, "diversityd_drill_requests_total")
        self._drill_answers = _counter(self.registry, "diversityd_drill_answers_total")
        self._settle: dict[tuple[str, str], float] = {}
        for outcome in ("ok", "failed"):
            self._reloads.labels(outcome=outcome)
        self.registry.register(_StateCollector(store, gateway, jobs_running, self._settle))

    def providers_known(self, names: Iterable[str]) -> None:
        """Create each provider's counters at 0 (a series first seen at 1 has no increase)."""
        for name in names:
            self._probe_seconds.labels(provider=name)
            for counter in (self._exits, self._restarts, self._revivals):
                counter.labels(provider=name)
            for outcome in ("refused", "timeout", "error"):
                self._probe_failures.labels(provider=name, outcome=outcome)

    # -- events ------------------------------------------------------------------------------

    def probed(self, provider: str, result: ProbeResult) -> None:
        self._probe_seconds.labels(provider=provider).observe(result.latency_ms / 1000)
        if not result.ok:
            self._probe_failures.labels(provider=provider, outcome=result.outcome.value).inc()

    def state_changed(self, provider: str, state: ProviderState) -> None:
        self._state_changes.labels(provider=provider, state=state.value).inc()

    def exited(self, provider: str) -> None:
        self._exits.labels(provider=provider).inc()

    def restarted(self, provider: str) -> None:
        self._restarts.labels(provider=provider).inc()

    def revived(self, provider: str) -> None:
        self._revivals.labels(provider=provider).inc()

    def gateway_reloaded(self, ok: bool) -> None:
        self._reloads.labels(outcome="ok" if ok else "failed").inc()

    def gateway_routes_updated(self, ok: bool) -> None:
        self._route_updates.labels(outcome="ok" if ok else "failed").inc()

    def nvml_failed(self) -> None:
        self._nvml_errors.inc()

    def drilled(self, report: DrillReport) -> None:
        provider, mode = report.provider, report.mode.value
        ok = not report.failed and report.restored and report.error is None
        self._drills.labels(provider=provider, mode=mode, result="ok" if ok else "failed").inc()
        for answer in report.answers:
            outcome = "ok" if answer.ok else "failed"
            self._drill_requests.labels(provider=provider, mode=mode, outcome=outcome).inc()
            if answer.ok:
                answered_by = answer.api_base or "(none)"
                self._drill_answers.labels(
                    provider=provider, mode=mode, answered_by=answered_by
                ).inc()
        self._settle[(provider, mode)] = report.settle_ms() / 1000

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges read off the store at each scrape (the loop's state, read-only)."""

    def __init__(
        self,
        store: Store,
        gateway: Callable[[], GatewayRecord | None],
        jobs_running: Callable[[], int],
        settle: dict[tuple[str, str], float],
    ) -> None:
        self.store = store
        self.gateway = gateway
        self.jobs_running = jobs_running
        self.settle = settle

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected fresh each time: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        gauges = {
            spec.name: GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
            for spec in METRICS
            if spec.kind is Kind.GAUGE
        }

        def put(name: str, labels: tuple[str, ...], value: float) -> None:
            gauges[name].add_metric(list(labels), value)

        store = self.store
        for name, record in store.records.items():
            put("diversityd_provider_up", (name,), float(is_serving(record.state)))
            for state in ProviderState:
                put("diversityd_provider_state", (name, state.value), float(record.state is state))
            put("diversityd_provider_owned", (name,), float(record.owned is not None))
            put("diversityd_provider_stopped_by_user", (name,), float(record.stopped_by_user))
            if record.snapshot is not None:
                put("diversityd_provider_systemd_restarts", (name,), record.snapshot.n_restarts)
            if record.n_gpu_layers is not None:
                put("diversityd_provider_gpu_layers", (name,), record.n_gpu_layers)
        self._collect_plan(put)
        if store.config is not None and store.report is not None:
            health = chain_health(store.config, store.catalog, store.availability())
            for model, (servable, members_up) in health.items():
                put("diversityd_model_servable", (model,), float(servable))
                put("diversityd_model_chain_members_up", (model,), members_up)
        gateway = self.gateway()
        if gateway is not None:
            put("diversityd_gateway_up", (), float(gateway.state() in ("ready", "reloading")))
            put("diversityd_gateway_in_sync", (), float(gateway.in_sync))
            put("diversityd_gateway_pinned", (), float(gateway.pinned is not None))
            if gateway.applied_text is not None:
                sha = sha256_text(gateway.applied_text)
                put("diversityd_gateway_config_info", (sha, gateway.history_id or ""), 1.0)
        fleet = store.config.settings.fleet if store.config is not None else None
        if fleet is not None:
            now = time.monotonic()
            put("diversityd_fleet_redis_up", (), float(bool(store.fleet.redis_ok)))
            for host, view in store.fleet.peers.items():
                usable = view.usable(now, fleet.probe_interval_s)
                put("diversityd_fleet_peer_routed", (host,), float(usable))
                put("diversityd_fleet_peer_heartbeat_age_seconds", (host,), now - view.seq_seen_at)
        for (provider, mode), seconds in self.settle.items():
            put("diversityd_drill_settle_seconds", (provider, mode), seconds)
        put("diversityd_daemon_info", (__version__,), 1.0)
        put("diversityd_jobs_running", (), self.jobs_running())
        yield from gauges.values()

    def _collect_plan(self, put: Callable[[str, tuple[str, ...], float], None]) -> None:
        gpu = self.store.gpu
        plan, reading = gpu.plan, gpu.reading
        for card in plan.cards if plan else ():
            index = str(card.index)
            put("diversityd_gpu_total_bytes", (index,), card.total_bytes)
            put("diversityd_gpu_others_bytes", (index,), card.others_bytes)
            put("diversityd_gpu_budget_bytes", (index,), card.budget_bytes)
            put("diversityd_gpu_planned_bytes", (index,), card.planned_bytes)
            for server in card.servers:
                put("diversityd_provider_planned_vram_bytes", (server.provider, index),
                    server.gpu_bytes)  # fmt: skip
        for card_reading in reading.gpus if reading else ():
            put("diversityd_gpu_free_bytes", (str(card_reading.index),), card_reading.free_bytes)
        config = self.store.config
        if config is None or plan is None:
            return
        for name, owned in config.settings.owned.items():
            settings = plan.settings.get(name)
            on_gpu_wanted = owned.gpu is not None
            on_cpu = settings is not None and (settings.hide_gpu or settings.n_gpu_layers == 0)
            put("diversityd_provider_on_cpu", (name,), float(on_gpu_wanted and on_cpu))
