"""Failover drills: take an owned provider down (kill, a planned stop, an unannounced stop
from outside, or hang) while requests for its
models flow through the gateway, wait until the gateway has settled, put it back, and
report who answered. What a drill's answers say is drill.py's (pure)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time
from typing import Any

from diversityd.adapters.gatewayclient import ask, new_client
from diversityd.adapters.litellm import read_master_key
from diversityd.adapters.systemd import Systemd, SystemdError
from diversityd.daemon.draining import Drainer
from diversityd.daemon.gateway import GatewayManager
from diversityd.daemon.jobs import Jobs
from diversityd.daemon.loop import ProviderLocks, StateLoop
from diversityd.daemon.metrics import Metrics
from diversityd.daemon.store import Job, ProviderRecord, Store
from diversityd.drill import (
    Answer,
    DrillMode,
    DrillReport,
    cloud_answered,
    drill_settled,
    local_fallbacks,
    overall_ok,
    render_without,
)
from diversityd.log import get_logger
from diversityd.state import ProviderState

log = get_logger()

DRILL_CLIENT_TIMEOUT_S = 120.0  # a hung backend costs a request its full timeout first
DRILL_SETTLE_S = 120.0
DRILL_RESTORE_S = 180.0
DRILL_READY_S = 180.0  # how long to wait for the provider and the gateway before a drill
DRILL_BASELINE_S = 30.0  # ... and for a first answer from it through the gateway


class Drills:
    def __init__(
        self,
        loop: StateLoop,
        store: Store,
        systemd: Systemd,
        *,
        jobs: Jobs,
        locks: ProviderLocks,
        gateway: GatewayManager,
        metrics: Metrics,
        drainer: Drainer,
    ) -> None:
        self.drainer = drainer
        self.loop = loop
        self.store = store
        self.systemd = systemd
        self.jobs = jobs
        self.locks = locks
        self.gateway = gateway
        self.metrics = metrics

    async def run_job(self, job: Job) -> dict[str, Any]:
        """One drill per provider, in turn. It holds every owned provider: the drilled one
        and those its models fall back to are not restarted by anything else meanwhile."""
        mode = DrillMode(job.params["mode"])
        reports: list[DrillReport] = []
        owned = [r.name for r in self.store.owned_records()]
        async with self.locks.holding(owned, job.id):
            for name in job.params["providers"]:
                report = await self._drill(job, name, mode)
                self.metrics.drilled(report)
                reports.append(report)
                self.jobs.report(job, {"step": "drilled", **report.to_json()})
        return {"drills": [r.to_json() for r in reports], "ok": overall_ok(reports)}

    async def _drill(self, job: Job, name: str, mode: DrillMode) -> DrillReport:
        record = self.store.records[name]
        unit = record.unit
        assert unit is not None
        gateway = self.gateway.record
        if not await self.loop.wait_until(
            lambda: gateway.settled() and record.state is ProviderState.READY, DRILL_READY_S
        ):
            return DrillReport(name, mode, (), time.monotonic(), False, "not ready to drill")
        plan = gateway.plan
        models = [m for m in record.models if plan is not None and m in plan.served_by]
        if plan is not None and self.store.config is not None:
            # never a paid request: not for a name a cloud answers now, or would answer
            # while this provider is down (substituted for it)
            down = render_without(self.store.config, self.store.catalog,
                                  self.store.availability(), name)  # fmt: skip
            cloud = {*cloud_answered(plan, models), *cloud_answered(down, models)}
            models = [m for m in models if m not in cloud]
        try:
            key = await asyncio.to_thread(read_master_key, self.gateway.key_file)
        except (ValueError, OSError) as exc:
            return DrillReport(name, mode, (), time.monotonic(), False, str(exc))
        answers: list[Answer] = []
        stop = asyncio.Event()
        chains = local_fallbacks(plan) if plan is not None else []

        async def send(model: str) -> None:
            async with new_client(DRILL_CLIENT_TIMEOUT_S) as client:
                stream = False
                while not stop.is_set():
                    stream = not stream  # plain and streaming, in turn
                    answers.append(
                        await ask(client, gateway.url, key, model, stream=stream, fallbacks=chains)
                    )
                    await asyncio.sleep(0.05)

        senders = [asyncio.ensure_future(send(model)) for model in models]
        error: str | None = None
        restored = False
        put_back = mode is DrillMode.KILL  # systemd's Restart= brings a killed one back
        taken_down_at = time.monotonic()
        try:
            # A baseline through the healthy provider: until it answers through the gateway
            # (LiteLLM may still hold it in cooldown from an earlier failure).
            own = record.provider.base_url.rstrip("/")
            deadline = time.monotonic() + DRILL_BASELINE_S
            await asyncio.sleep(1.0)
            while time.monotonic() < deadline and not any(  # noqa: ASYNC110 - polls answers
                (a.api_base or "").startswith(own) for a in answers
            ):
                await asyncio.sleep(0.2)
            self.jobs.report(job, {"provider": name, "step": "taking down", "mode": mode})
            log.warning("drill.takedown", provider=name, unit=unit, state=mode.value, job=job.id)
            taken_down_at = time.monotonic()
            if mode is DrillMode.KILL:
                await self.systemd.kill(unit, int(signal.SIGKILL))
            elif mode is DrillMode.STOP:
                # announced: drained first (a planned stop loses nothing)
                await self.loop.call(functools.partial(self.store.expected_stops.add, unit))
                drained = await self.drainer.drain(name, reason="drill")
                self.jobs.report(job, {"provider": name, "step": "drained", **drained.to_json()})
                try:
                    await self.systemd.stop(unit)
                finally:
                    await self.drainer.release(name)
            elif mode is DrillMode.OUTSIDE_STOP:
                # unannounced, as another tool would: failover, not a drain, is tested;
                # still diversityd's own stop job, not the user's (intent.py)
                await self.loop.call(functools.partial(self.store.expected_stops.add, unit))
                await self.systemd.stop(unit)
            else:
                await self.systemd.kill(unit, int(signal.SIGSTOP))
            await self._wait_settled(record, answers, taken_down_at, mode)
            self.jobs.report(job, {"provider": name, "step": "restoring"})
            await self._put_back(unit, mode)
            put_back = True
            restored = await self.loop.wait_until(
                lambda: (
                    record.state is ProviderState.READY
                    and gateway.settled()
                    and plan is not None
                    and gateway.plan is not None
                    and all(name in gateway.plan.served_by.get(m, ()) for m in models)
                ),
                DRILL_RESTORE_S,
            )
            await asyncio.sleep(1.0)  # and it serves again through the gateway
        except (SystemdError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            stop.set()
            if not put_back:
                # Cancelled or failed half-way: never leave a provider stopped or frozen.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._put_back(unit, mode))
            await asyncio.gather(*senders, return_exceptions=True)
        report = DrillReport(name, mode, tuple(answers), taken_down_at, restored, error)
        log.info(
            "drill.finished",
            provider=name,
            state=mode.value,
            job=job.id,
            error=error or (f"{len(report.failed)} requests failed" if report.failed else None),
        )
        return report

    async def _put_back(self, unit: str, mode: DrillMode) -> None:
        if mode in (DrillMode.STOP, DrillMode.OUTSIDE_STOP):
            await self.systemd.start(unit)
        elif mode is DrillMode.HANG:
            try:
                await self.systemd.kill(unit, int(signal.SIGCONT))
            except SystemdError as exc:
                # the daemon killed it as hung first (hung_grace_s): systemd restarts it
                if exc.dbus_name != "org.freedesktop.systemd1.NoSuchProcess":
                    raise

    async def _wait_settled(
        self, record: ProviderRecord, answers: list[Answer], since: float, mode: DrillMode
    ) -> None:
        """Until the gateway stopped trying the dead provider (drill.drill_settled)."""
        deadline = time.monotonic() + DRILL_SETTLE_S
        seen_down = False
        while time.monotonic() < deadline:
            seen_down = seen_down or record.state is not ProviderState.READY
            if drill_settled(
                answers,
                since,
                seen_down=seen_down,
                mode=mode,
                gateway_settled=self.gateway.record.settled(),
            ):
                return
            await asyncio.sleep(0.2)
