"""Unit files and rollout: render every owned unit, write the files that changed (putting
hand edits back), start what should run, and roll changed units one at a time, each until
it answers again, so the others keep serving."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from diversityd.adapters.inotify import InotifyEvent
from diversityd.adapters.systemd import Systemd, SystemdError
from diversityd.adapters.unitfiles import sync_units
from diversityd.daemon.gpus import GpuPlanner
from diversityd.daemon.jobs import Jobs
from diversityd.daemon.loop import StateLoop
from diversityd.daemon.providers import ProviderSupervisor
from diversityd.daemon.store import MIB, Job, ProviderRecord, Store
from diversityd.gpuplan import unit_gpu_settings
from diversityd.log import get_logger
from diversityd.reconcile import StartCandidate, is_ready_since, start_order, units_to_roll
from diversityd.units import RenderedUnit, render_provider_unit

log = get_logger()

READY_WAIT_S = 300.0  # how long a start or restart waits for a provider to answer
RESTORE_SETTLE_S = 0.05  # let a burst of writes to the unit folder settle


class Rollout:
    def __init__(
        self,
        loop: StateLoop,
        store: Store,
        systemd: Systemd,
        *,
        supervisor: ProviderSupervisor,
        planner: GpuPlanner,
        jobs: Jobs,
        unit_dir: Path,
        own_units: Callable[[], list[RenderedUnit]],
    ) -> None:
        self.loop = loop
        self.store = store
        self.systemd = systemd
        self.supervisor = supervisor
        self.planner = planner
        self.jobs = jobs
        self.unit_dir = unit_dir
        self._own_units = own_units  # diversityd's own (the gateway's), beside the providers'
        # Restart jobs and drills never overlap: a drill's take-down must not meet a restart.
        self.rolling = asyncio.Lock()
        # Unit files are planned, rendered and written by one task at a time.
        self._files = asyncio.Lock()
        self._restore_wanted = asyncio.Event()

    # -- rendering and writing --------------------------------------------------------------

    def render_all(self) -> None:
        """(In the state loop.) Render every owned unit from the configuration, the GPU plan
        and the model files in force. A llama server's unit names the GGUF its link led to
        when last accepted: a refused re-point never reaches a restart, not even systemd's."""
        store = self.store
        config = store.config
        assert config is not None
        units = []
        for name, owned in config.settings.owned.items():
            if not config.providers[name].active:
                continue
            gpu = unit_gpu_settings(config, store.gpu.plan, name)
            record = store.records[name]
            record.n_gpu_layers = gpu.n_gpu_layers
            record.vram_mib = gpu.vram_bytes // MIB if gpu.vram_bytes is not None else None
            record.gpu_warnings = gpu.warnings
            model_file = record.model.target if record.model and record.model.ok else None
            units.append(
                render_provider_unit(
                    config,
                    owned,
                    store.catalog.backend_names_of(name),
                    gpu,
                    store.unit_context,
                    model_file=model_file,
                )
            )
        store.rendered_units = units + self._own_units()

    async def sync_unit_files(self) -> list[str]:
        """Write our unit files where they differ; daemon-reload only when one changed.
        Returns the providers whose file diversityd rewrote (a hand edit put back is not
        one: whatever runs was started from our file or by the user on purpose)."""
        rendered = list(self.store.rendered_units)
        result = sync_units(
            self.unit_dir, rendered, previous=self.store.written_units or None, remove_stale=True
        )
        await self.loop.call(
            lambda: setattr(self.store, "written_units", {u.name: u.text for u in rendered})
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
        if result.changed:
            await self.systemd.reload_manager()
            log.info("systemd.reloaded")
        providers = {u.name: u.provider for u in rendered if u.provider}
        return [providers[name] for name in result.written if name in providers]

    async def refresh_units(
        self, reason: str, *, replan: bool = True
    ) -> tuple[list[str], str | None]:
        """The one path by which a configuration, model or VRAM change reaches the servers:
        plan (when asked), render every unit, write the files that changed, and roll the
        running units whose file diversityd rewrote, one at a time. Returns the providers
        whose unit file was written and the restart job, if any."""
        async with self._files:
            if replan:
                await self.planner.plan(reason)
            await self.loop.call(self.render_all)
            written = await self.sync_unit_files()
            if written:
                # A unit file that did not exist (or changed) is (re)loaded by systemd:
                # read its state afresh, signals do not carry LoadState.
                await self.supervisor.refresh_snapshots(only=written)
        running = units_to_roll(written, {n: r.snapshot for n, r in self.store.records.items()})
        if not running:
            return written, None
        job_id = await self.jobs.submit("restart", {"providers": running, "reason": reason})
        return written, job_id

    # -- hand edits put back ------------------------------------------------------------------

    def on_unit_dir_event(self, event: InotifyEvent) -> None:
        if event.name in self.store.written_units:
            self._restore_wanted.set()

    async def restore_loop(self) -> None:
        """Puts our unit files back after a hand edit: one pass per burst of writes."""
        while True:
            await self._restore_wanted.wait()
            await asyncio.sleep(RESTORE_SETTLE_S)
            self._restore_wanted.clear()
            async with self._files:
                await self.sync_unit_files()

    # -- starting -------------------------------------------------------------------------------

    async def find_port_holders(self) -> set[str]:
        """A unit of another name (or a stray process) holding an owned provider's port is
        reported, not touched; diversityd then does not start its own unit there."""
        records = self.store.owned_records()
        ports = {r.provider.address[1]: r for r in records}
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
                await self.loop.call(functools.partial(setattr, record, "error", message))
                log.warning(
                    "unit.port_conflict",
                    provider=record.name,
                    unit=holder,
                    pid=conn.pid,
                    error=f"{message}; stop and disable it, or set owned: false",
                )
        return conflicts

    async def start_owned(self, only: list[str] | None = None) -> None:
        """Start owned units that are not running (or just `only`), one at a time, each
        until ready (reconcile.start_order says which and in which order)."""
        conflicts = await self.find_port_holders()
        candidates = [
            StartCandidate(r.name, r.owned.vram_priority if r.owned else 0, r.snapshot)
            for r in self.store.owned_records()
            if only is None or r.name in only
        ]
        for step in start_order(candidates, port_taken=conflicts):
            record = self.store.records[step.name]
            assert record.unit is not None
            if step.reset_failed:
                await self.systemd.reset_failed(record.unit)
            log.info("unit.starting", provider=record.name, unit=record.unit)
            try:
                result = await self.systemd.start(record.unit)
            except SystemdError as exc:
                result = str(exc)
            if result != "done":
                log.error("unit.start_failed", provider=record.name, unit=record.unit, error=result)
                continue
            ready = await self.loop.wait_until(
                functools.partial(_ready_since, record, 0.0), READY_WAIT_S
            )
            log.info(
                "unit.started",
                provider=record.name,
                unit=record.unit,
                state=record.state.value,
                error=None if ready else "not ready in time",
            )

    # -- rolling restarts ------------------------------------------------------------------------

    async def run_restart_job(self, job: Job) -> dict[str, Any]:
        async with self.rolling:
            return await self._rolling_restart(job)

    async def _rolling_restart(self, job: Job) -> dict[str, Any]:
        """Restart providers one at a time, each until it answers again, so the others keep
        serving; stop at the first one that does not come back."""
        results: list[dict[str, Any]] = []
        for name in job.params["providers"]:
            record = self.store.records.get(name)
            if record is None or record.unit is None:
                continue
            self.jobs.report(job, {"provider": name, "step": "restarting"})
            started = time.monotonic()
            log.info("unit.restarting", provider=name, unit=record.unit, job=job.id)
            try:
                outcome = await self.systemd.restart(record.unit)
            except SystemdError as exc:
                outcome = str(exc)
            ready = outcome == "done" and await self.loop.wait_until(
                functools.partial(_ready_since, record, started), READY_WAIT_S
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
            self.jobs.report(job, {"step": "done", **entry})
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


def _ready_since(record: ProviderRecord, since: float) -> bool:
    return is_ready_since(record.state, record.last_state_change, since)
