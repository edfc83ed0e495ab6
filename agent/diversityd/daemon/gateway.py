"""Owning the LiteLLM gateway: routes follow the providers' state in-process; a new process
only for what a running one cannot take.

Each instance runs the launcher (adapters/gatewaylauncher.py), which serves a control
channel on LiteLLM's own event loop. When the providers' state changes, the daemon renders
the config again (gateway.py) and sends the instances their new routes (deployments and
fallbacks) over that channel: the router changes between two requests, within milliseconds
of the state change, and each colour's config file is rewritten too, so a `Restart=` of an
instance comes back on the current routes. A new process (gatewayswitch.py) is started only
when what a process fixes at start changed (settings, the launcher, LiteLLM itself), when an
instance's channel does not answer, or when no instance runs (gatewaysync.py decides).

Gateway state is written only through the daemon's state loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from diversityd.adapters import gatewaychannel
from diversityd.adapters.files import read_text_or_none
from diversityd.adapters.gatewaylauncher import key_file_is_environment
from diversityd.adapters.litellm import gateway_places, prepare_key
from diversityd.adapters.systemd import Systemd
from diversityd.daemon.gatewayrecord import GatewayRecord
from diversityd.daemon.gatewayswitch import ProcessSwitch
from diversityd.daemon.loop import StateLoop, checkpoint
from diversityd.daemon.metrics import Metrics
from diversityd.daemon.statefile import StateFile
from diversityd.daemon.store import Store, sha256_text
from diversityd.gateway import GatewayPlan, drain_seconds, render_gateway, with_routes
from diversityd.gatewaysync import Change, InstanceView, Wanted, decide
from diversityd.log import get_logger
from diversityd.statusdoc import GatewayChange, GatewayReload
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

MIN_INTERVAL_S = 5.0  # between the starts of two new processes
FIRST_RENDER_WAIT_S = 120.0  # at start-up, wait this long for the providers' first answers
CHANNEL_TRIES = 3  # a channel that does not answer this many times in a row: a new process
CHANNEL_RETRY_S = 1.0


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
        # Wakes the sync loop: the providers' state (so the render) may have changed.
        self._dirty = asyncio.Event()
        self._channel_failures = 0
        self._asking = ChangeAnswers()  # `reload` asks how its change reached the gateway
        self.switch = ProcessSwitch(
            loop,
            store,
            systemd,
            statefile,
            metrics,
            files=self.files,
            record=self.record,
            graceful_s=self.graceful_s,
            instances=gateway.instances,
            wake=self._dirty.set,
        )
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

    async def apply(
        self, text: str, plan: GatewayPlan | None, *, reason: str, pin: str | None = None
    ) -> GatewayReload | None:
        """A new process on `text` (a rollback)."""
        return await self.switch.apply(text, plan, reason=reason, pin=pin)

    # -- events from the state loop (synchronous, single writer) -----------------------------

    def mark_dirty(self) -> None:
        self._dirty.set()

    def on_unit_changed(self, unit: str, changed: dict[str, Any]) -> None:
        self.switch.on_unit_changed(unit, changed)

    def render(self) -> GatewayPlan:
        config = self.store.config
        assert config is not None
        states = {name: r.state.value for name, r in self.store.records.items()}
        fleet = config.settings.fleet
        peers = self.store.fleet.routes(time.monotonic(), fleet.probe_interval_s) if fleet else None
        return render_gateway(
            config,
            self.store.catalog,
            self.store.availability(),
            states=states,
            holding=self.store.holding,
            peers=peers,
        )

    async def in_flight(self) -> dict[str, int] | None:
        """Requests in flight per provider, over every running instance (None: none said)."""
        colors = self.record.running_colors(self.switch.instances)
        answers = await asyncio.gather(
            *(gatewaychannel.in_flight(self.paths.control_socket(c)) for c in colors),
            return_exceptions=True,
        )
        counts: dict[str, int] = {}
        said = False
        for answer in answers:
            if isinstance(answer, dict):
                said = True
                for provider, count in answer.items():
                    counts[provider] = counts.get(provider, 0) + count
        return counts if said else None

    async def next_change(self, timeout_s: float) -> GatewayChange | None:
        """How the next change reaches the gateway (for `reload`), once it is decided."""
        self._dirty.set()
        return await self._asking.next(timeout_s)

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
        """Adopt what runs, then bring the instances to what the state renders, whenever
        it may have changed."""
        systemd = self.systemd
        await systemd.watch(self.instance_units(), self._on_unit_change)
        await self.switch.adopt_running()
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
            self._dirty.clear()
            await self._sync()

    async def _sync(self) -> None:
        record = self.record
        if record.pinned:
            if record.state() not in ("ready", "starting", "reloading") and record.applied_text:
                await self._new_process(record.applied_text, None, "serving instance down")
            return
        if self.switch.busy:
            return  # the switch wakes the loop when it ends
        plan = self.render()
        text = plan.text()
        await self.loop.call(lambda: setattr(self.record, "plan", plan))
        running = record.running_colors(self.switch.instances)
        if not running:
            if not self.switch.restarting_by_itself():
                await self._new_process(text, plan, "no gateway instance runs")
            return
        self.switch.retire_spares()
        paths = self.paths
        views = list(
            await asyncio.gather(
                *(gatewaychannel.hello(c, paths.control_socket(c)) for c in running)
            )
        )
        routes = plan.routes()
        wanted = Wanted(
            process_settings=plan.process_settings(),
            routes_digest=gatewaychannel.routes_digest(routes),
            launcher_sha=gatewaychannel.launcher_sha(),
            litellm=gatewaychannel.installed_litellm(paths.litellm_python),
        )
        decisions = decide(views, wanted)
        if self._channel_silent(views):
            return
        process = [d.reason for d in decisions.values() if d.change is Change.PROCESS]
        if process and await self._new_process(text, plan, process[0]):
            return
        # None is needed, or none can start now (a config LiteLLM refused: retried later;
        # the interval between two): the running instances take the routes meanwhile, on
        # the settings they run.
        if process:
            text = with_routes(views[-1].started_document or plan.document, routes)
        stale = [v.color for v in views if v.routes_digest != wanted.routes_digest]
        if stale:
            await self._push(text, routes, stale, wanted.routes_digest, pending=bool(process))
        else:
            self._keep_files(text)
            acked = dict.fromkeys(running, wanted.routes_digest)
            await self.loop.call(lambda: self._in_sync(text, acked, pending=bool(process)))
            self._asking.answer(None)
        if self.switch.instances == 2 and len(running) < 2 and record.applied_text:
            self.loop.spawn(self.switch.start_second(record.applied_text), name="gateway-second")

    def _channel_silent(self, views: list[InstanceView]) -> bool:
        """A channel that does not answer may belong to a busy proxy: asked again a few
        times before a new process replaces it."""
        if all(v.answered for v in views):
            self._channel_failures = 0
            return False
        self._channel_failures += 1
        if self._channel_failures >= CHANNEL_TRIES:
            self._channel_failures = 0
            return False
        silent = next(v for v in views if not v.answered)
        log.warning(
            "gateway.channel_silent", unit=gateway_instance(silent.color), error=silent.error
        )
        asyncio.get_running_loop().call_later(CHANNEL_RETRY_S, self._dirty.set)
        return True

    async def _push(
        self,
        text: str,
        routes: dict[str, Any],
        colors: list[str],
        digest: str,
        *,
        pending: bool = False,
    ) -> None:
        """New routes to running instances, in-process; their config files first."""
        started = time.monotonic()
        self._keep_files(text)
        checkpoint("gateway.routes_written")
        results = await asyncio.gather(
            *(gatewaychannel.push_routes(self.paths.control_socket(c), routes) for c in colors),
            return_exceptions=True,
        )
        failed = {
            c: r for c, r in zip(colors, results, strict=True) if isinstance(r, BaseException)
        }
        elapsed_ms = round((time.monotonic() - started) * 1000, 2)
        self.metrics.gateway_routes_updated(not failed)
        if failed:
            color, error = next(iter(failed.items()))
            log.error("gateway.routes_failed", unit=gateway_instance(color), error=str(error))
            await self._new_process(text, self.record.plan, f"{gateway_instance(color)}: {error}")
            return
        acked = dict.fromkeys(colors, digest)

        def update() -> None:
            self._in_sync(text, acked, pending=pending)
            self.record.route_updates += 1
            self.record.last_change = describe_change(Change.ROUTES, "the providers' state changed",
                                                   elapsed_ms)  # fmt: skip

        await self.loop.call(update)
        changed = [r for r in results if isinstance(r, dict)]
        log.info(
            "gateway.routes_updated",
            unit=",".join(gateway_instance(c) for c in colors),
            elapsed_ms=elapsed_ms,
            state=_summary(changed[0]) if changed else None,
        )
        self._asking.answer(self.record.last_change)

    def _in_sync(self, text: str, acked: dict[str, str], *, pending: bool = False) -> None:
        """(In the state loop.) The instances serve what was rendered from the state (or
        its routes, `pending` a new process)."""
        record = self.record
        record.routes_at.update(acked)
        if record.applied_text != text:
            record.applied_text, record.applied_at = text, time.time()
        record.in_sync = not pending

    def _keep_files(self, text: str) -> None:
        """Both colours' files hold the config in force: a restarted instance serves it."""
        for color in GATEWAY_COLORS:
            if read_text_or_none(self.files.config_path(color)) != text:
                self.files.write_config(color, text)

    async def _new_process(self, text: str, plan: GatewayPlan | None, reason: str) -> bool:
        """Start one on `text` (True), or not now (False: tried again later)."""
        record = self.record
        if sha256_text(text) == record.failed_sha and time.monotonic() < self.switch.retry_at:
            return False  # this config's proxy would not start: tried again after a while
        wait = self.switch.last_start + MIN_INTERVAL_S - time.monotonic()
        if wait > 0:
            asyncio.get_running_loop().call_later(wait, self._dirty.set)
            return False
        await self.loop.call(lambda: setattr(self.record, "in_sync", False))
        started = time.monotonic()
        self._asking.answer(describe_change(Change.PROCESS, reason, 0.0))
        result = await self.switch.apply(text, plan, reason=reason, automatic=True)
        if result is None:
            return True
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)

        def update() -> None:
            self.record.last_change = describe_change(Change.PROCESS, reason, elapsed_ms,
                                                   result.get("error"))  # fmt: skip
            if result["ok"] and plan is not None:
                self.record.routes_at = {}
                self.record.in_sync = True

        await self.loop.call(update)
        return True

    # -- control --------------------------------------------------------------------------------

    def unpin(self) -> None:
        """Called from the state loop on a configuration reload: automatic changes resume."""
        self.record.pinned = None
        self.record.failed_sha = None
        if self.store.gateway_pin is not None:
            self.store.gateway_pin = None
            self.switch.statefile.save_in_loop()
        self._dirty.set()


class ChangeAnswers:
    """Who waits to hear how the next change reached the gateway (`reload`)."""

    def __init__(self) -> None:
        self._waiting: list[asyncio.Future[GatewayChange]] = []

    async def next(self, timeout_s: float) -> GatewayChange | None:
        future: asyncio.Future[GatewayChange] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return None

    def answer(self, change: GatewayChange | None) -> None:
        waiting, self._waiting = self._waiting, []
        for future in waiting:
            if not future.done():
                future.set_result(change or describe_change(Change.NONE, "in sync", 0.0))


def describe_change(
    change: Change, reason: str, elapsed_ms: float, error: str | None = None
) -> GatewayChange:
    entry: GatewayChange = {
        "change": change.value,
        "reason": reason,
        "at": iso_now(),
        "elapsed_ms": elapsed_ms,
        "ok": error is None,
    }
    if error is not None:
        entry["error"] = error
    return entry


def _summary(changed: dict[str, Any]) -> str:
    return ", ".join(
        f"{len(changed.get(key) or [])} {key}" for key in ("added", "removed", "updated")
    )
