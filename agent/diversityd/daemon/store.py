"""The daemon's state: what it knows of each provider, its jobs, the GPU plan, the gateway.

Written only inside the state loop (daemon/loop.py); read anywhere. Each record turns
itself into its part of the status document (statusdoc.py).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diversityd.cardplan import GpuSnapshot
from diversityd.catalog import Catalog
from diversityd.config import Config, OwnedServer, Provider
from diversityd.fleet import FleetState
from diversityd.gateway import Availability, normalize_model_id
from diversityd.gpuplan import GpuPlan, GpuSettings
from diversityd.persisted import Persisted, revival_in_memory, revival_on_disk
from diversityd.reconcile import ModelTarget, RevivalPlan
from diversityd.state import (
    Observed,
    ProbeResult,
    ProviderState,
    UnitSnapshot,
    is_serving,
)
from diversityd.statusdoc import (
    CardStatus,
    GpuStatus,
    ProviderStatus,
    ReloadOutcome,
    RevivalStatus,
    probe_status,
)
from diversityd.timefmt import iso_time
from diversityd.units import (
    RenderedUnit,
    UnitContext,
    unit_name,
)
from diversityd.validation import Report
from diversityd.vram import LLAMA_SERVER_KINDS

MIB = 1024 * 1024


@dataclass
class ProviderRecord:
    name: str
    provider: Provider
    owned: OwnedServer | None
    unit: str | None
    models: tuple[str, ...]
    backends: dict[str, str] = field(default_factory=dict)  # served name -> backend's id
    observed: Observed = field(default_factory=Observed)
    # property changes that arrived before the first snapshot: (monotonic time, changes)
    early_changes: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    state: ProviderState = ProviderState.UNKNOWN
    state_since: float = field(default_factory=time.time)
    last_unit_event: float | None = None  # monotonic time of the last systemd event
    last_state_change: float | None = None  # monotonic time of the last state change
    last_exit_seen: float | None = None  # monotonic time the daemon learnt a process died
    left_ready_at: float | None = None  # monotonic time it last stopped being ready
    n_gpu_layers: int | None = None
    vram_mib: int | None = None
    error: str | None = None
    gpu_warnings: tuple[str, ...] = ()
    model: ModelTarget | None = None  # where model_path led when last accepted
    model_error: str | None = None  # a rejected re-point (the old model keeps serving)
    stopped_by_user: bool = False  # stays stopped, never revived, until started again
    revival: RevivalPlan | None = None  # down for good: when it is started again
    held: str | None = None  # why it is kept stopped for now (its model file being rewritten)

    @property
    def snapshot(self) -> UnitSnapshot | None:
        return self.observed.unit

    @property
    def probe(self) -> ProbeResult | None:
        return self.observed.probe

    def to_status(self) -> ProviderStatus:
        snapshot = self.snapshot
        since: str | None = None
        if (
            snapshot is not None
            and snapshot.active_enter_us
            and self.state not in (ProviderState.STOPPED, ProviderState.FAILED)
        ):
            since = iso_time(snapshot.active_enter_us / 1e6)
        elif self.owned is None and self.state is ProviderState.READY:
            since = iso_time(self.state_since)
        return {
            "name": self.name,
            "owned": self.owned is not None,
            "unit": self.unit,
            "state": self.state.value,
            "pid": snapshot.main_pid if snapshot and snapshot.main_pid else None,
            "since": since,
            "models": list(self.models),
            "probe": probe_status(self.probe, time.monotonic()) if self.probe else None,
            "n_gpu_layers": self.n_gpu_layers,
            "vram_mib": self.vram_mib,
            "gpu_warnings": list(self.gpu_warnings),
            "error": self.held or self.error,
            "type": self.provider.type,
            "base_url": self.provider.base_url,
            "state_since": iso_time(self.state_since),
            "restarts": snapshot.n_restarts if snapshot else None,
            "last_unit_event_monotonic": self.last_unit_event,
            "last_state_change_monotonic": self.last_state_change,
            "last_exit_monotonic": self.last_exit_seen,
            "left_ready_monotonic": self.left_ready_at,
            "models_missing": self.models_missing(),
            "models_extra": self.models_extra(),
            "model_file": None
            if self.model is None
            else {"path": self.model.path, "target": self.model.target, "error": self.model_error},
            "stopped_by_user": self.stopped_by_user,
            "revival": self._revival_status(),
        }

    def _revival_status(self) -> RevivalStatus | None:
        revival = self.revival
        if revival is None:
            return None
        down = self.state in (ProviderState.FAILED, ProviderState.STOPPED)
        next_try = time.time() + max(0.0, revival.due - time.monotonic())
        return {
            "attempts": revival.attempts,
            "next_try": iso_time(next_try) if down else None,
            "last_failure": revival.last_failure,
        }

    def _served_ids(self) -> frozenset[str] | None:
        if self.probe is None or not self.probe.ok:
            return None
        return self.probe.models

    def models_missing(self) -> list[str]:
        """Configured names the provider does not report serving (down for the gateway)."""
        served = self._served_ids()
        if served is None:
            return []
        backend = self.backend_names()
        return [name for name in self.models if backend.get(name, name) not in served]

    def models_extra(self) -> list[str]:
        """What the provider serves beyond its configuration (shown, never routed to)."""
        served = self._served_ids()
        if served is None:
            return []
        return sorted(served - set(self.backend_names().values()))

    def backend_names(self) -> dict[str, str]:
        return {
            name: normalize_model_id(self.provider.type, self.backends.get(name, name))
            for name in self.models
        }


@dataclass
class Job:
    id: str
    kind: str
    params: dict[str, Any]
    started: float = field(default_factory=time.time)
    progress: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "params": self.params,
            "started": iso_time(self.started),
            "finished": self.result is not None,
            "progress": self.progress,
            "result": self.result,
        }


@dataclass
class GpuState:
    plan: GpuPlan | None = None
    plan_at: float = 0.0  # time.monotonic() of the plan in force
    error: str | None = None  # the last NVML failure (the old plan stays)
    reading: GpuSnapshot | None = None

    def to_status(self) -> GpuStatus:
        plan, reading = self.plan, self.reading
        cards: list[CardStatus] = []
        for card in plan.cards if plan else ():
            gpu = reading.gpu(card.index) if reading else None
            cards.append(
                {
                    "index": card.index,
                    "name": gpu.name if gpu else None,
                    "total_mib": card.total_bytes // MIB,
                    "free_mib": gpu.free_bytes // MIB if gpu else None,
                    "others_mib": card.others_bytes // MIB,
                    "budget_mib": card.budget_bytes // MIB,
                    "planned_mib": card.planned_bytes // MIB,
                    "warnings": list(card.warnings),
                }
            )
        return {
            "cpu_only_reason": plan.cpu_only_reason if plan else None,
            "error": self.error,
            "cards": cards,
            "planned_s_ago": round(time.monotonic() - self.plan_at, 1) if plan else None,
        }


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Store:
    config_dir: Path
    unit_context: UnitContext
    started: float = field(default_factory=time.time)
    config: Config | None = None
    report: Report | None = None
    records: dict[str, ProviderRecord] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    written_units: dict[str, str] = field(default_factory=dict)  # unit -> text we last wrote
    rendered_units: list[RenderedUnit] = field(default_factory=list)
    last_reload: ReloadOutcome | None = None
    gpu: GpuState = field(default_factory=GpuState)
    # Providers whose new unit file is written, and the sha256 of that text, until their
    # process runs it: a crash between the write and the restart must not lose the restart.
    pending_rolls: dict[str, str] = field(default_factory=dict)
    expected_stops: set[str] = field(default_factory=set)  # units diversityd itself stops
    draining: set[str] = field(default_factory=set)  # providers out of the routes to stop
    fleet: FleetState = field(default_factory=FleetState)  # peers, as this host sees them
    port_taken: set[str] = field(default_factory=set)  # providers whose port another holds
    # providers restarted on purpose: their names' requests are held this long (seconds)
    # when no other server can take them, until they serve again
    holding: dict[str, float] = field(default_factory=dict)
    kept_gpu_settings: dict[str, GpuSettings] = field(default_factory=dict)  # the last plan's
    gateway_pin: str | None = None  # a rollback's pin, read back at start
    unit_errors: str | None = None  # why the unit files could not be written (retried)
    render_errors: dict[str, str] = field(default_factory=dict)  # unit -> why not rendered
    own_unit_stale: str | None = None  # diversityd.service is older than this version's

    @property
    def catalog(self) -> Catalog:
        assert self.report is not None
        assert self.report.catalog is not None
        return self.report.catalog

    def adopt_config(self, report: Report) -> None:
        """A validated configuration: provider records for every active provider. A record
        kept across reloads is the same object, updated: waiting jobs keep seeing it change."""
        assert report.config is not None
        assert report.catalog is not None
        self.config, self.report = report.config, report
        records: dict[str, ProviderRecord] = {}
        for name, provider in report.config.providers.items():
            if not provider.active:
                continue
            owned = report.config.settings.owned.get(name)
            unit = unit_name(name) if owned else None
            models = report.catalog.models_of(name)
            backends = {
                d.model: d.backend_model
                for deps in report.catalog.deployments.values()
                for d in deps
                if d.provider.name == name
            }
            record = self.records.get(name)
            if record is not None and record.unit == unit:
                record.provider, record.owned = provider, owned
                record.models, record.backends = models, backends
            else:
                record = ProviderRecord(name, provider, owned, unit, models, backends)
            records[name] = record
        self.records = records

    def adopt_persisted(self, state: Persisted) -> None:
        """(After `adopt_config`.) What an earlier daemon decided, for providers that still
        exist; accepted models are used by the link's owner (daemon/models.py). A revival
        keeps its backoff, back on this process's monotonic clock (clamped)."""
        assert self.config is not None
        max_s = self.config.settings.supervision.revive_max_s
        wall_now, monotonic_now = time.time(), time.monotonic()
        for name, record in self.records.items():
            record.stopped_by_user = name in state.stopped_by_user
            saved = state.revivals.get(name)
            record.revival = (
                None
                if saved is None
                else revival_in_memory(
                    saved, wall_now=wall_now, monotonic_now=monotonic_now, max_s=max_s
                )
            )
            record.held = state.held.get(name) if record.owned is not None else None
        self.pending_rolls = {n: sha for n, sha in state.pending_rolls.items() if n in self.records}
        self.kept_gpu_settings = dict(state.gpu_settings)
        self.gateway_pin = state.gateway_pin

    def persisted(self) -> Persisted:
        """What must outlive this daemon (persisted.py), as the state says now."""
        accepted: dict[str, ModelTarget] = {}
        for path, names in self.model_paths().items():
            model = self.records[names[0]].model
            if model is not None and model.ok:
                accepted[path] = model
        wall_now, monotonic_now = time.time(), time.monotonic()
        gpu_settings = dict(self.kept_gpu_settings)
        if self.gpu.plan is not None:
            gpu_settings.update(self.gpu.plan.settings)
        return Persisted(
            accepted_models=accepted,
            pending_rolls=dict(self.pending_rolls),
            stopped_by_user=frozenset(n for n, r in self.records.items() if r.stopped_by_user),
            revivals={
                n: revival_on_disk(r.revival, wall_now=wall_now, monotonic_now=monotonic_now)
                for n, r in self.records.items()
                if r.revival is not None
            },
            held={n: r.held for n, r in self.records.items() if r.held is not None},
            gpu_settings=gpu_settings,
            gateway_pin=self.gateway_pin,
        )

    def record_of_unit(self, unit: str) -> ProviderRecord | None:
        return next((r for r in self.records.values() if r.unit == unit), None)

    def owned_records(self) -> list[ProviderRecord]:
        return [r for r in self.records.values() if r.owned is not None]

    def availability(self) -> Availability:
        """Which providers serve which models right now (input of the gateway render)."""
        up: dict[str, frozenset[str] | None] = {}
        for name, record in self.records.items():
            if name in self.draining:
                continue  # about to be stopped on purpose: no new requests
            if not record.provider.is_local:
                up[name] = None  # clouds: trusted (LiteLLM's cooldowns judge them)
            elif is_serving(record.state):
                up[name] = record.probe.models if record.probe else None
        return Availability(up=up)

    def model_paths(self) -> dict[str, list[str]]:
        """Configured GGUF path -> the owned llama servers that load it."""
        paths: dict[str, list[str]] = {}
        for record in self.records.values():
            owned = record.owned
            if owned and owned.server in LLAMA_SERVER_KINDS and owned.model_path:
                paths.setdefault(os.path.expanduser(owned.model_path), []).append(record.name)
        return paths
