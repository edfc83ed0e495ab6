"""Starting and stopping owned providers: at start-up, on `diversityctl start|stop`, and
reviving what systemd gave up on (failed) with backoff, at once when one of its inputs
changes. What the user stopped on purpose stays stopped and is never revived."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import psutil

from diversityd.adapters.systemd import Systemd, SystemdError
from diversityd.daemon.draining import Drainer
from diversityd.daemon.loop import ProviderLocks, StateLoop
from diversityd.daemon.metrics import Metrics
from diversityd.daemon.statefile import StateFile
from diversityd.daemon.store import Job, ProviderRecord, Store
from diversityd.log import get_logger
from diversityd.persisted import Revival
from diversityd.reconcile import (
    StartCandidate,
    gave_up,
    is_ready_since,
    revival_delay_s,
    start_order,
)
from diversityd.state import ProviderState
from diversityd.units import exec_start_args

log = get_logger()

REVIVAL_TICK_S = 1.0  # how often failed units are looked at


class Starter:
    def __init__(
        self,
        loop: StateLoop,
        store: Store,
        systemd: Systemd,
        *,
        locks: ProviderLocks,
        statefile: StateFile,
        metrics: Metrics,
        confirm_outside_stops: Callable[[], None],
        drainer: Drainer,
    ) -> None:
        self.loop = loop
        self.drainer = drainer
        self.store = store
        self.systemd = systemd
        self.locks = locks
        self.statefile = statefile
        self.metrics = metrics
        self._confirm_outside_stops = confirm_outside_stops  # the supervisor's, each tick
        self._inputs: dict[str, tuple[object, ...]] = {}  # at the last revival, per provider
        self._wake = asyncio.Event()

    def _supervision(self) -> Any:
        assert self.store.config is not None
        return self.store.config.settings.supervision

    async def wait_serving(self, record: ProviderRecord, since: float) -> bool:
        """Until the provider answers (True), systemd gives up on it, or ready_wait_s: a
        step waits no longer than its unit can still come back."""
        deadline = time.monotonic() + self._supervision().ready_wait_s

        def ready() -> bool:
            return is_ready_since(record.state, record.last_state_change, since)

        def given_up() -> bool:
            changed = record.last_state_change
            return (changed or 0.0) > since and gave_up(record.state, changed, time.monotonic())

        while not ready() and not given_up():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # events wake it at once; the poll sees a `failed` that has stayed
            await self.loop.wait_until(lambda: ready() or given_up(), min(remaining, 0.5))
        return ready()

    # -- start-up ---------------------------------------------------------------------------

    async def find_port_holders(self) -> set[str]:
        """A unit of another name (or a stray process) holding an owned provider's port is
        reported, not touched; diversityd then does not start its own unit there."""
        ports = {r.provider.address[1]: r for r in self.store.owned_records()}
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
        until it answers or fails (reconcile.start_order says which, in which order).
        Providers stopped on purpose stay stopped."""
        conflicts = await self.find_port_holders()
        candidates = [
            StartCandidate(r.name, r.owned.vram_priority if r.owned else 0, r.snapshot)
            for r in self.store.owned_records()
            if (only is None or r.name in only) and not r.stopped_by_user and not r.held
        ]
        for step in start_order(candidates, port_taken=conflicts):
            record = self.store.records[step.name]
            async with self.locks.holding([step.name], "start-up"):
                if record.snapshot is not None and record.snapshot.running:
                    continue  # a job started it while this one waited for it
                await self._start(record, step.reset_failed, "start-up")

    async def _start(self, record: ProviderRecord, reset_failed: bool, why: str) -> bool:
        assert record.unit is not None
        if reset_failed:
            await self.systemd.reset_failed(record.unit)
        log.info("unit.starting", provider=record.name, unit=record.unit, state=why)
        started = time.monotonic()
        try:
            result = await self.systemd.start(record.unit)
        except SystemdError as exc:
            result = str(exc)
        if result != "done":
            log.error("unit.start_failed", provider=record.name, unit=record.unit, error=result)
            return False
        await self.loop.call(functools.partial(self._runs_its_file, record.name))
        ready = await self.wait_serving(record, started)
        log.info(
            "unit.started",
            provider=record.name,
            unit=record.unit,
            state=record.state.value,
            error=None if ready else f"not serving ({record.state.value})",
        )
        return ready

    def _runs_its_file(self, name: str) -> None:
        """(In the state loop.) A process started now runs the unit file on disk."""
        if self.store.pending_rolls.pop(name, None) is not None:
            self.statefile.save_in_loop()

    # -- diversityctl start | stop ------------------------------------------------------------

    async def run_start_job(self, job: Job) -> dict[str, Any]:
        name = job.params["provider"]
        record = self.store.records[name]

        def clear() -> None:
            record.stopped_by_user = False
            record.revival = None
            self.statefile.save_in_loop()

        await self.loop.call(clear)
        async with self.locks.holding([name], job.id):
            snapshot = record.snapshot
            if snapshot is not None and snapshot.running:
                ready = await self.wait_serving(record, 0.0)
            else:
                reset = snapshot is not None and snapshot.active_state == "failed"
                ready = await self._start(record, reset, "started by the user")
        return {"ok": ready, "provider": name, "state": record.state.value}

    async def run_stop_job(self, job: Job) -> dict[str, Any]:
        name = job.params["provider"]
        record = self.store.records[name]
        assert record.unit is not None

        def mark() -> None:
            record.stopped_by_user = True
            record.revival = None
            self.store.pending_rolls.pop(name, None)
            assert record.unit is not None
            self.store.expected_stops.add(record.unit)
            self.statefile.save_in_loop()

        async with self.locks.holding([name], job.id):
            await self.loop.call(mark)
            drained = await self.drainer.drain(name, reason="stopped by the user")
            log.info("unit.stopping", provider=name, unit=record.unit, state="stopped by the user")
            try:
                result = await self.systemd.stop(record.unit)
            finally:
                await self.drainer.release(name)
        return {
            "ok": result == "done",
            "provider": name,
            "state": record.state.value,
            "drain": drained.to_json(),
        }

    # -- held while their model file is rewritten -------------------------------------------

    async def hold(self, names: list[str], reason: str) -> None:
        """Keep these servers stopped: their model file is being rewritten in place, and
        systemd's Restart= would start them onto half a file, into their start limit."""

        def mark() -> list[str]:
            units = []
            for name in names:
                record = self.store.records[name]
                if record.held is None and record.unit is not None:
                    record.held = reason
                    self.store.expected_stops.add(record.unit)
                    units.append(record.unit)
            return units

        for unit in await self.loop.call(mark):
            log.error("unit.held", unit=unit, error=reason)
            try:
                await self.systemd.stop(unit)
            except SystemdError as exc:
                log.error("unit.stop_failed", unit=unit, error=str(exc))

    async def release(self, names: list[str]) -> None:
        """Their model file is whole again (or the link points elsewhere): start them."""

        def clear() -> list[str]:
            released = []
            for name in names:
                record = self.store.records.get(name)
                if record is not None and record.held is not None:
                    record.held = None
                    released.append(name)
            return released

        released = await self.loop.call(clear)
        if released:
            log.info("unit.released", provider=",".join(released))
            await self.start_owned(only=released)

    # -- revival ------------------------------------------------------------------------------

    async def revive_now(self, names: list[str]) -> None:
        """Inputs of these providers changed (their unit file): a failed one is tried now."""

        def due() -> None:
            for name in names:
                record = self.store.records.get(name)
                if record is not None and record.revival is not None:
                    record.revival = Revival(
                        record.revival.attempts, 0.0, record.revival.last_failure
                    )

        await self.loop.call(due)
        self._wake.set()

    async def revival_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), REVIVAL_TICK_S)
            self._wake.clear()
            try:
                await self._revive_due()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad pass
                log.error("unit.revival_failed", error=f"{type(exc).__name__}: {exc}")

    async def _revive_due(self) -> None:
        settings = self._supervision()
        await self.loop.call(self._confirm_outside_stops)
        for record in self.store.owned_records():
            failed = gave_up(record.state, record.last_state_change, time.monotonic())
            if not failed or record.stopped_by_user or record.held:
                continue
            if self.locks.locked(record.name):
                continue  # a job acts on it; its own wait ends on failure
            inputs = self._inputs_of(record)
            if record.revival is None:
                await self.loop.call(functools.partial(self._schedule, record, 0, settings))
                self._inputs[record.name] = inputs
            elif inputs != self._inputs.get(record.name):
                await self.revive_now([record.name])  # its executable or model changed
                self._inputs[record.name] = inputs
            revival = record.revival
            if revival is not None and time.time() >= revival.next_at:
                await self._revive(record, revival.attempts + 1, settings)

    def _schedule(self, record: ProviderRecord, attempts: int, settings: Any) -> None:
        delay = revival_delay_s(attempts, settings.revive_initial_s, settings.revive_max_s)
        snapshot = record.snapshot
        failure = f"unit failed ({snapshot.result})" if snapshot else "unit failed"
        record.revival = Revival(attempts, time.time() + delay, failure)
        self.statefile.save_in_loop()
        log.warning(
            "unit.revival_scheduled",
            provider=record.name,
            unit=record.unit,
            error=f"{failure}; starting it again in {delay:g} s",
        )

    async def _revive(self, record: ProviderRecord, attempt: int, settings: Any) -> None:
        async with self.locks.holding([record.name], "revival"):
            if record.state is not ProviderState.FAILED or record.stopped_by_user:
                return
            await self.loop.call(functools.partial(self._schedule, record, attempt, settings))
            log.warning("unit.reviving", provider=record.name, unit=record.unit, job=str(attempt))
            self.metrics.revived(record.name)
            await self._start(record, True, f"revival {attempt}")

    def _inputs_of(self, record: ProviderRecord) -> tuple[object, ...]:
        """What the unit runs: its file, its executable and its model file, as they are on
        disk now. When one changes, a failed unit is worth trying at once."""
        text = self.store.written_units.get(record.unit or "")
        args = exec_start_args(text or "") or []
        model = record.model.target if record.model and record.model.ok else None
        return (text, *(_identity(path) for path in (args[0] if args else None, model)))


def _identity(path: str | None) -> tuple[int, int, int] | None:
    if not path:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)
