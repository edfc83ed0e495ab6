"""Unit files and rollout: render every owned unit, write the files that changed (putting
hand edits back), start what should run, and roll changed units one at a time, each until
it answers again, so the others keep serving.

A rollout survives the daemon's death: the units that must restart are written to the
state file (`pending_rolls`) BEFORE their files, and leave it only once restarted, so a
daemon killed at any step rolls them when it is back. A write that fails (a full disk) is
retried with backoff; nothing is accepted that was not written.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from diversityd.adapters.files import read_text_or_none
from diversityd.adapters.inotify import FolderWatch, InotifyEvent
from diversityd.adapters.systemd import Systemd, SystemdError
from diversityd.adapters.unitfiles import owned_provider_units, sync_units
from diversityd.daemon.draining import Drainer
from diversityd.daemon.gpus import GpuPlanner
from diversityd.daemon.jobs import Jobs
from diversityd.daemon.loop import ProviderLocks, StateLoop, checkpoint
from diversityd.daemon.metrics import Metrics
from diversityd.daemon.providers import ProviderSupervisor
from diversityd.daemon.starts import Starter
from diversityd.daemon.statefile import StateFile
from diversityd.daemon.store import MIB, Job, Store, sha256_text
from diversityd.gpuplan import unit_gpu_settings
from diversityd.log import get_logger
from diversityd.reconcile import units_to_retire, units_to_roll
from diversityd.units import (
    MARKER,
    RenderedUnit,
    UnitRenderError,
    is_owned_text,
    render_provider_unit,
    unit_name,
)

log = get_logger()

STARTUP = "start-up"  # the reason of the first refresh
RESTORE_SETTLE_S = 0.05  # let a burst of writes to the unit folder settle
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0  # after a failed write of the unit files


class Rollout:
    def __init__(
        self,
        loop: StateLoop,
        store: Store,
        systemd: Systemd,
        *,
        supervisor: ProviderSupervisor,
        planner: GpuPlanner,
        starter: Starter,
        jobs: Jobs,
        locks: ProviderLocks,
        statefile: StateFile,
        metrics: Metrics,
        unit_dir: Path,
        own_units: Callable[[], list[RenderedUnit]],
        drainer: Drainer,
        revive_now: Callable[[list[str]], Awaitable[None]],
    ) -> None:
        self.loop = loop
        self.drainer = drainer
        self.store = store
        self.systemd = systemd
        self.supervisor = supervisor
        self.planner = planner
        self.starter = starter
        self.jobs = jobs
        self.locks = locks
        self.statefile = statefile
        self.metrics = metrics
        self.unit_dir = unit_dir
        self._own_units = own_units  # diversityd's own (the gateway's), beside the providers'
        self._revive_now = revive_now  # the reviver's: a unit down for good is tried now
        # Unit files are planned, rendered and written by one task at a time.
        self._files = asyncio.Lock()
        self._restore_wanted = asyncio.Event()
        self._folder_watch: FolderWatch | None = None
        self._retry_wanted = asyncio.Event()  # a write failed: try the whole refresh again

    # -- rendering and writing --------------------------------------------------------------

    def render_all(self) -> None:
        """(In the state loop.) Render every owned unit from the configuration, the GPU plan
        and the model files in force. A llama server's unit names the GGUF its link led to
        when last accepted: a refused re-point never reaches a restart, not even systemd's.
        A unit that cannot be rendered (validation should have refused its value) is a
        finding: the last good text stays, so nothing stops or restarts for it."""
        store = self.store
        config = store.config
        assert config is not None
        last_good = {u.name: u for u in store.rendered_units}
        errors: dict[str, str] = {}
        units = []
        for name, owned in config.settings.owned.items():
            if not config.providers[name].active:
                continue
            gpu = unit_gpu_settings(config, store.gpu.plan, name, store.kept_gpu_settings)
            record = store.records[name]
            record.n_gpu_layers = gpu.n_gpu_layers
            record.vram_mib = gpu.vram_bytes // MIB if gpu.vram_bytes is not None else None
            record.gpu_warnings = gpu.warnings
            model_file = record.model.target if record.model and record.model.ok else None
            try:
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
            except UnitRenderError as exc:
                errors[unit_name(name)] = f"{name}: {exc}"
        for unit in errors:
            kept = last_good.get(unit) or self._unit_on_disk(unit)
            units += [kept] if kept is not None else []
        try:
            own = self._own_units()
        except UnitRenderError as exc:
            errors["gateway"] = f"gateway: {exc}"
            own = [u for u in store.rendered_units if u.provider is None]
        for unit, error in errors.items():
            if store.render_errors.get(unit) != error:
                log.error("unit.render_failed", unit=unit, error=f"{error}; the last good stays")
        store.render_errors = errors
        store.rendered_units = units + own

    def _unit_on_disk(self, unit: str) -> RenderedUnit | None:
        """Our file of a unit as it is (after a restart, the last good one is there)."""
        text = read_text_or_none(self.unit_dir / unit)
        if text is None or not is_owned_text(text):
            return None
        provider = text.splitlines()[0].removeprefix(MARKER).strip()
        return RenderedUnit(unit, provider, text)

    def _note_pending(self) -> list[str]:
        """(In the state loop, after render_all.) Running providers whose rendered unit is
        not the file on disk: they must restart once it is written."""
        changed = {}
        for unit in self.store.rendered_units:
            if unit.provider is None:
                continue
            # `environment:` lives in its own 0600 file, which the unit only names: a
            # change there leaves the unit's text as it was, yet the server must restart
            environment_changed = (
                unit.env_file is not None
                and read_text_or_none(Path(unit.env_file)) != unit.env_text
            )
            if read_text_or_none(self.unit_dir / unit.name) != unit.text or environment_changed:
                changed[unit.provider] = sha256_text(unit.text + (unit.env_text or ""))
        snapshots = {n: r.snapshot for n, r in self.store.records.items()}
        for name in units_to_roll(changed, snapshots):
            self.store.pending_rolls[name] = changed[name]
        return list(changed)

    async def _retire_stale(self) -> None:
        """Stop the units of providers no longer configured before their files go."""
        wanted = {u.name for u in self.store.rendered_units}
        for name in units_to_retire(owned_provider_units(self.unit_dir), wanted):
            log.info("unit.stopping", unit=name, state="no longer configured")
            self.store.expected_stops.add(name)
            try:
                await self.systemd.stop(name)
            except SystemdError as exc:
                log.error("unit.stop_failed", unit=name, error=str(exc))

    async def sync_unit_files(self, *, reload_manager: bool = False) -> list[str]:
        """Write our unit files where they differ; daemon-reload when one changed (or when
        asked: at start-up, a daemon killed between writing and reloading left systemd
        with the old definitions). Returns the providers whose file diversityd rewrote (a
        hand edit put back is not one: whatever runs was started from our file or by the
        user on purpose)."""
        rendered = list(self.store.rendered_units)
        await self._retire_stale()
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
        for name in result.environment_written:
            log.info("unit.environment_written", unit=name)
        for name in result.removed:
            log.info("unit.removed", unit=name)
        checkpoint("rollout.files_written")
        if result.changed or reload_manager:
            await self.systemd.reload_manager()
            log.info("systemd.reloaded")
            checkpoint("rollout.manager_reloaded")
        providers = {u.name: u.provider for u in rendered if u.provider}
        rewritten = [*result.written, *result.environment_written]
        return sorted({providers[name] for name in rewritten if name in providers})

    async def refresh_units(
        self, reason: str, *, replan: bool = True
    ) -> tuple[list[str], str | None]:
        """The one path by which a configuration, model or VRAM change reaches the servers:
        plan (when asked), render every unit, note which running ones must roll, write the
        files that changed, then roll those one at a time. Returns the providers whose unit
        file changed and the restart job, if any. A failed write is retried later."""
        reading = await self.planner.read() if replan else None  # NVML: outside the lock
        try:
            async with self._files:
                if replan:
                    await self.planner.plan(reading, reason)
                changed = await self.loop.call(self._render_and_note)
                await self.statefile.must_save()  # the intent first: a crash must not lose it
                checkpoint("rollout.intent_saved")
                written = await self.sync_unit_files(reload_manager=reason == STARTUP)
                if written:
                    # A unit file that did not exist (or changed) is (re)loaded by systemd:
                    # read its state afresh, signals do not carry LoadState.
                    await self.supervisor.refresh_snapshots(only=written)
        except OSError as exc:
            await self._write_failed(exc)
            return [], None
        await self.loop.call(lambda: setattr(self.store, "unit_errors", None))
        await self._revive_now(written)  # ones down for good whose inputs changed
        return changed, await self.roll_pending(reason)

    def _render_and_note(self) -> list[str]:
        self.render_all()
        return self._note_pending()

    async def _write_failed(self, exc: OSError) -> None:
        error = f"{exc.filename or self.unit_dir}: {exc.strerror or exc}"
        log.error("unit.write_failed", path=str(self.unit_dir), error=f"{error}; retrying")
        await self.loop.call(lambda: setattr(self.store, "unit_errors", error))
        self._retry_wanted.set()

    async def retry_loop(self) -> None:
        """A refresh that could not write (a full disk) is tried again, with backoff."""
        delay = RETRY_FIRST_S
        while True:
            await self._retry_wanted.wait()
            await asyncio.sleep(delay)
            self._retry_wanted.clear()
            await self.refresh_units("retrying a failed write")
            failed_again = self._retry_wanted.is_set()
            delay = min(RETRY_MAX_S, delay * 2) if failed_again else RETRY_FIRST_S

    async def roll_pending(self, reason: str) -> str | None:
        """A restart job for the providers whose written unit they do not run yet."""
        snapshots = {n: r.snapshot for n, r in self.store.records.items()}
        running = units_to_roll(sorted(self.store.pending_rolls), snapshots)
        if not running:
            return None
        return await self.jobs.submit("restart", {"providers": running, "reason": reason})

    # -- hand edits put back ------------------------------------------------------------------

    def watch_unit_dir(self, event_loop: asyncio.AbstractEventLoop) -> None:
        self._folder_watch = FolderWatch(self.unit_dir, self._on_unit_dir_event)
        self._folder_watch.start(event_loop)

    def close(self) -> None:
        if self._folder_watch is not None:
            self._folder_watch.close()

    def _on_unit_dir_event(self, event: InotifyEvent) -> None:
        # The folder's path watched again (it was replaced or renamed away) or events
        # dropped: look at every file again. Not at the loss itself: a folder being
        # swapped in must not find one of ours made in its place.
        if event.overflow or event.renewed or event.name in self.store.written_units:
            if event.renewed:
                log.warning("unit.dir_rewatched", path=str(self.unit_dir))
            self._restore_wanted.set()

    async def restore_loop(self) -> None:
        """Puts our unit files back after a hand edit: one pass per burst of writes."""
        while True:
            await self._restore_wanted.wait()
            await asyncio.sleep(RESTORE_SETTLE_S)
            self._restore_wanted.clear()
            try:
                async with self._files:
                    await self.sync_unit_files()
            except OSError as exc:
                await self._write_failed(exc)

    # -- rolling restarts ------------------------------------------------------------------------

    async def run_restart_job(self, job: Job) -> dict[str, Any]:
        """Restart providers one at a time, each until it answers again, so the others keep
        serving; stop at the first one that does not come back. A step ends as soon as
        systemd gives up on its unit."""
        results: list[dict[str, Any]] = []
        for name in job.params["providers"]:
            record = self.store.records.get(name)
            if record is None or record.unit is None:
                continue
            holder = self.locks.holders.get(name)
            if holder is not None:
                self.jobs.report(job, {"provider": name, "step": "waiting", "for": holder})
            async with self.locks.holding([name], job.id):
                entry = await self._restart_one(job, name)
            results.append(entry)
            self.jobs.report(job, {"step": "done", **entry})
            if not entry["ok"]:
                break
        asked = bool(job.params["providers"])  # a restart of all may find all kept down
        ok = (bool(results) or not asked) and all(r["ok"] for r in results)
        return {"ok": ok, "providers": results, "skipped": job.params.get("skipped") or {}}

    async def _restart_one(self, job: Job, name: str) -> dict[str, Any]:
        record = self.store.records[name]
        assert record.unit is not None
        reason = job.params.get("reason") or "restart"
        drained = await self.drainer.drain(name, reason=reason, hold=True)
        self.jobs.report(job, {"provider": name, "step": "restarting", "drain": drained.to_json()})
        started = time.monotonic()
        log.info("unit.restarting", provider=name, unit=record.unit, job=job.id)
        # An asked-for restart is a fresh start: systemd's start limit (from earlier
        # crashes) must not refuse it.
        await self.systemd.reset_failed(record.unit)
        try:
            outcome = await self.systemd.restart(record.unit)
        except SystemdError as exc:
            outcome = str(exc)
        finally:
            await self.drainer.release(name)  # back in the routes once it answers
        if outcome == "done":
            self.metrics.restarted(name)
            await self.loop.call(functools.partial(self._rolled, name))
            checkpoint("rollout.provider_restarted")
            self.jobs.report(job, {"provider": name, "step": "waiting", "for": "its answer"})
        try:
            ready = outcome == "done" and await self.starter.wait_serving(record, started)
        finally:
            await self.drainer.end_hold(name)
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        log.info("unit.restarted" if ready else "unit.restart_failed", provider=name,
                 unit=record.unit, elapsed_ms=elapsed_ms, state=record.state.value,
                 job=job.id)  # fmt: skip
        return {
            "provider": name,
            "unit": record.unit,
            "ok": ready,
            "elapsed_ms": elapsed_ms,
            "state": record.state.value,
            "systemd_job": outcome,
            "drain": drained.to_json(),
        }

    def _rolled(self, name: str) -> None:
        """(In the state loop.) Its process now runs the unit file on disk."""
        if self.store.pending_rolls.pop(name, None) is not None:
            self.statefile.save_in_loop()
