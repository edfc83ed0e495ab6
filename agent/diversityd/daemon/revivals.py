"""Reviving owned units that are down for good: systemd gave up on them (`failed`), or
their process ended with no stop job (an exit 0; a SIGTERM from `kill` or earlyoom, which
systemd calls success and Restart=on-failure leaves alone). With backoff
(`revive_initial_s` doubling to `revive_max_s`), at once when one of its inputs changes
(its unit file, executable or model file). What the user stopped (intent.py), what is
held and what diversityd stops itself is never revived.

Each revival runs as a task of its own, so one slow start (up to `ready_wait_s`) holds up
no other; times are on the monotonic clock; the backoff outlives the daemon (a new one
reads it back from the state file, clamped, and does not revive at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from diversityd.daemon.intent import Intent
from diversityd.daemon.loop import ProviderLocks, StateLoop
from diversityd.daemon.metrics import Metrics
from diversityd.daemon.statefile import StateFile
from diversityd.daemon.store import ProviderRecord, Store
from diversityd.log import get_logger
from diversityd.reconcile import RevivalPlan, down_for_good, revival_delay_s, revival_due
from diversityd.state import ProviderState
from diversityd.units import exec_start_args

log = get_logger()

REVIVAL_TICK_S = 1.0  # how often units down for good are looked at

StartUnit = Callable[[ProviderRecord, bool, str], Awaitable[bool]]


class Reviver:
    def __init__(
        self,
        loop: StateLoop,
        store: Store,
        *,
        locks: ProviderLocks,
        statefile: StateFile,
        metrics: Metrics,
        intent: Intent,
        start_unit: StartUnit,
    ) -> None:
        self.loop = loop
        self.store = store
        self.locks = locks
        self.statefile = statefile
        self.metrics = metrics
        self.intent = intent
        self._start_unit = start_unit  # the starter's: start, then wait until it serves
        self._inputs: dict[str, tuple[object, ...]] = {}  # at the last look, per provider
        self._reviving: set[str] = set()  # providers whose revival task runs
        self._wake = asyncio.Event()
        # An owned unit found stopped is start-up's to start (one at a time), not a
        # revival's, until start-up has been through them.
        self.startup_finished = False

    def _supervision(self) -> Any:
        assert self.store.config is not None
        return self.store.config.settings.supervision

    async def revive_now(self, names: list[str]) -> None:
        """Inputs of these providers changed (their unit file): a down one is tried now."""

        def due() -> None:
            for name in names:
                record = self.store.records.get(name)
                if record is not None and record.revival is not None:
                    record.revival = RevivalPlan(
                        record.revival.attempts, time.monotonic(), record.revival.last_failure
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

    def _wants_revival(self, record: ProviderRecord, now: float) -> bool:
        """Down for good, and not on purpose: not stopped by the user, not held, not being
        stopped or acted on by diversityd, not already being revived."""
        if not down_for_good(record.state, record.last_state_change, now):
            return False
        if record.stopped_by_user or record.held or record.unit is None:
            return False
        if record.state is ProviderState.STOPPED and (
            not self.startup_finished
            or record.name in self.store.port_taken  # left stopped on purpose at its start
            or record.unit in self.store.expected_stops
            or self.intent.job_pending(record.unit)
        ):
            return False
        # a job acts on it (its own wait ends when it is down for good)
        return not self.locks.locked(record.name) and record.name not in self._reviving

    async def _revive_due(self) -> None:
        settings = self._supervision()
        for record in self.store.owned_records():
            if not self._wants_revival(record, time.monotonic()):
                continue
            inputs = self._inputs_of(record)
            seen_before = self._inputs.get(record.name)
            self._inputs[record.name] = inputs
            if record.revival is None:
                await self.loop.call(functools.partial(self._schedule, record, 0, settings))
            elif seen_before is not None and inputs != seen_before:
                await self.revive_now([record.name])  # its executable or model changed
            # (first seen by this daemon: the backoff read back from the state file holds)
            revival = record.revival
            if revival is not None and revival_due(revival, time.monotonic()):
                # one task each: a slow start (up to ready_wait_s) holds up no other
                self._reviving.add(record.name)
                self.loop.spawn(
                    self._revive(record, revival.attempts + 1, settings),
                    name=f"revival:{record.name}",
                )

    def _schedule(self, record: ProviderRecord, attempts: int, settings: Any) -> None:
        delay = revival_delay_s(attempts, settings.revive_initial_s, settings.revive_max_s)
        snapshot = record.snapshot
        result = f" ({snapshot.result})" if snapshot and snapshot.result else ""
        failure = (
            f"unit failed{result}"
            if record.state is ProviderState.FAILED
            else f"its process ended with no stop job{result}"
        )
        record.revival = RevivalPlan(attempts, time.monotonic() + delay, failure)
        self.statefile.save_in_loop()
        log.warning(
            "unit.revival_scheduled",
            provider=record.name,
            unit=record.unit,
            error=f"{failure}; starting it again in {delay:g} s",
        )

    async def _revive(self, record: ProviderRecord, attempt: int, settings: Any) -> None:
        try:
            async with self.locks.holding([record.name], "revival"):
                down = (ProviderState.FAILED, ProviderState.STOPPED)
                if record.state not in down or record.stopped_by_user or record.held:
                    return
                await self.loop.call(functools.partial(self._schedule, record, attempt, settings))
                log.warning(
                    "unit.reviving", provider=record.name, unit=record.unit, job=str(attempt)
                )
                self.metrics.revived(record.name)
                await self._start_unit(record, True, f"revival {attempt}")
        finally:
            self._reviving.discard(record.name)

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
