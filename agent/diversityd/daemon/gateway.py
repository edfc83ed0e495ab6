"""Owning the LiteLLM gateway: blue/green reloads on one systemd-held socket.

LiteLLM cannot reload its config in place and takes ~12 s to start. So a reload writes the
new config for the idle colour, starts that instance on the SAME listening socket (systemd's
`diversityd-gateway.socket`), waits for its READY=1 (it really serves), and only then stops
the old instance, which lets its requests in flight finish. A new instance that fails to
start is stopped again: the old one never stopped serving and its config stays in place.

Reloads happen exactly when the rendered config's bytes change, debounced and rate-limited,
never two at once. Gateway state is written only through the daemon's state loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

from diversityd.adapters.files import read_text_or_none
from diversityd.adapters.gatewaylauncher import key_file_is_environment
from diversityd.adapters.litellm import gateway_places, prepare_key
from diversityd.adapters.systemd import Systemd, SystemdError
from diversityd.daemon.loop import StateLoop, checkpoint
from diversityd.daemon.metrics import Metrics
from diversityd.daemon.statefile import StateFile
from diversityd.daemon.store import GatewayRecord, Store, sha256_text
from diversityd.gateway import GatewayPlan, drain_seconds, render_gateway, unavailable_base
from diversityd.log import get_logger
from diversityd.state import UnitSnapshot
from diversityd.statusdoc import GatewayReload
from diversityd.timefmt import iso_now
from diversityd.units import (
    GATEWAY_COLORS,
    GATEWAY_SOCKET,
    RenderedUnit,
    gateway_instance,
    listen_address,
    render_gateway_units,
)

log = get_logger()

DEBOUNCE_S = 1.0  # let a burst of state changes settle into one reload
MIN_INTERVAL_S = 5.0  # between the starts of two reloads
START_TIMEOUT_S = 200.0
FIRST_RENDER_WAIT_S = 120.0  # at start-up, wait this long for the providers' first answers
RETRY_FIRST_S, RETRY_MAX_S = 30.0, 600.0  # a config whose proxy would not start


class GatewayManager:
    def __init__(
        self,
        loop: StateLoop,
        store: Store,
        systemd: Systemd,
        statefile: StateFile,
        metrics: Metrics,
        *,
        on_unit_change: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.loop = loop
        self.store = store
        self.systemd = systemd
        self.statefile = statefile
        self.metrics = metrics
        self._on_unit_change = on_unit_change  # the bus callback every watched unit shares
        config = store.config
        assert config is not None
        gateway = config.settings.gateway
        self.files, self.key_file, self.paths = gateway_places(config.settings)
        self.record = GatewayRecord(
            url=f"http://{listen_address(gateway.host, gateway.port)}",
            key_file=str(self.key_file),
            config_dir=str(self.files.config_dir),
            pinned=store.gateway_pin,  # a rollback outlives a daemon restart
        )
        # Wakes the reload loop: the providers' state (so the render) may have changed.
        self._dirty = asyncio.Event()
        # One blue/green switch at a time (automatic reloads and rollbacks).
        self._switching = asyncio.Lock()
        self._failures = 0  # reloads failed in a row: the next try waits longer
        self._retry_at = 0.0
        self._draining: asyncio.Future[str] | None = None  # the old instance stopping
        self._last_start = 0.0
        self.prepare_key()  # before the first render: the units name the key file

    # -- units and files ------------------------------------------------------------------

    def graceful_s(self) -> float:
        """How long an old proxy may drain (gateway.drain_seconds)."""
        config = self.store.config
        assert config is not None
        return drain_seconds(config.settings)

    def units(self) -> list[RenderedUnit]:
        config = self.store.config
        assert config is not None
        paths = dataclasses.replace(
            self.paths, key_is_environment=key_file_is_environment(str(self.key_file))
        )
        return render_gateway_units(
            config.settings.gateway, paths, self.store.unit_context, self.graceful_s()
        )

    def prepare_key(self) -> None:
        """Adopt the key file named in the settings, or generate one (0600) once."""
        problem = prepare_key(self.key_file)
        if problem:
            self.record.warnings.append(problem)

    @staticmethod
    def instance_units() -> list[str]:
        return [gateway_instance(color) for color in GATEWAY_COLORS]

    # -- events from the state loop (synchronous, single writer) -----------------------------

    def mark_dirty(self) -> None:
        self._dirty.set()

    def on_unit_changed(self, unit: str, changed: dict[str, Any]) -> None:
        record = self.record
        base = record.instances.get(unit)
        if base is None:
            return
        snapshot = record.instances[unit] = base.merged(changed)
        if unit == record.unit:
            record.snapshot = snapshot
            if snapshot.active_state in ("failed", "inactive") and not record.reloading:
                log.error("gateway.instance_down", unit=unit, state=snapshot.active_state)
                self._dirty.set()  # the loop starts one on the current config
        elif base.active_state != "active" and snapshot.active_state == "active":
            # Just started by traffic on the socket (the `Service=` colour) while none ran,
            # or by hand: it is the one serving now; its config file is the last applied one
            # (both colours' files are written). (A reload's own start happens while
            # `reloading`, and an old instance draining was active already.)
            if record.reloading:
                return
            color = next(c for c in GATEWAY_COLORS if gateway_instance(c) == unit)
            record.color, record.snapshot = color, snapshot
            record.applied_text = read_text_or_none(self.files.config_path(color))
            log.warning("gateway.adopted", unit=unit, pid=snapshot.main_pid)
            self._dirty.set()

    def render(self) -> GatewayPlan:
        config = self.store.config
        assert config is not None
        availability, grace_left_s = self.store.gateway_availability()
        if grace_left_s is not None:  # rendered again when it ends, the server back or not
            asyncio.get_running_loop().call_later(grace_left_s + 0.05, self._dirty.set)
        base = unavailable_base(config.settings)
        return render_gateway(config, self.store.catalog, availability, unavailable_base=base)

    # -- the loop -------------------------------------------------------------------------------

    async def supervise(self, startup_done: asyncio.Event) -> None:
        """The gateway loop must outlive a failed systemd call: log it, wait, go on."""
        while True:
            try:
                await self._run(startup_done)
            except Exception as exc:  # noqa: BLE001 - restarted after a pause, never lost
                log.error("gateway.loop_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(5)

    async def _run(self, startup_done: asyncio.Event) -> None:
        """Adopt what runs, then reload whenever the rendered bytes change."""
        systemd = self.systemd
        await systemd.watch(self.instance_units(), self._on_unit_change)
        await self._adopt_running()
        snapshot = await systemd.snapshot(GATEWAY_SOCKET)
        if snapshot.active_state != "active":
            await systemd.start(GATEWAY_SOCKET)
            log.info("gateway.socket_started", unit=GATEWAY_SOCKET, path=self.record.url)
        try:
            await asyncio.wait_for(startup_done.wait(), FIRST_RENDER_WAIT_S)
        except TimeoutError:
            log.warning("gateway.providers_slow", error="rendering before every provider answered")
        self._dirty.set()
        while True:
            await self._dirty.wait()
            await asyncio.sleep(DEBOUNCE_S)
            self._dirty.clear()
            wait = self._last_start + MIN_INTERVAL_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            record = self.record
            serving = record.state() in ("ready", "starting", "reloading")
            if record.pinned:
                if not serving and record.applied_text is not None:
                    await self.apply(record.applied_text, None, reason="serving instance down",
                                     pin=record.pinned)  # fmt: skip
                continue
            plan = self.render()
            text = plan.text()

            def observe(p: GatewayPlan = plan, t: str = text) -> None:
                self.record.plan = p
                self.record.in_sync = t == self.record.applied_text

            await self.loop.call(observe)
            if text == record.applied_text and serving:
                continue
            if sha256_text(text) == record.failed_sha and time.monotonic() < self._retry_at:
                continue  # this config's proxy would not start: tried again after a while
            reason = "providers changed" if text != record.applied_text else "instance down"
            await self.apply(text, plan, reason=reason, automatic=serving)

    async def _adopt_running(self) -> None:
        """After a daemon restart: the instance that runs is the current one."""
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
        for _, other, _ in running[:-1]:  # a reload interrupted by a daemon restart
            await self.systemd.stop(gateway_instance(other))

    async def apply(
        self,
        text: str,
        plan: GatewayPlan | None,
        *,
        reason: str,
        pin: str | None = None,
        automatic: bool = False,
    ) -> GatewayReload | None:
        """Blue/green: start the idle colour on the new config; once it serves, the old one
        drains (in the background; the next reload waits for it). An automatic reload is
        dropped (None) when, by the time it may switch, a rollback has pinned the gateway
        or the config is already in force."""
        async with self._switching:
            if self._draining is not None:
                await asyncio.gather(self._draining, return_exceptions=True)
                self._draining = None
            if automatic and (self.record.pinned or text == self.record.applied_text):
                return None
            await self.loop.call(lambda: setattr(self.record, "reloading", True))
            try:
                return await self._switch(text, plan, reason, pin)
            finally:
                await self.loop.call(lambda: setattr(self.record, "reloading", False))

    async def _switch(
        self, text: str, plan: GatewayPlan | None, reason: str, pin: str | None
    ) -> GatewayReload:
        systemd = self.systemd
        self._last_start = time.monotonic()
        started = time.monotonic()
        if self.record.color is None:
            await self._adopt_running()  # socket activation may have started one meanwhile
        old_color = self.record.color
        new_color = next(c for c in GATEWAY_COLORS if c != old_color)
        new_unit = gateway_instance(new_color)
        self.files.write_config(new_color, text)
        entry = self.files.archive(text)
        checkpoint("gateway.config_written")
        log.info("gateway.reloading", unit=new_unit, path=str(entry.path), state=reason)
        await systemd.reset_failed(new_unit)
        try:
            # The idle colour should not run; if it does (still draining, started by hand),
            # it serves an older config: a start would be a no-op, a restart loads this one.
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
        if result["ok"]:
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
                record.in_sync = plan is not None
                record.pinned = pin
                self.store.gateway_pin = pin
                if plan is not None:
                    record.plan = plan
                self.statefile.save_in_loop()

            await self.loop.call(switch)
            checkpoint("gateway.switched")
            self._failures = 0
            if old_color is not None:
                # A proxy reads its config at start only: the old colour's file may be the
                # current config at once. Whatever starts it next (socket activation when
                # none runs, a hand) serves what is in force.
                self.files.write_config(old_color, text)
            log.info(
                "gateway.reloaded", unit=new_unit, elapsed_ms=result["elapsed_ms"], job=entry.id
            )
            if old_color is not None:
                # The old proxy drains its requests in flight (graceful SIGTERM), then exits.
                self._draining = asyncio.ensure_future(
                    systemd.stop(gateway_instance(old_color), timeout_s=self.graceful_s() + 60)
                )
            return result
        result["error"] = (
            f"{new_unit} did not become ready ({outcome}); the previous gateway keeps "
            f"serving; see `journalctl --user -u {new_unit}`"
        )
        with contextlib.suppress(SystemdError):
            await systemd.stop(new_unit)  # no Restart= loop on a broken config

        def keep_old() -> None:
            self.record.last_reload = result
            self.record.failed_sha = sha256_text(text)

        await self.loop.call(keep_old)
        # Tried again later (a start can fail for want of memory, say): backoff from 30 s.
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2**self._failures)
        self._failures += 1
        self._retry_at = time.monotonic() + delay
        asyncio.get_running_loop().call_later(delay, self._dirty.set)
        log.error(
            "gateway.reload_failed",
            unit=new_unit,
            elapsed_ms=result["elapsed_ms"],
            error=result["error"],
        )
        return result

    # -- control --------------------------------------------------------------------------------

    def unpin(self) -> None:
        """Called from the state loop on a configuration reload: automatic reloads resume."""
        self.record.pinned = None
        self.record.failed_sha = None
        if self.store.gateway_pin is not None:
            self.store.gateway_pin = None
            self.statefile.save_in_loop()
        self._dirty.set()
