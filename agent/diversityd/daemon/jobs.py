"""Jobs: long operations (a rolling restart, a drill, a rollback) run as tasks and report
their progress and result through the control interface's signals, so no D-Bus call has
to outlive its timeout. The registry lives in the store (written in the state loop)."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import Any

from diversityd.daemon.loop import StateLoop
from diversityd.daemon.store import Job, Store

KEEP_JOBS = 50  # finished jobs kept for `Job(id)`

Runner = Callable[[Job], Awaitable[dict[str, Any]]]
Signal = Callable[[str, dict[str, Any]], None]


def _no_signal(_job_id: str, _payload: dict[str, Any]) -> None:
    return None


class Jobs:
    def __init__(self, loop: StateLoop, store: Store) -> None:
        self.loop = loop
        self.store = store
        self._runners: dict[str, Runner] = {}
        self._ids = itertools.count(1)
        # The control interface's JobProgress and JobFinished, once it is on the bus.
        self.on_progress: Signal = _no_signal
        self.on_finished: Signal = _no_signal

    def register(self, kind: str, runner: Runner) -> None:
        self._runners[kind] = runner

    async def submit(self, kind: str, params: dict[str, Any]) -> str:
        """Start a job from any task; returns its id at once."""
        return await self.loop.call(lambda: self._start(kind, params))

    def _start(self, kind: str, params: dict[str, Any]) -> str:
        job = Job(id=f"{kind}-{next(self._ids)}", kind=kind, params=params)
        jobs = self.store.jobs
        jobs[job.id] = job
        finished = [j for j in jobs.values() if j.result is not None]
        for old in finished[: max(0, len(finished) - KEEP_JOBS)]:
            del jobs[old.id]  # the registry keeps the latest finished jobs only
        self.loop.spawn(self._run(job, self._runners[kind]))
        return job.id

    async def _run(self, job: Job, runner: Runner) -> None:
        try:
            result = await runner(job)
        except Exception as exc:  # noqa: BLE001 - reported as the job's result
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        job.result = result
        self.on_finished(job.id, job.to_json())

    def report(self, job: Job, payload: dict[str, Any]) -> None:
        job.progress.append(payload)
        self.on_progress(job.id, payload)

    def running(self) -> list[str]:
        return [j.id for j in self.store.jobs.values() if j.result is None]
