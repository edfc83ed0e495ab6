"""Provider supervision: systemd's unit events and HTTP probes become provider states.

The event handlers run in the state loop (they write records); the probe loops and the
snapshot reads are tasks that post events or call into the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import Callable
from typing import Any

import psutil

from diversityd.adapters import probes
from diversityd.adapters.cputime import tree_cpu_s
from diversityd.adapters.systemd import Systemd, SystemdError
from diversityd.daemon.intent import Intent
from diversityd.daemon.loop import ProbeDone, ProviderLocks, StateLoop, UnitChanged
from diversityd.daemon.metrics import Metrics
from diversityd.daemon.store import ProviderRecord, Store
from diversityd.log import get_logger
from diversityd.reconcile import hung_too_long
from diversityd.state import (
    ProviderState,
    UnitSnapshot,
    adopt_snapshot,
    apply_probe,
    apply_unit_change,
    probe_interval,
    start_overdue,
    state_of,
)

log = get_logger()

PROBED_TYPES = ("ollama", "llama_cpp", "vllm")  # local servers; clouds are not probed


class ProviderSupervisor:
    def __init__(
        self,
        loop: StateLoop,
        store: Store,
        systemd: Systemd,
        *,
        locks: ProviderLocks,
        intent: Intent,
        metrics: Metrics,
        on_state_change: Callable[[], None],
        on_models_change: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.store = store
        self.systemd = systemd
        self.locks = locks
        self.intent = intent  # what the user meant by a stop (job signals)
        self.metrics = metrics
        self._killed: set[int] = set()  # hung processes already killed (once each)
        self._on_state_change = on_state_change  # the gateway may render differently now
        self._on_models_change = on_models_change
        # a probe loop's pause ends early when its provider changes state: a start or
        # restart is probed at once, whatever `probes.interval_s` is
        self._probe_wake: dict[str, asyncio.Event] = {}

    # -- events (in the state loop) -------------------------------------------------------

    def on_unit_changed(self, event: UnitChanged) -> None:
        record = self.store.record_of_unit(event.unit)
        if record is None:
            return
        if record.snapshot is None:
            # Arrived before the first snapshot was adopted: the newer ones go on top of it.
            record.early_changes.append((event.at, event.changed))
            return
        before_pid = record.observed.pid
        record.observed, exited_pid = apply_unit_change(record.observed, event.changed)
        record.last_unit_event = event.at
        if exited_pid:
            record.last_exit_seen = event.at
            self.metrics.exited(record.name)
            log.warning(
                "unit.exited",
                provider=record.name,
                unit=record.unit,
                pid=before_pid,
                result=record.observed.unit.result if record.observed.unit else None,
            )
        self.update_state(record, event.at)

    def on_probe(self, event: ProbeDone) -> None:
        record = self.store.records.get(event.provider)
        if record is None:
            return
        result = event.result
        previous = record.probe
        record.observed = apply_probe(record.observed, result, event.pid, event.cpu_s)
        self.metrics.probed(record.name, result)
        record.error = None if result.ok else result.error
        if previous is not None and result.ok and previous.models != result.models:
            self._on_models_change()  # a model appeared or went away: routing may change
        if previous is None or previous.outcome is not result.outcome:
            log.info(
                "probe.changed",
                provider=record.name,
                state=result.outcome.value,
                elapsed_ms=round(result.latency_ms, 1),
                error=result.error,
            )
        self.update_state(record, result.at)
        self._kill_if_hung_too_long(record)

    def _kill_if_hung_too_long(self, record: ProviderRecord) -> None:
        """(In the state loop.) The hang policy: an owned server hung past its grace is
        killed; requests it holds fail over at once, and systemd's Restart= brings it
        back. A busy one (its CPU time advancing) is never killed."""
        assert self.store.config is not None
        grace = self.store.config.settings.supervision.hung_grace_s
        pid = record.observed.pid
        if record.unit is None or record.owned is None or pid in self._killed:
            return
        if not hung_too_long(record.state, record.last_state_change, time.monotonic(), grace):
            return
        self._killed.add(pid)
        log.error(
            "provider.hung_killed",
            provider=record.name,
            unit=record.unit,
            pid=pid,
            error=f"no answer and no CPU progress for {grace:g} s: killed, systemd restarts it",
        )
        self.loop.spawn(self._kill(record.unit))

    async def _kill(self, unit: str) -> None:
        try:
            await self.systemd.kill(unit, int(signal.SIGKILL), whom="all")
        except SystemdError as exc:
            log.error("unit.kill_failed", unit=unit, error=str(exc))

    def update_state(self, record: ProviderRecord, at: float) -> None:
        store = self.store
        assert store.config is not None
        overdue = start_overdue(
            record.observed.unit, time.time(), store.config.settings.supervision.start_grace_s
        )
        state = state_of(record.observed, owned=record.owned is not None, overdue=overdue)
        if state is record.state:
            return
        previous, record.state = record.state, state
        self.metrics.state_changed(record.name, state)
        record.state_since = time.time()
        record.last_state_change = at
        if previous is ProviderState.READY:
            record.left_ready_at = at
        if (wake := self._probe_wake.get(record.name)) is not None:
            wake.set()
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
        self.intent.on_state(record, state)
        self._on_state_change()

    def on_systemd_change(self, unit: str, changed: dict[str, Any]) -> None:
        """From the bus reader: every property change of a watched unit, as an event."""
        self.loop.post(UnitChanged(unit, changed, time.monotonic()))

    # -- reading systemd --------------------------------------------------------------------

    async def refresh_snapshots(
        self, *, only_missing: bool = False, only: list[str] | None = None
    ) -> None:
        """Read each owned unit's state from systemd (all, those without one yet, or the
        providers in `only`): the truth after a daemon restart or a unit file written."""
        for record in list(self.store.records.values()):
            if record.unit is None or (only_missing and record.snapshot is not None):
                continue
            if only is not None and record.name not in only:
                continue
            snapshot = await self.systemd.snapshot(record.unit)
            taken_at = time.monotonic()

            def adopt(
                r: ProviderRecord = record, s: UnitSnapshot = snapshot, t: float = taken_at
            ) -> None:
                unit = adopt_snapshot(s, r.early_changes, t)
                r.early_changes.clear()
                r.observed = dataclasses.replace(r.observed, unit=unit)
                self.update_state(r, time.monotonic())

            await self.loop.call(adopt)

    async def thaw_frozen(self) -> list[str]:
        """Owned servers whose main process is stopped (SIGSTOP: a hang drill cut short by
        the daemon's death) get SIGCONT: nothing else would ever wake them."""
        thawed = []
        for record in self.store.owned_records():
            pid = record.observed.pid
            if not pid or record.unit is None:
                continue
            try:
                frozen = psutil.Process(pid).status() == psutil.STATUS_STOPPED
            except psutil.Error:
                continue
            if not frozen:
                continue
            try:
                await self.systemd.kill(record.unit, int(signal.SIGCONT), whom="all")
            except SystemdError as exc:
                log.error(
                    "unit.thaw_failed", provider=record.name, unit=record.unit, error=str(exc)
                )
                continue
            log.warning("unit.thawed", provider=record.name, unit=record.unit, pid=pid)
            thawed.append(record.name)
        return thawed

    # -- probes -------------------------------------------------------------------------------

    def ensure_probe_tasks(self) -> None:
        for name, record in self.store.records.items():
            if record.provider.type in PROBED_TYPES and not self.loop.has_task(f"probe:{name}"):
                self.loop.spawn(self._probe_loop(name), name=f"probe:{name}")

    async def _probe_loop(self, name: str) -> None:
        client = probes.new_client(5.0)
        memory, memory_pid = probes.ProbeMemory(), 0
        try:
            while True:
                assert self.store.config is not None
                settings = self.store.config.settings  # read each round: a reload may change it
                record = self.store.records.get(name)
                if record is None:
                    return
                wake = self._probe_wake.setdefault(name, asyncio.Event())
                if record.owned is not None and record.state is ProviderState.STOPPED:
                    await _pause(wake, settings.probe_interval_s)
                    continue
                pid = record.observed.pid
                if pid != memory_pid:  # a new process: its routes and models are asked anew
                    memory, memory_pid = probes.ProbeMemory(), pid
                try:
                    timeout_s = settings.probe_timeout_s
                    result = await probes.probe(client, record.provider, timeout_s, memory)
                except Exception as exc:  # noqa: BLE001 - one odd answer must not end probing
                    log.error("probe.failed", provider=name, error=f"{type(exc).__name__}: {exc}")
                else:
                    owned = record.owned is not None
                    cpu_s = tree_cpu_s(pid) if owned and pid else None
                    self.loop.post(ProbeDone(name, result, pid, cpu_s))
                await _pause(
                    wake,
                    probe_interval(
                        record.state, record.observed.failures, settings.probe_interval_s
                    ),
                )
        finally:
            self._probe_wake.pop(name, None)
            await client.aclose()


async def _pause(wake: asyncio.Event, seconds: float) -> None:
    """Until the next probe, or until the provider's state changes."""
    wake.clear()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), seconds)
