"""The fleet: this host's record kept in the user's Redis, the peers' records read, and the
peers' gateways probed. What it learns goes into the store (`store.fleet`) through the
state loop, and any change of who serves what wakes the gateway, which adds or removes the
peers' deployments in-process.

Redis is a dependency, not a single point of failure: when it cannot be reached the view
stays as last read, the peers' own gateways are still probed (so a lost peer still leaves
the routes), local serving never waits on it, and the loops come back by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from diversityd.adapters.files import read_text_or_none
from diversityd.adapters.fleetredis import FleetRedis, FleetRedisError
from diversityd.adapters.litellm import key_file_problem
from diversityd.config import FleetSettings
from diversityd.daemon.loop import StateLoop
from diversityd.daemon.metrics import Metrics
from diversityd.daemon.store import Store
from diversityd.fleet import HostRecord, observe_record, own_record
from diversityd.gateway import judged_by_daemon
from diversityd.log import get_logger

log = get_logger()

RETRY_S = 1.0  # after Redis failed, the next try


def read_env_value(path: str, name: str) -> str | None:
    """`NAME=value` from an environment file (the Redis password); never logged."""
    text = read_text_or_none(Path(os.path.expanduser(path))) or ""
    for line in text.splitlines():
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and key.strip() == name:
            return value.strip().strip("'\"")
    return None


class Fleet:
    def __init__(
        self,
        loop: StateLoop,
        store: Store,
        settings: FleetSettings,
        metrics: Metrics,
        *,
        wake: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.wake = wake  # the gateway renders again: peers came or went
        password = None
        if settings.redis_password_env:
            password = os.environ.get(settings.redis_password_env)
            if password is None and settings.environment_file:
                password = read_env_value(settings.environment_file, settings.redis_password_env)
        self.redis = FleetRedis(
            settings.redis_url, password=password, prefix=settings.prefix, name=settings.name
        )
        self._announced: tuple[tuple[str, ...], tuple[tuple[str, str], ...]] | None = None
        self._read_now = asyncio.Event()
        self._publish_now = asyncio.Event()
        self._routes: dict[str, tuple[str, ...]] = {}

    # -- this host's record ---------------------------------------------------------------

    def _own(self) -> HostRecord:
        """The names this host's own servers serve now (local inference only)."""
        store = self.store
        availability = store.availability()
        served = [
            name
            for name, deployments in store.catalog.deployments.items()
            if any(judged_by_daemon(d) and availability.is_live(d) for d in deployments)
        ]
        states = {name: r.state.value for name, r in store.records.items()}
        fleet = store.fleet
        return own_record(fleet.name, self.settings.advertise_url, fleet.seq, served, states)

    async def publish_loop(self) -> None:
        """Refresh the record every heartbeat; announce it when what it says changed."""
        while True:
            await self.loop.call(self._next_seq)
            record = await self.loop.call(self._own)
            said = (record.models, tuple(sorted(record.providers.items())))
            try:
                await self.redis.publish(
                    record, self.settings.ttl_s, announce=said != self._announced
                )
                self._announced = said
                await self._redis_ok()
            except FleetRedisError as exc:
                await self._redis_failed(str(exc))
            self._publish_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._publish_now.wait(), self.settings.heartbeat_s)

    def _next_seq(self) -> None:
        self.store.fleet.seq += 1

    def announce(self) -> None:
        """(From the state loop.) This host's states changed: peers hear it now."""
        self._publish_now.set()

    # -- the peers ------------------------------------------------------------------------

    async def read_loop(self) -> None:
        """The whole view every heartbeat (and at once when a peer announces a change, or
        after a reconnect): a peer whose record expired stays known, marked so."""
        while True:
            try:
                records = await self.redis.read_all()
                await self.loop.call(lambda r=records: self._observe(r))  # type: ignore[misc]
                await self._redis_ok()
            except FleetRedisError as exc:
                await self._redis_failed(str(exc))
            self._read_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._read_now.wait(), self.settings.heartbeat_s)

    async def listen_loop(self) -> None:
        while True:
            try:
                await self.redis.listen(lambda _host: self._read_now.set())
            except FleetRedisError as exc:
                await self._redis_failed(str(exc))
                await asyncio.sleep(RETRY_S)
            self._read_now.set()  # reconnected: read the whole view again

    def _observe(self, records: dict[str, HostRecord]) -> None:
        """(In the state loop.)"""
        fleet, now = self.store.fleet, time.monotonic()
        for host, record in records.items():
            if host == fleet.name:
                continue
            known = host in fleet.peers
            fleet.peers[host] = observe_record(fleet.peers.get(host), record, now)
            if not known:
                log.info("fleet.peer_joined", state=host, path=record.gateway_url)
        for host, view in fleet.peers.items():
            if host not in records and view.in_redis:
                view.in_redis = False
                log.warning("fleet.peer_expired", state=host,
                            error="its record expired: its daemon is gone or cut off")  # fmt: skip
        self._routes_may_change()

    async def probe_loop(self) -> None:
        """Each known peer's gateway, every `probe_interval_s`, at once: a frozen host
        completes TCP handshakes, so only a probe's timeout finds it."""
        settings = self.settings
        async with httpx.AsyncClient(trust_env=False) as client:
            while True:
                peers = [(h, v.record.gateway_url) for h, v in self.store.fleet.peers.items()]
                results = await asyncio.gather(
                    *(self._probe(client, url) for _, url in peers), return_exceptions=True
                )
                outcome = {
                    host: r if isinstance(r, tuple) else (False, str(r), None)
                    for (host, _), r in zip(peers, results, strict=True)
                }
                if outcome:
                    await self.loop.call(lambda o=outcome: self._probed(o))  # type: ignore[misc]
                await asyncio.sleep(settings.probe_interval_s)

    async def _probe(
        self, client: httpx.AsyncClient, url: str
    ) -> tuple[bool, str | None, float | None]:
        started = time.monotonic()
        try:
            answer = await client.get(
                f"{url.rstrip('/')}/health/liveliness", timeout=self.settings.probe_timeout_s
            )
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}"[:200], None
        elapsed = round((time.monotonic() - started) * 1000, 1)
        if answer.status_code != 200:
            return False, f"HTTP {answer.status_code}", elapsed
        return True, None, elapsed

    def _probed(self, outcome: dict[str, tuple[bool, str | None, float | None]]) -> None:
        """(In the state loop.)"""
        now = time.monotonic()
        for host, (ok, error, elapsed_ms) in outcome.items():
            view = self.store.fleet.peers.get(host)
            if view is None:
                continue
            if view.probe_ok is not None and view.probe_ok != ok and ok:
                log.info("fleet.peer_probe", state=host, elapsed_ms=elapsed_ms)
            elif view.probe_ok is not None and view.probe_ok != ok:
                log.warning("fleet.peer_probe", state=host, error=error)
            view.probe_ok, view.probe_error, view.probe_ms, view.probe_at = (
                ok,
                error,
                elapsed_ms,
                now,
            )
        self._routes_may_change()

    def _routes_may_change(self) -> None:
        """(In the state loop.) The gateway renders again if who serves what changed."""
        routes = self.store.fleet.routes(time.monotonic(), self.settings.probe_interval_s)
        summary = {m: tuple(r.host for r in rs) for m, rs in routes.items()}
        if summary != self._routes:
            self._routes = summary
            self.wake()

    # -- Redis' health ------------------------------------------------------------------------

    async def _redis_ok(self) -> None:
        def mark() -> None:
            fleet = self.store.fleet
            if fleet.redis_ok is False:
                log.info("fleet.redis_back", path=self.redis.url)
            fleet.redis_ok, fleet.redis_error, fleet.redis_down_since = True, None, None

        await self.loop.call(mark)

    async def _redis_failed(self, error: str) -> None:
        def mark() -> None:
            fleet = self.store.fleet
            if fleet.redis_ok is not False:
                log.error("fleet.redis_down", path=self.redis.url,
                          error=f"{error}; peers as last probed")  # fmt: skip
                fleet.redis_down_since = time.monotonic()
            fleet.redis_ok, fleet.redis_error = False, error

        await self.loop.call(mark)

    def check_key_file(self) -> str | None:
        """The fleet key must be the user's alone (it admits a peer's requests)."""
        return key_file_problem(Path(os.path.expanduser(self.settings.key_file)))

    async def run(self, startup_done: asyncio.Event) -> None:
        """Every loop, each restarted after a failure it did not expect. This host's record
        is first written once its servers have answered their first probes: a restarted
        daemon would otherwise tell its peers it serves nothing (the record it left in
        Redis is right meanwhile)."""
        await self.loop.call(lambda: setattr(self.store.fleet, "name", self.settings.name))
        problem = self.check_key_file()
        if problem:
            log.warning("fleet.key_unsafe", path=self.settings.key_file, error=problem)
        readers = (self.read_loop, self.listen_loop, self.probe_loop)
        await asyncio.gather(
            *(self._supervised(make) for make in readers), self._publish_after(startup_done)
        )

    async def _publish_after(self, startup_done: asyncio.Event) -> None:
        await startup_done.wait()
        await self._supervised(self.publish_loop)

    async def _supervised(self, make: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await make()
            except Exception as exc:  # noqa: BLE001 - a fleet loop must not end the daemon
                log.error("fleet.loop_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(RETRY_S)

    async def close(self) -> None:
        await self.redis.close()
