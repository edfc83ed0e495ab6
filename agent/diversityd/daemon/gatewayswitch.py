"""New gateway processes, for the changes a running LiteLLM cannot take in-process.

LiteLLM takes ~12 s to start. A switch writes the new config for the idle colour, starts
that instance on the SAME listening socket (systemd's `diversityd-gateway.socket`), waits
for its READY=1 (it really serves), and only then lets the old instance go: with one
instance (`gateway.instances: 1`) it drains and stops; with two, it restarts on the new
config while the new one serves. A new instance that fails to start is stopped again: the
old one never stopped serving and its config stays in place. One switch at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

from diversityd.adapters.files import read_text_or_none
from diversityd.adapters.litellm import GatewayFiles
from diversityd.adapters.systemd import Systemd, SystemdError
from diversityd.daemon.gatewayrecord import GatewayRecord
from diversityd.daemon.loop import StateLoop, checkpoint
from diversityd.daemon.metrics import Metrics
from diversityd.daemon.statefile import StateFile
from diversityd.daemon.store import Store, sha256_text
from diversityd.gateway import GatewayPlan
from diversityd.log import get_logger
from diversityd.reconcile import FAILED_SETTLE_S
from diversityd.state import UnitSnapshot
from diversityd.statusdoc import GatewayReload
from diversityd.timefmt import iso_now
from diversityd.units import GATEWAY_COLORS, gateway_instance

log = get_logger()

START_TIMEOUT_S = 200.0
RETRY_FIRST_S, RETRY_MAX_S = 30.0, 600.0  # a config whose proxy would not start


class ProcessSwitch:
    def __init__(
        self,
        loop: StateLoop,
        store: Store,
        systemd: Systemd,
        statefile: StateFile,
        metrics: Metrics,
        *,
        files: GatewayFiles,
        record: GatewayRecord,
        graceful_s: Callable[[], float],
        instances: int,
        wake: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.store = store
        self.systemd = systemd
        self.statefile = statefile
        self.metrics = metrics
        self.files = files
        self.record = record
        self.graceful_s = graceful_s
        self.instances = instances  # 1: blue/green; 2: both serve, replaced in turn
        self.wake = wake  # the gateway loop looks again
        self._switching = asyncio.Lock()
        self._failures = 0  # switches failed in a row: the next try waits longer
        self.retry_at = 0.0
        self._old: asyncio.Future[str] | None = None  # the old instance draining/restarting
        self.last_start = 0.0
        self._down_since = 0.0  # when the serving instance was last seen failed/inactive

    def on_unit_changed(self, unit: str, changed: dict[str, Any]) -> None:
        record = self.record
        base = record.instances.get(unit)
        if base is None:
            return
        snapshot = record.instances[unit] = base.merged(changed)
        color = next(c for c in GATEWAY_COLORS if gateway_instance(c) == unit)
        if snapshot.active_state != "active":
            record.routes_at.pop(color, None)  # a process that comes back says what it serves
        came_up = base.active_state != "active" and snapshot.active_state == "active"
        if unit == record.unit:
            record.snapshot = snapshot
            if snapshot.active_state in ("failed", "inactive") and not record.reloading:
                log.error("gateway.instance_down", unit=unit, state=snapshot.active_state)
                self._down_since = time.monotonic()
                # systemd shows `failed` for an instant before its Restart=: a new process
                # only if it stays down (one started beside the restart would be a spare)
                asyncio.get_running_loop().call_later(FAILED_SETTLE_S, self.wake)
            elif came_up:
                self.wake()  # restarted by systemd: resynchronised before anything
        elif came_up and not record.reloading:
            if self.instances == 1 or record.color is None:
                # Started by traffic on the socket (the `Service=` colour) while none ran,
                # or by hand: it serves now; its config file is the last applied one (both
                # colours' files are written). (A switch's own start happens `reloading`.)
                record.color, record.snapshot = color, snapshot
                record.applied_text = read_text_or_none(self.files.config_path(color))
                log.warning("gateway.adopted", unit=unit, pid=snapshot.main_pid)
            self.wake()
        elif self.instances == 2 and snapshot.active_state in ("failed", "inactive"):
            self.wake()  # the second instance is started again

    def restarting_by_itself(self) -> bool:
        """The serving instance is in systemd's Restart= walk (its `failed` instant, or
        activating again): it comes back on its own config file, which is current."""
        snapshot = self.record.snapshot
        if snapshot is None or self.record.color is None:
            return False
        if snapshot.active_state == "activating":
            return True
        return snapshot.active_state in ("failed", "inactive") and (
            time.monotonic() - self._down_since < FAILED_SETTLE_S
        )

    def retire_spares(self) -> None:
        """(One instance wanted.) Another colour running beside the serving one (started by
        hand, or by socket activation in a race) drains and stops."""
        record = self.record
        if self.instances != 1:
            return
        for color in GATEWAY_COLORS:
            snapshot = record.instances.get(gateway_instance(color))
            spare = snapshot is not None and snapshot.active_state == "active"
            if spare and color != record.color and color not in record.retiring:
                self.loop.spawn(self.retire(color), name=f"gateway-retire-{color}")

    @property
    def busy(self) -> bool:
        return self._switching.locked()

    async def adopt_running(self) -> None:
        """After a daemon restart: the newest running instance serves; with one instance
        wanted, an older one (a switch cut short by the restart) is stopped."""
        running: list[tuple[int, str, UnitSnapshot]] = []
        for color in GATEWAY_COLORS:
            unit = gateway_instance(color)
            snapshot = await self.systemd.snapshot(unit)
            await self.loop.call(
                functools.partial(self.record.instances.__setitem__, unit, snapshot)
            )
            if snapshot.active_state in ("active", "activating"):
                running.append((snapshot.active_enter_us, color, snapshot))
        if not running:
            return
        running.sort()
        _, color, snapshot = running[-1]
        text = read_text_or_none(self.files.config_path(color))

        def adopt() -> None:
            self.record.color = color
            self.record.snapshot = snapshot
            self.record.applied_text = text
            self.record.applied_at = time.time()

        await self.loop.call(adopt)
        log.info("gateway.adopted", unit=gateway_instance(color), pid=snapshot.main_pid)
        if self.instances == 1:
            for _, other, _ in running[:-1]:
                await self.systemd.stop(gateway_instance(other))

    async def start_second(self, text: str) -> None:
        """(Two instances.) The colour that does not run starts on the config in force."""
        async with self._switching:
            running = self.record.running_colors(self.instances)
            missing = [c for c in GATEWAY_COLORS if c not in running]
            if not running or not missing:
                return
            unit = gateway_instance(missing[0])
            self.files.write_config(missing[0], text)
            log.info("gateway.second_starting", unit=unit)
            await self.systemd.reset_failed(unit)
            try:
                outcome = await self.systemd.start(unit, timeout_s=START_TIMEOUT_S)
            except SystemdError as exc:
                outcome = str(exc)
            if outcome != "done":
                log.error("gateway.second_failed", unit=unit, error=outcome)

    async def apply(
        self,
        text: str,
        plan: GatewayPlan | None,
        *,
        reason: str,
        pin: str | None = None,
        automatic: bool = False,
    ) -> GatewayReload | None:
        """A new process on `text`; once it serves, the old one goes (in the background;
        the next switch waits for it). An automatic switch is dropped (None) when, by the
        time it may run, a rollback has pinned the gateway."""
        async with self._switching:
            if self._old is not None:
                await asyncio.gather(self._old, return_exceptions=True)
                self._old = None
            if automatic and self.record.pinned:
                return None
            await self.loop.call(lambda: setattr(self.record, "reloading", True))
            try:
                return await self._switch(text, plan, reason, pin)
            finally:
                await self.loop.call(lambda: setattr(self.record, "reloading", False))
                self.wake()

    async def _switch(
        self, text: str, plan: GatewayPlan | None, reason: str, pin: str | None
    ) -> GatewayReload:
        systemd = self.systemd
        self.last_start = started = time.monotonic()
        if self.record.color is None:
            await self.adopt_running()  # socket activation may have started one meanwhile
        old_color = self.record.color
        new_color = next(c for c in GATEWAY_COLORS if c != old_color)
        new_unit = gateway_instance(new_color)
        self.files.write_config(new_color, text)
        entry = self.files.archive(text)
        checkpoint("gateway.config_written")
        log.info("gateway.reloading", unit=new_unit, path=str(entry.path), state=reason)
        await systemd.reset_failed(new_unit)
        try:
            # The idle colour may run (a second instance, one still draining, one started
            # by hand) on an older config: a start would be a no-op, a restart loads this.
            idle = await systemd.snapshot(new_unit)
            verb = systemd.restart if idle.running else systemd.start
            outcome = await verb(new_unit, timeout_s=START_TIMEOUT_S)
            snapshot: UnitSnapshot | None = await systemd.snapshot(new_unit)
        except SystemdError as exc:
            outcome, snapshot = str(exc), None
        ok = outcome == "done" and snapshot is not None and snapshot.active_state == "active"
        self.metrics.gateway_reloaded(ok)
        result: GatewayReload = {
            "ok": ok,
            "at": iso_now(),
            "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
            "instance": new_unit,
            "history_id": entry.id,
            "reason": reason,
        }
        if not ok:
            await self._failed(new_unit, text, result, outcome)
            return result
        assert snapshot is not None
        serving = snapshot
        checkpoint("gateway.instance_ready")

        def switch() -> None:
            record = self.record
            record.instances[new_unit] = serving
            record.color, record.snapshot = new_color, serving
            record.applied_text, record.applied_at = text, time.time()
            record.history_id, record.last_reload = entry.id, result
            record.failed_sha = None
            record.reloads += 1
            record.pinned = pin
            self.store.gateway_pin = pin
            if plan is not None:
                record.plan = plan
            self.statefile.save_in_loop()

        await self.loop.call(switch)
        checkpoint("gateway.switched")
        self._failures = 0
        log.info("gateway.reloaded", unit=new_unit, elapsed_ms=result["elapsed_ms"], job=entry.id)
        # A proxy reads its config at start only: the old colour's file may be the current
        # config at once. Whatever starts it next (socket activation when none runs, a
        # hand, the second instance) serves what is in force.
        other = old_color or next(c for c in GATEWAY_COLORS if c != new_color)
        self.files.write_config(other, text)
        other_unit = gateway_instance(other)
        timeout_s = self.graceful_s() + 60
        await self.loop.call(lambda: self.record.retiring.add(other))
        if self.instances == 2:
            # The other instance serves the new config too (it drains first when it runs).
            self._old = asyncio.ensure_future(
                systemd.restart(other_unit, timeout_s=timeout_s + START_TIMEOUT_S)
                if old_color is not None
                else systemd.start(other_unit, timeout_s=START_TIMEOUT_S)
            )
        elif old_color is not None:
            # The old proxy drains its requests in flight (graceful SIGTERM), then exits.
            self._old = asyncio.ensure_future(systemd.stop(other_unit, timeout_s=timeout_s))
        if self._old is not None:
            self._old.add_done_callback(lambda _: self._retired(other))
        else:
            await self.loop.call(lambda: self.record.retiring.discard(other))
        return result

    async def retire(self, color: str) -> None:
        """A spare instance drains and stops (its requests in flight finish)."""
        await self.loop.call(lambda: self.record.retiring.add(color))
        unit = gateway_instance(color)
        log.warning("gateway.spare_stopped", unit=unit)
        try:
            await self.systemd.stop(unit, timeout_s=self.graceful_s() + 60)
        except SystemdError as exc:
            log.error("gateway.spare_stop_failed", unit=unit, error=str(exc))
        finally:
            self._retired(color)

    def _retired(self, color: str) -> None:
        """The old colour stopped (or restarted on the new config): back in the count."""
        self.loop.post_call(lambda: self.record.retiring.discard(color))
        self.wake()

    async def _failed(self, unit: str, text: str, result: GatewayReload, outcome: str) -> None:
        result["error"] = (
            f"{unit} did not become ready ({outcome}); the previous gateway keeps "
            f"serving; see `journalctl --user -u {unit}`"
        )
        with contextlib.suppress(SystemdError):
            await self.systemd.stop(unit)  # no Restart= loop on a broken config

        def keep_old() -> None:
            self.record.last_reload = result
            self.record.failed_sha = sha256_text(text)

        await self.loop.call(keep_old)
        # Tried again later (a start can fail for want of memory, say): backoff from 30 s.
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2**self._failures)
        self._failures += 1
        self.retry_at = time.monotonic() + delay
        asyncio.get_running_loop().call_later(delay, self.wake)
        log.error(
            "gateway.reload_failed",
            unit=unit,
            elapsed_ms=result["elapsed_ms"],
            error=result["error"],
        )
