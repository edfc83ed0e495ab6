"""Starting and stopping owned providers: at start-up, on `diversityctl start|stop`, and
for revivals (revivals.py decides when). What the user stopped on purpose stays stopped;
a server held while its model file is rewritten in place is started once it is whole."""

from __future__ import annotations

import functools
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
from diversityd.reconcile import StartCandidate, down_for_good, is_ready_since, start_order

log = get_logger()


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
        drainer: Drainer,
        report: Callable[[Job, dict[str, Any]], None],
    ) -> None:
        self.loop = loop
        self.drainer = drainer
        self.store = store
        self.systemd = systemd
        self.locks = locks
        self.statefile = statefile
        self.metrics = metrics
        self._report = report  # a job's progress (the job registry's)

    def _supervision(self) -> Any:
        assert self.store.config is not None
        return self.store.config.settings.supervision

    async def wait_serving(self, record: ProviderRecord, since: float) -> bool:
        """Until the provider answers (True), it is down for good (systemd gave up on it, or
        its process ended), or ready_wait_s: a step waits no longer than its unit can
        still come back."""
        deadline = time.monotonic() + self._supervision().ready_wait_s

        def ready() -> bool:
            return is_ready_since(record.state, record.last_state_change, since)

        def given_up() -> bool:
            changed = record.last_state_change
            return (changed or 0.0) > since and down_for_good(
                record.state, changed, time.monotonic()
            )

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
        # not started, and not revived either: another process holds its port
        await self.loop.call(functools.partial(self._note_port_taken, ports, conflicts))
        return conflicts

    def _note_port_taken(self, ports: dict[int, ProviderRecord], conflicts: set[str]) -> None:
        """(In the state loop.)"""
        looked_at = {record.name for record in ports.values()}
        self.store.port_taken = (self.store.port_taken - looked_at) | conflicts

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

    async def start_unit(self, record: ProviderRecord, reset_failed: bool, why: str) -> bool:
        """Start its unit and wait until it serves (True) or is down for good."""
        return await self._start(record, reset_failed, why)

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
        """Start it again; a server held while its model file is rewritten in place is
        started when the file is whole (the hold's release), not onto half a file."""
        name = job.params["provider"]
        record = self.store.records[name]

        def clear() -> None:
            record.stopped_by_user = False
            record.revival = None
            self.statefile.save_in_loop()

        await self.loop.call(clear)
        if record.held is not None:
            self._report(job, {"provider": name, "step": "waiting", "for": record.held})
            wait_s = self._supervision().ready_wait_s
            if not await self.loop.wait_until(lambda: record.held is None, wait_s):
                return {"ok": False, "provider": name, "state": record.state.value,
                        "error": f"still held: {record.held}"}  # fmt: skip
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
