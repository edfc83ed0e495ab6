"""Drain before a planned stop: the server leaves the gateway's routes (in-process, so new
requests go to its fallbacks), the requests it is answering finish, and only then may it
be stopped. A stream that has begun cannot move to another server: stopping under it cuts
the answer (llama-cpp-python's server closes its streams at SIGTERM).

Used by every planned stop: a restart or rolling restart, `diversityctl stop`, a VRAM
re-plan, the drill's announced stop. Bounded by `supervision.drain_s` (default: the
provider's whole-answer timeout, so a long answer is not cut).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from diversityd.adapters.gatewayruntime import ChannelError, call
from diversityd.daemon.gatewayrecord import GatewayRecord
from diversityd.daemon.loop import StateLoop
from diversityd.daemon.store import Store
from diversityd.gateway import timing_of
from diversityd.log import get_logger
from diversityd.units import GatewayPaths

log = get_logger()

POLL_S = 0.1
QUIET_READS = 2  # zero in flight this many reads in a row: nothing is about to start
ROUTE_WAIT_S = 10.0  # the gateway acknowledging routes without the server, at most
CHANNEL_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class DrainReport:
    provider: str
    waited_s: float  # from leaving the routes to nothing in flight (or the bound)
    in_flight: int  # requests it was answering when it left the routes
    left: int  # still in flight when the drain ended (cut by the stop that follows)
    bound_s: float
    routed_out: bool  # the gateway acknowledged routes without it
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def drain_bound(store: Store, provider: str) -> float:
    """`supervision.drain_s`, else the provider's whole-answer timeout."""
    config = store.config
    assert config is not None
    configured = config.settings.supervision.drain_s
    if configured is not None:
        return configured
    record = store.records[provider]
    return timing_of(record.provider, config.settings.gateway.timeouts).timeout_s


class Drainer:
    def __init__(
        self,
        loop: StateLoop,
        store: Store,
        *,
        record: GatewayRecord | None,
        paths: GatewayPaths | None,
        instances: int,
        wake: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.store = store
        self.record = record  # None: the gateway is not ours; nothing to drain through
        self.paths = paths
        self.instances = instances
        self.wake = wake  # the gateway loop renders the routes again

    async def drain(self, provider: str, *, reason: str, hold: bool = False) -> DrainReport:
        """Out of the routes, then wait for its requests in flight (bounded). The caller
        stops it next, and calls `release` once it is stopped or restarted. With `hold`
        (it comes back: a restart), requests for names no other server can take wait in
        the gateway for it, as long as the drain may, until `end_hold`."""
        bound = drain_bound(self.store, provider)
        if hold and bound > 0:
            await self.loop.call(lambda: self.store.holding.__setitem__(provider, bound))
        record = self.record
        if record is None or self.paths is None or bound <= 0:
            note = "no drain: supervision.drain_s is 0" if bound <= 0 else "the gateway is not ours"
            return DrainReport(provider, 0.0, 0, 0, bound, False, note)
        started = time.monotonic()
        await self.loop.call(lambda: self.store.draining.add(provider))
        self.wake()
        routed_out = await self.loop.wait_until(
            lambda: self._routed_out(provider), min(bound, ROUTE_WAIT_S)
        )
        deadline = started + bound
        first: int | None = None
        count, quiet = 0, 0
        while True:
            count = await self._count(provider)
            first = count if first is None else first
            quiet = quiet + 1 if count == 0 else 0
            if quiet >= QUIET_READS or time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL_S)
        report = DrainReport(
            provider,
            round(time.monotonic() - started, 3),
            first or 0,
            count,
            bound,
            routed_out,
        )
        log_method = log.warning if count else log.info
        log_method(
            "provider.drained",
            provider=provider,
            elapsed_ms=round(report.waited_s * 1000, 1),
            state=reason,
            error=f"{count} requests still in flight after {bound:g} s" if count else None,
            in_flight=report.in_flight,
        )
        return report

    async def release(self, provider: str) -> None:
        """Back in the routes as soon as it serves again (availability still asks that)."""
        await self.loop.call(lambda: self.store.draining.discard(provider))
        self.wake()

    async def end_hold(self, provider: str) -> None:
        """It serves again (or did not come back): its names are no longer held."""
        await self.loop.call(lambda: self.store.holding.pop(provider, None))
        self.wake()

    def _routed_out(self, provider: str) -> bool:
        record = self.record
        assert record is not None
        plan = record.plan
        if plan is None or not record.in_sync:
            return False
        return not any(provider in serving for serving in plan.served_by.values())

    async def _count(self, provider: str) -> int:
        """Its requests in flight in every running instance (an instance whose channel
        does not answer counts as 0: it cannot be waited on)."""
        record, paths = self.record, self.paths
        assert record is not None
        assert paths is not None
        total = 0
        for color in record.running_colors(self.instances):
            try:
                answer = await call(
                    paths.control_socket(color), {"op": "inflight"}, CHANNEL_TIMEOUT_S
                )
            except ChannelError:
                continue
            total += int((answer.get("providers") or {}).get(provider, 0))
        return total
