"""diversityd: the daemon. One asyncio task owns all state; everything else sends it events.

`Daemon._state_loop` is the SINGLE WRITER of the daemon's state (provider records, the
configuration in force, the job registry, what was written to disk). Bus callbacks, probe
loops, file watchers, control methods and jobs never assign to that state themselves: they
put events on `Daemon._events`, or hand a function to `in_state_loop` and await its result.
Reading state from other tasks is safe: the loop is single-threaded and the writer never
awaits in the middle of a change. (A `Job`'s own progress list is written by its runner
task alone.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from diversityd import __version__
from diversityd.adapters import probes
from diversityd.adapters.control import ControlInterface, export_interface
from diversityd.adapters.gatewayclient import ask, new_client
from diversityd.adapters.inotify import Inotify, InotifyEvent
from diversityd.adapters.litellm import read_master_key
from diversityd.adapters.modellink import LinkWatcher, ModelTarget, resolve
from diversityd.adapters.notify import Notifier
from diversityd.adapters.nvml import NvmlError, read_gpus
from diversityd.adapters.systemd import Systemd, SystemdError, UnitSnapshot
from diversityd.adapters.unitfiles import machine_context, sync_units
from diversityd.config import Config, OwnedServer, Provider
from diversityd.drill import Answer, DrillMode, DrillReport, overall_ok, unprotected_models
from diversityd.errors import DiversitydError, Severity, UsageError
from diversityd.gateway import Availability, normalize_model_id
from diversityd.gatewaymgr import GatewayManager
from diversityd.gguf import GGUFError, read_model
from diversityd.gpuplan import GpuPlan, GpuSettings, plan_gpus, replan_needed
from diversityd.log import configure_logging, get_logger
from diversityd.parts import default_config_dir, default_unit_dir
from diversityd.state import (
    ProbeResult,
    ProviderState,
    UnitView,
    derive_state,
)
from diversityd.timefmt import iso_time
from diversityd.units import RenderedUnit, UnitContext, render_provider_unit, unit_name
from diversityd.validation import Report, check_config_dir
from diversityd.vram import LLAMA_SERVER_KINDS, GpuSnapshot, ModelSpec, describe_model

log = get_logger()

MIB = 1024 * 1024
NVML_POLL_S = 10.0  # how often free VRAM is read for re-planning
DRILL_CLIENT_TIMEOUT_S = 120.0  # a hung backend costs a request its full timeout first
DRILL_SETTLE_S = 120.0
DRILL_RESTORE_S = 180.0
DRILL_CLEAN_STREAK = 5
KEEP_JOBS = 50
READY_WAIT_S = 300.0  # how long a restart waits for a provider to answer again
STARTING_PROBE_S = 0.1  # probe fast while a provider starts: readiness gates restarts
MAX_BACKOFF_S = 30.0


# ---------------------------------------------------------------------------------------
# Events (the only way into the state loop)


@dataclass(frozen=True)
class UnitChanged:
    unit: str
    changed: dict[str, Any]
    at: float


@dataclass(frozen=True)
class ProbeDone:
    provider: str
    result: ProbeResult
    pid: int  # the main process when the probe was sent: its answer counts for it alone


@dataclass(frozen=True)
class UnitFilesTouched:
    at: float


@dataclass
class Call:
    """Run `action` inside the state loop and hand its result to `future`."""

    action: Callable[[], Any]
    future: asyncio.Future[Any]


Event = UnitChanged | ProbeDone | UnitFilesTouched | Call


# ---------------------------------------------------------------------------------------
# State (written by the state loop only)


@dataclass
class ProviderRecord:
    name: str
    provider: Provider
    owned: OwnedServer | None
    unit: str | None
    models: tuple[str, ...]
    backends: dict[str, str] = field(default_factory=dict)  # served name -> backend's id
    snapshot: UnitSnapshot | None = None
    # property changes that arrived before the first snapshot: (monotonic time, changes)
    early_changes: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    probe: ProbeResult | None = None
    answered_pid: int = -1  # MainPID for which a probe succeeded (-1: none yet)
    state: ProviderState = ProviderState.UNKNOWN
    state_since: float = field(default_factory=time.time)
    last_unit_event: float | None = None  # monotonic time of the last systemd event
    last_state_change: float | None = None  # monotonic time of the last state change
    last_exit_seen: float | None = None  # monotonic time the daemon learnt a process died
    left_ready_at: float | None = None  # monotonic time it last stopped being ready
    failures: int = 0  # consecutive failed probes (backoff)
    n_gpu_layers: int | None = None
    vram_mib: int | None = None
    error: str | None = None
    gpu_warnings: tuple[str, ...] = ()
    model: ModelTarget | None = None  # where model_path led when last accepted
    model_error: str | None = None  # a rejected re-point (the old model keeps serving)

    def unit_view(self) -> UnitView | None:
        return self.snapshot.view() if self.snapshot is not None else None

    def to_json(self) -> dict[str, Any]:
        since: str | None = None
        if (
            self.snapshot is not None
            and self.snapshot.active_enter_us
            and self.state
            not in (
                ProviderState.STOPPED,
                ProviderState.FAILED,
            )
        ):
            since = iso_time(self.snapshot.active_enter_us / 1e6)
        elif self.owned is None and self.state is ProviderState.READY:
            since = iso_time(self.state_since)
        probe: dict[str, Any] | None = None
        if self.probe is not None:
            probe = {
                "outcome": self.probe.outcome.value,
                "ok": self.probe.ok,
                "latency_ms": round(self.probe.latency_ms, 1),
                "error": self.probe.error,
                "age_s": round(time.monotonic() - self.probe.at, 1),
                "models": sorted(self.probe.models) if self.probe.models is not None else None,
            }
        return {
            "name": self.name,
            "owned": self.owned is not None,
            "unit": self.unit,
            "state": self.state.value,
            "pid": self.snapshot.main_pid if self.snapshot and self.snapshot.main_pid else None,
            "since": since,
            "models": list(self.models),
            "probe": probe,
            "n_gpu_layers": self.n_gpu_layers,
            "vram_mib": self.vram_mib,
            "gpu_warnings": list(self.gpu_warnings),
            "error": self.error,
            "type": self.provider.type,
            "base_url": self.provider.base_url,
            "state_since": iso_time(self.state_since),
            "restarts": self.snapshot.n_restarts if self.snapshot else None,
            "last_unit_event_monotonic": self.last_unit_event,
            "last_state_change_monotonic": self.last_state_change,
            "last_exit_monotonic": self.last_exit_seen,
            "left_ready_monotonic": self.left_ready_at,
            "models_missing": self.models_missing(),
            "models_extra": self.models_extra(),
            "model_file": None
            if self.model is None
            else {
                "path": self.model.path,
                "target": self.model.target,
                "error": self.model_error,
            },
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


def _is_ready_since(record: ProviderRecord, since: float) -> bool:
    """Ready, and became so after `since` (a monotonic time): a restart really finished."""
    changed = record.last_state_change
    return record.state is ProviderState.READY and (since == 0.0 or (changed or 0.0) > since)


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


# ---------------------------------------------------------------------------------------


class Daemon:
    def __init__(
        self,
        config_dir: Path,
        *,
        unit_dir: Path | None = None,
        bus_address: str | None = None,
    ) -> None:
        self.config_dir = Path(os.path.realpath(config_dir))
        self.unit_dir_override = unit_dir
        self.bus_address = bus_address
        self.notifier = Notifier()
        self.started = time.time()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._restart_lock = asyncio.Lock()  # restart jobs (user, reload, re-point) never overlap
        self._units_lock = asyncio.Lock()  # plan + render + write: one at a time
        self._sync_lock = asyncio.Lock()  # unit files are written by one task at a time
        self._restore_pending = False
        self._link_watcher: LinkWatcher | None = None
        self._startup_done = asyncio.Event()  # owned units started, watched ones probed
        self.gateway: GatewayManager | None = None
        self.gpu_plan: GpuPlan | None = None
        self.gpu_plan_at = 0.0  # time.monotonic() of the plan in force
        self.gpu_error: str | None = None  # the last NVML failure (the old plan stays)
        self.gpus: GpuSnapshot | None = None
        self._job_ids = itertools.count(1)
        # state (single writer: _state_loop)
        self.config: Config | None = None
        self.report: Report | None = None
        self.records: dict[str, ProviderRecord] = {}
        self.jobs: dict[str, Job] = {}
        self.written_units: dict[str, str] = {}  # unit -> text we last wrote
        self.rendered_units: list[RenderedUnit] = []
        self.last_reload: dict[str, Any] | None = None
        self.systemd: Systemd | None = None
        self.control: ControlInterface | None = None
        self.unit_context: UnitContext = machine_context(sys.executable)

    # -- configuration --------------------------------------------------------------

    def load(self) -> Report:
        return check_config_dir(self.config_dir, os.environ)

    @property
    def unit_dir(self) -> Path:
        if self.unit_dir_override is not None:
            return self.unit_dir_override
        if self.config is not None and self.config.settings.unit_dir:
            return Path(os.path.expanduser(self.config.settings.unit_dir))
        return default_unit_dir()

    def _apply_config(self, report: Report) -> None:
        """Adopt a validated configuration: provider records and rendered units."""
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
                # The same object, updated: jobs waiting on it keep seeing it change.
                record.provider, record.owned = provider, owned
                record.models, record.backends = models, backends
            else:
                record = ProviderRecord(name, provider, owned, unit, models, backends)
            records[name] = record
        self.records = records
        if report.config.settings.gateway.owned and self.gateway is None:
            self.gateway = GatewayManager(self)
        self._render_all()

    def _render_all(self) -> None:
        """Render every owned unit from the configuration, the GPU plan and the model
        files in force. A llama server's unit names the GGUF its link led to when last
        accepted: a refused re-point never reaches a restart, not even systemd's own."""
        config, report = self.config, self.report
        assert config is not None
        assert report is not None
        assert report.catalog is not None
        units = []
        for name, owned in config.settings.owned.items():
            if not config.providers[name].active:
                continue
            gpu = self._gpu_settings(name)
            record = self.records[name]
            record.n_gpu_layers = gpu.n_gpu_layers
            record.vram_mib = gpu.vram_bytes // MIB if gpu.vram_bytes is not None else None
            record.gpu_warnings = gpu.warnings
            model_file = record.model.target if record.model and record.model.ok else None
            units.append(
                render_provider_unit(
                    config,
                    owned,
                    report.catalog.backend_names_of(name),
                    gpu,
                    self.unit_context,
                    model_file=model_file,
                )
            )
        if self.gateway is not None:
            units += self.gateway.units()
        self.rendered_units = units

    def _gpu_settings(self, provider: str) -> GpuSettings:
        """What the GPU plan says for one unit. Before the first plan (or without a GPU):
        the user's own layer count, else the CPU with the GPU hidden, which always fits."""
        if self.gpu_plan is not None and provider in self.gpu_plan.settings:
            return self.gpu_plan.settings_for(provider)
        assert self.config is not None
        owned = self.config.settings.owned[provider]
        user_layers = owned.n_gpu_layers
        if user_layers is None:
            user_layers = self.config.providers[provider].n_gpu_layers
        llama = owned.server in LLAMA_SERVER_KINDS
        return GpuSettings(
            provider=provider,
            n_gpu_layers=(user_layers if user_layers is not None else 0) if llama else None,
            hide_gpu=llama and user_layers is None,
            server=owned.server,
            gpu=owned.gpu,
        )

    # -- the state loop (single writer) -----------------------------------------------

    async def _state_loop(self) -> None:
        while True:
            event = await self._events.get()
            try:
                self._handle(event)
            except Exception as exc:  # noqa: BLE001 - one bad event must not stop the loop
                log.error("daemon.event_failed", error=f"{type(exc).__name__}: {exc}")
            async with self._changed:
                self._changed.notify_all()

    def _handle(self, event: Event) -> None:
        if isinstance(event, UnitChanged):
            self._on_unit_changed(event)
        elif isinstance(event, ProbeDone):
            self._on_probe(event)
        elif isinstance(event, UnitFilesTouched):
            if not self._restore_pending:  # a burst of writes: one check
                self._restore_pending = True
                self._spawn(self._restore_units())
        else:
            try:
                event.future.set_result(event.action())
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                if not event.future.done():
                    event.future.set_exception(exc)

    def _record_of_unit(self, unit: str) -> ProviderRecord | None:
        for record in self.records.values():
            if record.unit == unit:
                return record
        return None

    def _on_unit_changed(self, event: UnitChanged) -> None:
        if self.gateway is not None and event.unit in self.gateway.instance_units():
            self.gateway.on_unit_changed(event.unit, event.changed)
            return
        record = self._record_of_unit(event.unit)
        if record is None:
            return
        if record.snapshot is None:
            # Arrived before the first snapshot was adopted: the newer ones go on top of it.
            record.early_changes.append((event.at, event.changed))
            return
        before_pid = record.snapshot.main_pid
        record.snapshot = record.snapshot.merged(event.changed)
        record.last_unit_event = event.at
        if record.snapshot.main_pid != before_pid:
            record.answered_pid = -1  # a new process has not answered yet
            if before_pid and record.snapshot.main_pid == 0:
                record.last_exit_seen = event.at
                log.warning(
                    "unit.exited",
                    provider=record.name,
                    unit=record.unit,
                    pid=before_pid,
                    result=record.snapshot.result,
                )
        self._update_state(record, event.at)

    def _on_probe(self, event: ProbeDone) -> None:
        record = self.records.get(event.provider)
        if record is None:
            return
        result = event.result
        previous = record.probe
        record.probe = result
        record.failures = 0 if result.ok else record.failures + 1
        current_pid = record.snapshot.main_pid if record.snapshot else 0
        if result.ok:
            if event.pid == current_pid:
                record.answered_pid = current_pid
            record.error = None
        else:
            record.error = result.error
        if (
            self.gateway is not None
            and previous is not None
            and result.ok
            and previous.models != result.models
        ):
            self.gateway.mark_dirty()  # a model appeared or went away: routing may change
        if previous is None or previous.outcome is not result.outcome:
            log.info(
                "probe.changed",
                provider=record.name,
                state=result.outcome.value,
                elapsed_ms=round(result.latency_ms, 1),
                error=result.error,
            )
        self._update_state(record, result.at)

    def _update_state(self, record: ProviderRecord, at: float) -> None:
        answered = (
            record.snapshot is not None
            and record.answered_pid == record.snapshot.main_pid
            and record.snapshot.main_pid != 0
        )
        state = derive_state(
            owned=record.owned is not None,
            unit=record.unit_view(),
            probe=record.probe,
            answered_since_start=answered,
        )
        if state is record.state:
            return
        previous, record.state = record.state, state
        record.state_since = time.time()
        record.last_state_change = at
        if previous is ProviderState.READY:
            record.left_ready_at = at
        if state is ProviderState.FAILED and record.snapshot is not None:
            record.error = f"unit failed ({record.snapshot.result})"
        log_method = (
            log.info if state in (ProviderState.READY, ProviderState.STARTING) else log.warning
        )
        log_method(
            "provider.state",
            provider=record.name,
            unit=record.unit,
            state=state.value,
            previous=previous.value,
            pid=record.snapshot.main_pid if record.snapshot else None,
            error=record.error if state is not ProviderState.READY else None,
        )
        self._after_change()

    def _after_change(self) -> None:
        ready = sum(r.state is ProviderState.READY for r in self.records.values())
        self.notifier.status(f"{ready}/{len(self.records)} providers ready")
        if self.gateway is not None:
            self.gateway.mark_dirty()  # it reloads only if the rendered bytes changed

    def availability(self) -> Availability:
        """Which providers serve which models right now (input of the gateway render)."""
        up: dict[str, frozenset[str] | None] = {}
        for name, record in self.records.items():
            if not record.provider.is_local:
                up[name] = None  # clouds are not probed: trusted until a request fails
            elif record.state is ProviderState.READY:
                up[name] = record.probe.models if record.probe else None
        return Availability(up=up)

    # -- helpers for other tasks --------------------------------------------------------

    async def in_state_loop(self, action: Callable[[], Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._events.put(Call(action, future))
        return await future

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout_s)
            except TimeoutError:
                return False
        return True

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("daemon.task_failed", error=f"{type(exc).__name__}: {exc}")

    # -- probes ---------------------------------------------------------------------------

    def _probe_interval(self, record: ProviderRecord, base: float) -> float:
        if record.state is ProviderState.STARTING:
            return STARTING_PROBE_S
        if record.state in (ProviderState.STOPPED, ProviderState.FAILED):
            return base
        if record.failures:
            # Back off while down, but never slower than MAX_BACKOFF_S.
            return float(min(MAX_BACKOFF_S, base * 2 ** min(record.failures - 1, 5)))
        return base

    async def _probe_loop(self, name: str) -> None:
        client = probes.new_client(5.0)
        try:
            while True:
                assert self.config is not None
                settings = self.config.settings  # read each round: a reload may change it
                record = self.records.get(name)
                if record is None:
                    return
                if record.owned is not None and record.state is ProviderState.STOPPED:
                    await asyncio.sleep(settings.probe_interval_s)
                    continue
                pid = record.snapshot.main_pid if record.snapshot else 0
                try:
                    result = await probes.probe(client, record.provider, settings.probe_timeout_s)
                except Exception as exc:  # noqa: BLE001 - one odd answer must not end probing
                    log.error("probe.failed", provider=name, error=f"{type(exc).__name__}: {exc}")
                else:
                    await self._events.put(ProbeDone(name, result, pid))
                await asyncio.sleep(self._probe_interval(record, settings.probe_interval_s))
        finally:
            await client.aclose()

    # -- units ------------------------------------------------------------------------------

    def on_systemd_change(self, unit: str, changed: dict[str, Any]) -> None:
        """From the bus reader: every property change of a watched unit, as an event."""
        self._events.put_nowait(UnitChanged(unit, changed, time.monotonic()))

    async def _sync_unit_files(self) -> list[str]:
        """Write our unit files where they differ; daemon-reload only when one changed.
        Returns the providers whose file diversityd rewrote (a hand edit put back is not
        one: whatever runs was started from our file or by the user on purpose)."""
        async with self._sync_lock:
            return await self._sync_unit_files_locked()

    async def _sync_unit_files_locked(self) -> list[str]:
        rendered = list(self.rendered_units)
        result = sync_units(
            self.unit_dir, rendered, previous=self.written_units or None, remove_stale=True
        )
        await self.in_state_loop(
            lambda: setattr(self, "written_units", {u.name: u.text for u in rendered})
        )
        for name in result.foreign:
            log.warning(
                "unit.foreign",
                unit=name,
                error="a unit file of this name exists without diversityd's marker; left alone",
            )
        for name in result.restored:
            log.warning("unit.restored", unit=name, path=str(self.unit_dir / name))
        for name in result.written:
            log.info("unit.written", unit=name, path=str(self.unit_dir / name))
        for name in result.removed:
            log.info("unit.removed", unit=name)
        if result.changed and self.systemd is not None:
            await self.systemd.reload_manager()
            log.info("systemd.reloaded")
        providers = {u.name: u.provider for u in rendered if u.provider}
        return [providers[name] for name in result.written if name in providers]

    async def _refresh_snapshots(
        self, *, only_missing: bool = False, only: list[str] | None = None
    ) -> None:
        """Read each owned unit's state from systemd (all, those without one yet, or the
        providers in `only`): the truth after a daemon restart or a unit file written."""
        assert self.systemd is not None
        for record in list(self.records.values()):
            if record.unit is None or (only_missing and record.snapshot is not None):
                continue
            if only is not None and record.name not in only:
                continue
            snapshot = await self.systemd.snapshot(record.unit)
            taken_at = time.monotonic()

            def adopt(
                r: ProviderRecord = record, s: UnitSnapshot = snapshot, t: float = taken_at
            ) -> None:
                for at, changed in r.early_changes:
                    if at > t:  # sent after systemd answered GetAll: newer than the snapshot
                        s = s.merged(changed)
                r.early_changes.clear()
                r.snapshot = s
                self._update_state(r, time.monotonic())

            await self.in_state_loop(adopt)

    async def _restore_units(self) -> None:
        await asyncio.sleep(0.05)  # let a burst of writes settle
        await self.in_state_loop(functools.partial(setattr, self, "_restore_pending", False))
        await self._sync_unit_files()

    async def _find_port_holders(self) -> set[str]:
        """A unit of another name (or a stray process) holding an owned provider's port is
        reported, not touched; diversityd then does not start its own unit there."""
        assert self.systemd is not None
        ports = {r.provider.address[1]: r for r in self.records.values() if r.owned is not None}
        conflicts: set[str] = set()
        try:
            connections = psutil.net_connections(kind="tcp")
        except (psutil.AccessDenied, OSError):
            return conflicts
        for conn in connections:
            if conn.status != psutil.CONN_LISTEN or not conn.laddr:
                continue
            record = ports.get(conn.laddr.port)
            if record is None:
                continue
            if conn.pid is None:  # another user's process (a system-wide ollama.service)
                holder: str | None = "another user's process"
            else:
                holder = await self.systemd.unit_of_pid(conn.pid)
            if holder != record.unit:
                conflicts.add(record.name)
                message = (
                    f"port {conn.laddr.port} of {record.name} is held by "
                    f"{holder or 'a process outside any unit'} (pid {conn.pid or 'unknown'}), "
                    "which diversityd does not own"
                )
                await self.in_state_loop(functools.partial(setattr, record, "error", message))
                log.warning(
                    "unit.port_conflict",
                    provider=record.name,
                    unit=holder,
                    pid=conn.pid,
                    error=f"{message}; stop and disable it, or set owned: false",
                )
        return conflicts

    async def _supervise_gateway(self, gateway: GatewayManager) -> None:
        """The gateway loop must outlive a failed systemd call: log it, wait, go on."""
        while True:
            try:
                await gateway.run(self._startup_done)
            except Exception as exc:  # noqa: BLE001 - restarted after a pause, never lost
                log.error("gateway.loop_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(5)

    async def _start_then_mark_ready(self) -> None:
        try:
            await self._start_owned()
        except Exception as exc:  # noqa: BLE001 - the gateway must still come up
            log.error("daemon.start_failed", error=f"{type(exc).__name__}: {exc}")
        await self.wait_until(
            lambda: all(r.probe is not None for r in self.records.values() if r.owned is None),
            10.0,
        )
        self._startup_done.set()

    async def _start_owned(self, only: list[str] | None = None) -> None:
        """Start owned units that are not running (or just `only`), one at a time, each
        until ready.

        A unit that is active, activating or waiting for systemd's Restart= is left alone:
        after a daemon restart, state comes from systemd and nothing is started twice. A
        provider whose port another unit holds is not started (it could not bind)."""
        assert self.systemd is not None
        conflicts = await self._find_port_holders()
        order = sorted(
            (
                r
                for r in self.records.values()
                if r.owned is not None and (only is None or r.name in only)
            ),
            key=lambda r: (-(r.owned.vram_priority if r.owned else 0), r.name),
        )
        for record in order:
            snapshot = record.snapshot
            if snapshot is None or record.unit is None or record.name in conflicts:
                continue
            if snapshot.active_state in ("active", "activating", "reloading"):
                continue
            if snapshot.active_state == "failed":
                await self.systemd.reset_failed(record.unit)
            log.info("unit.starting", provider=record.name, unit=record.unit)
            try:
                result = await self.systemd.start(record.unit)
            except SystemdError as exc:
                log.error(
                    "unit.start_failed", provider=record.name, unit=record.unit, error=str(exc)
                )
                continue
            if result != "done":
                log.error("unit.start_failed", provider=record.name, unit=record.unit, error=result)
                continue
            ready = await self.wait_until(
                functools.partial(_is_ready_since, record, 0.0), READY_WAIT_S
            )
            log.info(
                "unit.started",
                provider=record.name,
                unit=record.unit,
                state=record.state.value,
                error=None if ready else "not ready in time",
            )

    # -- the GPU plan ---------------------------------------------------------------------------

    def _plan_inputs(self) -> tuple[dict[str, str | None], dict[str, int]]:
        """(In the state loop.) Each owned llama server's accepted GGUF (or why there is
        none) and each running owned unit's main pid: plain data for a worker thread."""
        models: dict[str, str | None] = {}
        for names in self._model_paths().values():
            target = self.records[names[0]].model
            for name in names:
                models[name] = target.target if target is not None and target.ok else None
        pids = {
            name: record.snapshot.main_pid
            for name, record in self.records.items()
            if record.owned is not None and record.snapshot is not None and record.snapshot.main_pid
        }
        return models, pids

    @staticmethod
    def _read_plan_inputs(
        models: dict[str, str | None], main_pids: dict[str, int]
    ) -> tuple[dict[str, ModelSpec | str], dict[str, list[int]]]:
        """(In a worker thread.) Describe the GGUFs; find every pid of each owned unit:
        NVML lists Ollama's runners and vLLM's engine core (children), and those are ours."""
        described: dict[str, ModelSpec | str] = {}
        cache: dict[str, ModelSpec | str] = {}
        for name, path in models.items():
            if path is None:
                described[name] = "no accepted model file"
                continue
            if path not in cache:
                try:
                    cache[path] = describe_model(read_model(path))
                except (GGUFError, OSError) as exc:
                    cache[path] = str(exc)
            described[name] = cache[path]
        pids: dict[str, list[int]] = {}
        for name, main in main_pids.items():
            try:
                children = psutil.Process(main).children(recursive=True)
            except psutil.Error:
                children = []
            pids[name] = [main, *(child.pid for child in children)]
        return described, pids

    async def _read_gpus(self) -> GpuSnapshot | None:
        """One NVML reading; None when NVML fails (the plan in force stays, the error is
        shown by its NVML name and logged once)."""
        try:
            return await asyncio.to_thread(read_gpus)
        except NvmlError as exc:
            failure = f"{exc.name}: {exc}"
            if failure != self.gpu_error:
                log.error("gpu.nvml_failed", error=failure, state="keeping the last plan")
            await self.in_state_loop(functools.partial(setattr, self, "gpu_error", failure))
            return None

    async def _plan_gpus(self, reason: str) -> None:
        """Read NVML and the models, plan every card. An NVML failure keeps the plan in
        force (and is reported by its NVML name)."""
        config = self.config
        assert config is not None
        snapshot = await self._read_gpus()
        if snapshot is None:
            return
        models, main_pids = await self.in_state_loop(self._plan_inputs)
        described, pids = await asyncio.to_thread(self._read_plan_inputs, models, main_pids)
        plan = plan_gpus(config, described, snapshot, pids, previous=self.gpu_plan)

        def adopt() -> None:
            if self.config is not config:
                return  # a reload came in meanwhile: its own plan follows
            if self.gpu_plan is None and plan.cpu_only_reason:
                log.info("gpu.cpu_only", error=plan.cpu_only_reason)
            self.gpu_plan, self.gpu_plan_at = plan, time.monotonic()
            self.gpus, self.gpu_error = snapshot, None

        await self.in_state_loop(adopt)
        for name, settings in plan.settings.items():
            log.info(
                "gpu.planned",
                provider=name,
                state=reason,
                n_gpu_layers=settings.n_gpu_layers,
                vram_mib=settings.vram_bytes // MIB if settings.vram_bytes else None,
                error="; ".join(settings.warnings) or None,
            )

    async def _refresh_units(
        self, reason: str, *, replan: bool = True
    ) -> tuple[list[str], str | None]:
        """The one path by which a configuration, model or VRAM change reaches the servers:
        plan (when asked), render every unit, write the files that changed, and roll the
        running units whose file diversityd rewrote, one at a time. Returns the providers
        whose unit file was written and the restart job, if any."""
        async with self._units_lock:
            if replan:
                await self._plan_gpus(reason)
            await self.in_state_loop(self._render_all)
            written = await self._sync_unit_files()
            if written:
                # A unit file that did not exist (or changed) is (re)loaded by systemd:
                # read its state afresh, signals do not carry LoadState.
                await self._refresh_snapshots(only=written)
        job_id = await self._restart_running(written, reason) if written else None
        return written, job_id

    async def _restart_running(self, providers: list[str], reason: str) -> str | None:
        """Roll the given units that run (a stopped one picks its new file up on start)."""
        running = [
            name
            for name in providers
            if (record := self.records.get(name)) is not None
            and record.snapshot is not None
            and record.snapshot.active_state in ("active", "activating")
        ]
        if not running:
            return None
        job_id: str = await self.in_state_loop(
            lambda: self._start_job("restart", {"providers": running, "reason": reason})
        )
        return job_id

    async def _gpu_loop(self) -> None:
        """Re-plan when the VRAM used by others moves enough to matter (hysteresis: no
        restart storms), never while one of our GPU servers is starting or stopping."""
        while True:
            await asyncio.sleep(NVML_POLL_S)
            try:
                await self._check_vram()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad look
                log.error("gpu.check_failed", error=f"{type(exc).__name__}: {exc}")

    async def _check_vram(self) -> None:
        plan = self.gpu_plan
        if plan is None or plan.cpu_only_reason or self._restart_lock.locked():
            return
        if any(r.owned and r.state is ProviderState.STARTING for r in self.records.values()):
            return
        snapshot = await self._read_gpus()
        if snapshot is None:
            return
        _models, main_pids = await self.in_state_loop(self._plan_inputs)
        _described, pids = await asyncio.to_thread(self._read_plan_inputs, {}, main_pids)
        decision = replan_needed(plan, snapshot, pids, time.monotonic() - self.gpu_plan_at)
        await self.in_state_loop(functools.partial(setattr, self, "gpus", snapshot))
        if decision.replan:
            await self._refresh_units(decision.reason)

    def gpu_status(self) -> dict[str, Any]:
        plan, snapshot = self.gpu_plan, self.gpus
        cards = []
        for card in plan.cards if plan else ():
            reading = snapshot.gpu(card.index) if snapshot else None
            cards.append(
                {
                    "index": card.index,
                    "name": reading.name if reading else None,
                    "total_mib": card.total_bytes // MIB,
                    "free_mib": reading.free_bytes // MIB if reading else None,
                    "others_mib": card.others_bytes // MIB,
                    "budget_mib": card.budget_bytes // MIB,
                    "planned_mib": card.planned_bytes // MIB,
                    "warnings": list(card.warnings),
                }
            )
        return {
            "cpu_only_reason": plan.cpu_only_reason if plan else None,
            "error": self.gpu_error,
            "cards": cards,
            "planned_s_ago": round(time.monotonic() - self.gpu_plan_at, 1) if plan else None,
        }

    # -- the active model link --------------------------------------------------------------

    def _model_paths(self) -> dict[str, list[str]]:
        """Configured GGUF path -> the owned llama servers that load it."""
        paths: dict[str, list[str]] = {}
        for record in self.records.values():
            owned = record.owned
            if owned and owned.server in LLAMA_SERVER_KINDS and owned.model_path:
                paths.setdefault(os.path.expanduser(owned.model_path), []).append(record.name)
        return paths

    async def _watch_models(self) -> None:
        """Resolve each model path (the model in force) and watch every hop of its chain."""
        for path, names in self._model_paths().items():
            target = await asyncio.to_thread(resolve, path)

            def adopt(t: ModelTarget = target, providers: list[str] = names) -> None:
                for name in providers:
                    self.records[name].model = t
                    self.records[name].model_error = t.error

            await self.in_state_loop(adopt)
            if self._link_watcher is not None:
                self._link_watcher.watch(target)
            if not target.ok:
                log.error("model.invalid", path=path, error=target.error)

    def _on_model_link_changed(self, path: str) -> None:
        self._spawn(self._check_model_link(path))

    async def _check_model_link(self, path: str) -> None:
        """The link (or a hop, or the file) changed: accept a good new target and restart the
        servers one at a time; refuse a bad one and keep serving the old model."""
        names = self._model_paths().get(path, [])
        if not names:
            return
        target = await asyncio.to_thread(resolve, path)
        if self._link_watcher is not None:
            self._link_watcher.watch(target)  # a new chain may pass through new folders
        current = self.records[names[0]].model
        if not target.ok:

            def refuse(error: str | None = target.error) -> None:
                for name in names:
                    self.records[name].model_error = error

            await self.in_state_loop(refuse)
            log.error(
                "model.rejected",
                path=path,
                model=target.target,
                provider=",".join(names),
                error=f"{target.error}; the servers keep the model they run",
            )
            return
        unchanged = current is not None and (current.target, current.identity) == (
            target.target,
            target.identity,
        )

        def accept() -> None:
            for name in names:
                self.records[name].model = target
                self.records[name].model_error = None

        await self.in_state_loop(accept)
        if unchanged:
            return
        # The units name the accepted file, so they change; the new model's size moves the
        # card's budget, so plan again first. Then the servers roll one at a time.
        _, job_id = await self._refresh_units("model link re-pointed")
        log.info(
            "model.changed",
            path=path,
            model=target.target,
            provider=",".join(names),
            job=job_id,
        )

    # -- control ----------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        return {
            "daemon": {
                "running": True,
                "pid": os.getpid(),
                "version": __version__,
                "since": iso_time(self.started),
                "config_dir": str(self.config_dir),
                "unit_dir": str(self.unit_dir),
                "host": self.config.settings.host if self.config else socket.gethostname(),
                "last_reload": self.last_reload,
                "jobs_running": [j.id for j in self.jobs.values() if j.result is None],
            },
            "providers": [record.to_json() for record in self.records.values()],
            "gpus": self.gpu_status(),
            "gateway": self.gateway.record.to_json()
            if self.gateway is not None
            else {"owned": False, "state": "unknown"},
        }

    async def reload(self) -> dict[str, Any]:
        """Validate the configuration on disk; adopt it only when it is sound."""
        report = self.load()
        if not report.ok:
            errors = [f.to_json() for f in report.of(Severity.ERROR)]
            rejected = {"ok": False, "at": iso_time(time.time()), "errors": errors}
            await self.in_state_loop(lambda: setattr(self, "last_reload", rejected))
            log.error(
                "config.rejected",
                path=str(self.config_dir),
                error="; ".join(f.format().splitlines()[0] for f in report.of(Severity.ERROR)),
            )
            return {"ok": False, "errors": errors, "warnings": []}
        assert self.systemd is not None
        before = {r.name: r.unit for r in self.records.values() if r.unit}
        await self.in_state_loop(lambda: self._apply_config(report))
        after = {r.name: r.unit for r in self.records.values() if r.unit}
        for name, unit in before.items():
            if after.get(name) != unit:
                # No longer ours to run: stop it before its file goes.
                log.info("unit.stopping", provider=name, unit=unit, state="no longer owned")
                await self.systemd.stop(unit)
        await self.systemd.watch(list(after.values()), self.on_systemd_change)
        await self._refresh_snapshots(only_missing=True)
        await self._watch_models()
        written, job_id = await self._refresh_units("configuration reloaded")
        if self.gateway is not None:
            await self.in_state_loop(self.gateway.unpin)
        self._ensure_probe_tasks()
        added = [name for name in after if name not in before]
        if added:
            self._spawn(self._start_owned(only=added))
        adopted = {
            "ok": True,
            "at": iso_time(time.time()),
            "changed": written,
            "started": added,
            "job": job_id,
        }
        await self.in_state_loop(lambda: setattr(self, "last_reload", adopted))
        log.info("config.reloaded", path=str(self.config_dir), job=job_id)
        return {
            "ok": True,
            "errors": [],
            "warnings": [f.to_json() for f in report.of(Severity.WARNING)],
            "restarting": written,
            "starting": added,
            "job": job_id,
        }

    def _owned_names(self, provider: str, verb: str) -> list[str]:
        """`provider`, checked to be one diversityd owns; or every owned one."""
        if provider:
            record = self.records.get(provider)
            if record is None:
                raise UsageError(
                    f"unknown provider {provider!r}", hint=f"one of: {', '.join(self.records)}"
                )
            if record.owned is None:
                raise UsageError(f"{provider} is watched, not owned: diversityd cannot {verb} it")
            return [provider]
        names = [r.name for r in self.records.values() if r.owned is not None]
        if not names:
            raise UsageError(
                f"diversityd owns no provider to {verb}",
                hint="list some under `providers:` in diversityd.yaml",
            )
        return names

    async def restart(self, provider: str) -> dict[str, Any]:
        names = self._owned_names(provider, "restart")
        job_id = await self.in_state_loop(lambda: self._start_job("restart", {"providers": names}))
        return {"job": job_id, "providers": names}

    async def history(self) -> dict[str, Any]:
        if self.gateway is None:
            raise UsageError("the gateway is not owned by diversityd (gateway.owned: false)")
        return {"history": self.gateway.history(), "pinned": self.gateway.record.pinned}

    async def rollback(self, entry_id: str) -> dict[str, Any]:
        """A job: a new proxy takes ~12 s to start, longer than a D-Bus call should wait."""
        if self.gateway is None:
            raise UsageError("the gateway is not owned by diversityd (gateway.owned: false)")
        entry = self.gateway.files.find(entry_id)  # refuse an unknown id at once
        if entry is None:
            raise UsageError(
                f"no gateway config {entry_id!r} in {self.gateway.files.history_dir}",
                hint="list them with `diversityctl history`",
            )
        job_id = await self.in_state_loop(lambda: self._start_job("rollback", {"id": entry.id}))
        return {"job": job_id, "id": entry.id}

    async def failover_test(self, provider: str, mode: str, force: bool) -> dict[str, Any]:
        """Start a drill (a job). Refused, saying why, when it would leave a model with no
        live fallback, unless forced."""
        try:
            drill_mode = DrillMode(mode)
        except ValueError:
            raise UsageError(f"unknown mode {mode!r}", hint="use kill, stop or hang") from None
        if self.gateway is None or self.config is None or self.report is None:
            raise UsageError("a drill goes through the gateway, which diversityd does not own")
        names = self._owned_names(provider, "drill")
        assert self.report.catalog is not None
        availability = self.availability()
        exposed = {
            name: models
            for name in names
            if (models := unprotected_models(self.config, self.report.catalog, availability, name))
        }
        if exposed and not force:
            detail = "; ".join(f"{p}: {', '.join(m)}" for p, m in exposed.items())
            raise UsageError(
                f"a drill would leave models with no live fallback ({detail}): their "
                "requests would fail",
                hint="give them a fallback chain in model-mappings.yaml, drill another "
                "provider, or pass --force",
            )
        params = {"providers": names, "mode": drill_mode.value}
        job_id = await self.in_state_loop(lambda: self._start_job("failover", params))
        return {"job": job_id, "providers": names, "mode": drill_mode.value}

    async def job(self, job_id: str) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is None:
            raise UsageError(f"no job {job_id!r}")
        return job.to_json()

    def _start_job(self, kind: str, params: dict[str, Any]) -> str:
        job = Job(id=f"{kind}-{next(self._job_ids)}", kind=kind, params=params)
        self.jobs[job.id] = job
        runner = {
            "restart": self._run_restart_job,
            "failover": self._run_failover_job,
            "rollback": self._run_rollback_job,
        }[kind]
        finished = [j for j in self.jobs.values() if j.result is not None]
        for old in finished[: max(0, len(finished) - KEEP_JOBS)]:
            del self.jobs[old.id]  # the registry keeps the latest finished jobs only
        self._spawn(self._run_job(job, runner))
        return job.id

    async def _run_job(self, job: Job, runner: Callable[[Job], Awaitable[dict[str, Any]]]) -> None:
        try:
            result = await runner(job)
        except Exception as exc:  # noqa: BLE001 - reported as the job's result
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        job.result = result
        if self.control is not None:
            self.control.JobFinished(job.id, json.dumps(job.to_json()))

    def _report_progress(self, job: Job, payload: dict[str, Any]) -> None:
        job.progress.append(payload)
        if self.control is not None:
            self.control.JobProgress(job.id, json.dumps(payload))

    async def _run_restart_job(self, job: Job) -> dict[str, Any]:
        async with self._restart_lock:
            return await self._rolling_restart(job)

    async def _rolling_restart(self, job: Job) -> dict[str, Any]:
        """Restart providers one at a time, each until it answers again, so the others keep
        serving; stop at the first one that does not come back."""
        assert self.systemd is not None
        results: list[dict[str, Any]] = []
        for name in job.params["providers"]:
            record = self.records.get(name)
            if record is None or record.unit is None:
                continue
            self._report_progress(job, {"provider": name, "step": "restarting"})
            started = time.monotonic()
            log.info("unit.restarting", provider=name, unit=record.unit, job=job.id)
            try:
                outcome = await self.systemd.restart(record.unit)
            except SystemdError as exc:
                outcome = str(exc)
            ready = outcome == "done" and await self.wait_until(
                functools.partial(_is_ready_since, record, started), READY_WAIT_S
            )
            elapsed_ms = round((time.monotonic() - started) * 1000, 1)
            entry = {
                "provider": name,
                "unit": record.unit,
                "ok": ready,
                "elapsed_ms": elapsed_ms,
                "state": record.state.value,
                "systemd_job": outcome,
            }
            results.append(entry)
            self._report_progress(job, {"step": "done", **entry})
            log.info(
                "unit.restarted" if ready else "unit.restart_failed",
                provider=name,
                unit=record.unit,
                elapsed_ms=elapsed_ms,
                state=record.state.value,
                job=job.id,
            )
            if not ready:
                break
        return {"ok": bool(results) and all(r["ok"] for r in results), "providers": results}

    # -- failover drills -------------------------------------------------------------------------

    async def _run_rollback_job(self, job: Job) -> dict[str, Any]:
        assert self.gateway is not None
        return await self.gateway.rollback(job.params["id"])

    async def _run_failover_job(self, job: Job) -> dict[str, Any]:
        """One drill per provider, in turn; units are not restarted by anything else meanwhile."""
        mode = DrillMode(job.params["mode"])
        reports: list[DrillReport] = []
        async with self._restart_lock:
            for name in job.params["providers"]:
                report = await self._drill(job, name, mode)
                reports.append(report)
                self._report_progress(job, {"step": "drilled", **report.to_json()})
        return {"drills": [r.to_json() for r in reports], "ok": overall_ok(reports)}

    def _gateway_settled(self) -> bool:
        gateway = self.gateway
        return (
            gateway is not None
            and gateway.record.in_sync
            and not gateway.record.reloading
            and gateway.record.state() == "ready"
        )

    async def _drill(self, job: Job, name: str, mode: DrillMode) -> DrillReport:
        assert self.systemd is not None
        assert self.gateway is not None
        record = self.records[name]
        unit = record.unit
        assert unit is not None
        gateway = self.gateway
        if not await self.wait_until(
            lambda: self._gateway_settled() and record.state is ProviderState.READY, 180
        ):
            return DrillReport(name, mode, (), time.monotonic(), False, "not ready to drill")
        plan = gateway.record.plan
        models = [m for m in record.models if plan is not None and m in plan.served_by]
        try:
            key = await asyncio.to_thread(read_master_key, gateway.key_file)
        except (ValueError, OSError) as exc:
            return DrillReport(name, mode, (), time.monotonic(), False, str(exc))
        answers: list[Answer] = []
        stop = asyncio.Event()

        async def send(model: str) -> None:
            async with new_client(DRILL_CLIENT_TIMEOUT_S) as client:
                stream = False
                while not stop.is_set():
                    stream = not stream  # plain and streaming, in turn
                    answers.append(await ask(client, gateway.record.url, key, model, stream=stream))
                    await asyncio.sleep(0.05)

        senders = [asyncio.ensure_future(send(model)) for model in models]
        error: str | None = None
        restored = False
        put_back = mode is DrillMode.KILL  # systemd's Restart= brings a killed one back
        taken_down_at = time.monotonic()
        try:
            await asyncio.sleep(1.0)  # a baseline through the healthy provider
            self._report_progress(job, {"provider": name, "step": "taking down", "mode": mode})
            log.warning("drill.takedown", provider=name, unit=unit, state=mode.value, job=job.id)
            taken_down_at = time.monotonic()
            if mode is DrillMode.KILL:
                await self.systemd.kill(unit, int(signal.SIGKILL))
            elif mode is DrillMode.STOP:
                await self.systemd.stop(unit)
            else:
                await self.systemd.kill(unit, int(signal.SIGSTOP))
            await self._wait_drill_settled(record, answers, taken_down_at, mode)
            self._report_progress(job, {"provider": name, "step": "restoring"})
            await self._put_back(unit, mode)
            put_back = True
            restored = await self.wait_until(
                lambda: (
                    record.state is ProviderState.READY
                    and self._gateway_settled()
                    and plan is not None
                    and gateway.record.plan is not None
                    and all(name in gateway.record.plan.served_by.get(m, ()) for m in models)
                ),
                DRILL_RESTORE_S,
            )
            await asyncio.sleep(1.0)  # and it serves again through the gateway
        except (SystemdError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            stop.set()
            if not put_back:
                # Cancelled or failed half-way: never leave a provider stopped or frozen.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._put_back(unit, mode))
            await asyncio.gather(*senders, return_exceptions=True)
        report = DrillReport(name, mode, tuple(answers), taken_down_at, restored, error)
        log.info(
            "drill.finished",
            provider=name,
            state=mode.value,
            job=job.id,
            error=error or (f"{len(report.failed)} requests failed" if report.failed else None),
        )
        return report

    async def _put_back(self, unit: str, mode: DrillMode) -> None:
        assert self.systemd is not None
        if mode is DrillMode.STOP:
            await self.systemd.start(unit)
        elif mode is DrillMode.HANG:
            await self.systemd.kill(unit, int(signal.SIGCONT))

    async def _wait_drill_settled(
        self, record: ProviderRecord, answers: list[Answer], since: float, mode: DrillMode
    ) -> None:
        """Until the gateway stopped trying the dead provider: the daemon has seen it down
        (a killed one may already be back), the gateway's config is in sync, and the last
        few answers needed no fallback."""
        deadline = time.monotonic() + DRILL_SETTLE_S
        seen_down = False
        while time.monotonic() < deadline:
            seen_down = seen_down or record.state is not ProviderState.READY
            recent = [a for a in answers if a.started > since][-DRILL_CLEAN_STREAK:]
            if (
                (seen_down or mode is DrillMode.KILL)
                and self._gateway_settled()
                and len(recent) == DRILL_CLEAN_STREAK
                and all(a.ok and a.attempted_fallbacks == 0 for a in recent)
            ):
                return
            await asyncio.sleep(0.2)

    # -- lifecycle ------------------------------------------------------------------------------

    def _ensure_probe_tasks(self) -> None:
        running = {t.get_name() for t in self._tasks}
        for name, record in self.records.items():
            if (
                record.provider.type in ("ollama", "llama_cpp", "vllm")
                and f"probe:{name}" not in running
            ):
                self._spawn(self._probe_loop(name)).set_name(f"probe:{name}")

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval / 3)

    async def run(self) -> int:
        report = self.load()
        if not report.ok:
            for finding in report.of(Severity.ERROR):
                log.error("config.invalid", error=finding.format())
            self.notifier.send("STATUS=invalid configuration; see the journal")
            return 2
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        state_task = self._spawn(self._state_loop())
        await self.in_state_loop(lambda: self._apply_config(report))
        self.systemd = await Systemd.connect(self.bus_address)
        owned_units = [r.unit for r in self.records.values() if r.unit]
        await self.systemd.watch(owned_units, self.on_systemd_change)
        await self._refresh_snapshots(only_missing=False)
        inotify = Inotify(self._on_unit_dir_event)
        inotify.watch_directory(self.unit_dir, create=True)
        inotify.start(loop)
        self._link_watcher = LinkWatcher(self._on_model_link_changed)
        self._link_watcher.start(loop)
        await self._watch_models()
        # Units are written once the models are resolved and the GPU planned: a daemon
        # restart renders the same bytes, writes nothing and restarts nothing.
        await self._refresh_units("start-up")
        self.control = ControlInterface(
            {
                "status": self.status,
                "reload": self.reload,
                "restart": self.restart,
                "job": self.job,
                "history": self.history,
                "rollback": self.rollback,
                "failover_test": self.failover_test,
            }
        )
        await export_interface(self.systemd.bus, self.control)
        self._ensure_probe_tasks()
        self._spawn(self._watchdog_loop())
        self._spawn(self._gpu_loop())
        self._spawn(self._start_then_mark_ready())
        if self.gateway is not None:
            self._spawn(self._supervise_gateway(self.gateway)).set_name("gateway")
        log.info(
            "daemon.ready",
            path=str(self.config_dir),
            unit=str(self.unit_dir),
            pid=os.getpid(),
        )
        self.notifier.ready(f"watching {len(self.records)} providers")
        lost_bus = asyncio.ensure_future(self.systemd.bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        stopped = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({lost_bus, stopped}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if lost_bus.done() and not stopped.done():
            # Blind without the bus (no unit events, no control): let systemd restart us.
            log.error("daemon.bus_lost", error="the user bus connection closed")
            code = 1
        stopped.cancel()
        lost_bus.cancel()
        self.notifier.stopping()
        log.info("daemon.stopping", pid=os.getpid())
        inotify.close()
        self._link_watcher.close()
        state_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            self.systemd.disconnect()
        return code

    def _on_unit_dir_event(self, event: InotifyEvent) -> None:
        if event.name in self.written_units:
            self._events.put_nowait(UnitFilesTouched(time.monotonic()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="diversityd",
        description="Keep the local LLM servers and their LiteLLM gateway alive "
        "(runs as a systemd user service; see `diversityctl install`).",
    )
    parser.add_argument(
        "--config-dir",
        type=Path,
        default=os.environ.get("DIVERSITYD_CONFIG_DIR") or None,
        help="directory holding providers.yaml, model-mappings.yaml and diversityd.yaml "
        "[default: $XDG_CONFIG_HOME/diversityd]",
    )
    parser.add_argument("--unit-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--version", action="version", version=f"diversityd {__version__}")
    args = parser.parse_args(argv)
    configure_logging(level=args.log_level)
    daemon = Daemon(args.config_dir or default_config_dir(), unit_dir=args.unit_dir)
    try:
        code = asyncio.run(daemon.run())
    except DiversitydError as exc:
        log.error("daemon.failed", error=str(exc))
        code = exc.exit_code
    sys.exit(code)


if __name__ == "__main__":
    main()
