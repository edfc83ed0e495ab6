"""The GPU plan: read NVML and the accepted GGUFs, plan every card (gpuplan.plan_gpus), and
watch the cards for moves that warrant a new plan (with hysteresis: no restart storms).

NVML is called in a worker thread with a timeout, one call at a time and never under a
lock: a GPU fallen off the bus can hang the driver's call, and must not stall anything
else. When NVML fails the plan in force stays (after a daemon restart: the last plan's
word per unit, from the state file), and the cards are looked at again every poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Awaitable, Callable

import psutil

from diversityd.adapters.nvml import NvmlError, read_gpus
from diversityd.cardplan import GpuSnapshot
from diversityd.daemon.loop import StateLoop
from diversityd.daemon.metrics import Metrics
from diversityd.daemon.statefile import StateFile
from diversityd.daemon.store import MIB, Store
from diversityd.gguf import GGUFError, read_model
from diversityd.gpuplan import gpu_recheck, plan_gpus, vram_check_due
from diversityd.log import get_logger
from diversityd.state import ProviderState
from diversityd.vram import ModelSpec, describe_model

log = get_logger()

NVML_POLL_S = 10.0  # how often free VRAM is read for re-planning
NVML_TIMEOUT_S = 10.0  # a reading that takes longer counts as failed (a hung driver call)


class GpuPlanner:
    def __init__(
        self,
        loop: StateLoop,
        store: Store,
        statefile: StateFile,
        metrics: Metrics,
        *,
        restarting: Callable[[], bool],
        refresh_units: Callable[[str], Awaitable[object]],
    ) -> None:
        self.loop = loop
        self.store = store
        self.statefile = statefile
        self.metrics = metrics
        self._restarting = restarting  # a job acts on a provider
        self._refresh_units = refresh_units  # re-plan, render and roll (rollout's)
        self._nvml_call: asyncio.Future[GpuSnapshot] | None = None  # the one call in flight

    def _plan_inputs(self) -> tuple[dict[str, str | None], dict[str, int]]:
        """(In the state loop.) Each owned llama server's accepted GGUF (or why there is
        none) and each running owned unit's main pid: plain data for a worker thread."""
        records = self.store.records
        models: dict[str, str | None] = {}
        for names in self.store.model_paths().values():
            target = records[names[0]].model
            for name in names:
                models[name] = target.target if target is not None and target.ok else None
        pids = {
            record.name: record.observed.pid
            for record in self.store.owned_records()
            if record.observed.pid
        }
        return models, pids

    @staticmethod
    def _read_plan_inputs(
        models: dict[str, str | None], main_pids: dict[str, int]
    ) -> tuple[dict[str, ModelSpec | str], dict[str, list[int]]]:
        """(In a worker thread.) Describe the GGUFs; find every pid of each owned unit:
        NVML lists Ollama's runners and vLLM's engine core (children), and those are ours."""
        described: dict[str, ModelSpec | str] = {}
        cache: dict[str, ModelSpec | str] = {}
        for name, path in models.items():
            if path is None:
                described[name] = "no accepted model file"
                continue
            if path not in cache:
                try:
                    cache[path] = describe_model(read_model(path))
                except (GGUFError, OSError) as exc:
                    cache[path] = str(exc)
            described[name] = cache[path]
        pids: dict[str, list[int]] = {}
        for name, main in main_pids.items():
            try:
                children = psutil.Process(main).children(recursive=True)
            except psutil.Error:
                children = []
            pids[name] = [main, *(child.pid for child in children)]
        return described, pids

    async def read(self) -> GpuSnapshot | None:
        """One NVML reading; None when NVML fails or hangs (the plan in force stays, the
        error is shown by its NVML name and logged once). While a call hangs no other is
        made, and nobody waits for it."""
        call = self._nvml_call
        if call is not None and not call.done():
            failure = "NVML has not answered its last call yet (a GPU off the bus?)"
        else:
            call = self._nvml_call = _in_daemon_thread(read_gpus)
            try:
                return await asyncio.wait_for(asyncio.shield(call), NVML_TIMEOUT_S)
            except NvmlError as exc:
                failure = f"{exc.name}: {exc}"
            except TimeoutError:
                failure = f"NVML did not answer in {NVML_TIMEOUT_S:g} s (a GPU off the bus?)"
        self.metrics.nvml_failed()
        if failure != self.store.gpu.error:
            log.error("gpu.nvml_failed", error=failure, state="keeping the last plan")
        await self.loop.call(functools.partial(setattr, self.store.gpu, "error", failure))
        return None

    async def plan(self, snapshot: GpuSnapshot | None, reason: str) -> None:
        """Plan every card from a reading and the models; without one (NVML failed), the
        plan in force stays."""
        config = self.store.config
        assert config is not None
        if snapshot is None:
            return
        models, main_pids = await self.loop.call(self._plan_inputs)
        described, pids = await asyncio.to_thread(self._read_plan_inputs, models, main_pids)
        gpu = self.store.gpu
        plan = plan_gpus(config, described, snapshot, pids, previous=gpu.plan)

        def adopt() -> None:
            if self.store.config is not config:
                return  # a reload came in meanwhile: its own plan follows
            if gpu.plan is None and plan.cpu_only_reason:
                log.info("gpu.cpu_only", error=plan.cpu_only_reason)
            gpu.plan, gpu.plan_at = plan, time.monotonic()
            gpu.reading, gpu.error = snapshot, None
            self.statefile.save_in_loop()  # the last plan's word outlives the daemon

        await self.loop.call(adopt)
        for name, settings in plan.settings.items():
            log.info(
                "gpu.planned",
                provider=name,
                state=reason,
                n_gpu_layers=settings.n_gpu_layers,
                vram_mib=settings.vram_bytes // MIB if settings.vram_bytes else None,
                error="; ".join(settings.warnings) or None,
            )

    async def watch(self) -> None:
        """Re-plan when the cards or the VRAM used by others move enough to matter, or when
        NVML answers again after failing."""
        while True:
            await asyncio.sleep(NVML_POLL_S)
            try:
                await self._check()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive one bad look
                log.error("gpu.check_failed", error=f"{type(exc).__name__}: {exc}")

    async def _check(self) -> None:
        starting = any(r.state is ProviderState.STARTING for r in self.store.owned_records())
        if not vram_check_due(restarting=self._restarting(), gpu_unit_starting=starting):
            return
        gpu = self.store.gpu
        snapshot = await self.read()
        if snapshot is None:
            return
        _models, main_pids = await self.loop.call(self._plan_inputs)
        _described, pids = await asyncio.to_thread(self._read_plan_inputs, {}, main_pids)
        decision = gpu_recheck(gpu.plan, snapshot, pids, time.monotonic() - gpu.plan_at)

        def observe() -> None:
            gpu.reading, gpu.error = snapshot, None

        await self.loop.call(observe)
        if decision.replan:
            await self._refresh_units(decision.reason)


def _in_daemon_thread(function: Callable[[], GpuSnapshot]) -> asyncio.Future[GpuSnapshot]:
    """Run a blocking call in a thread of its own that never holds the daemon's exit: a hung
    driver call cannot be cancelled, and the executor's threads are waited for at exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[GpuSnapshot] = loop.create_future()

    def settle(result: GpuSnapshot | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            assert result is not None
            future.set_result(result)

    def run() -> None:
        try:
            result, error = function(), None
        except Exception as exc:  # noqa: BLE001 - handed to the waiting task
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="nvml", daemon=True).start()
    return future
