"""The one loop: the single writer of the daemon's state, and how other tasks reach it.

`StateLoop.run` is the SINGLE WRITER of the daemon's state (the `Store`: provider records,
the configuration in force, jobs, what was written to disk, the gateway's record). Bus
callbacks, probe loops, file watchers, control methods and jobs never assign to that state
themselves: they `post` an event, or hand a function to `call` and await its result.
Reading the state from other tasks is safe: the loop is single-threaded and the writer never
awaits in the middle of a change. (A `Job`'s own progress list is written by its runner
task alone.) After every event, tasks blocked in `wait_until` look again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from diversityd.log import get_logger
from diversityd.state import ProbeResult

log = get_logger()

T = TypeVar("T")


@dataclass(frozen=True)
class UnitChanged:
    """A PropertiesChanged of a watched unit, as the bus reader saw it."""

    unit: str
    changed: dict[str, Any]
    at: float  # time.monotonic()


@dataclass(frozen=True)
class ProbeDone:
    provider: str
    result: ProbeResult
    pid: int  # the main process when the probe was sent: its answer counts for it alone
    cpu_s: float | None = None  # its process tree's CPU time, read when the probe timed out


@dataclass
class _Call:
    """Run `action` inside the loop and hand its result to `future`."""

    action: Callable[[], Any]
    future: asyncio.Future[Any]


class StateLoop:
    def __init__(self) -> None:
        self._events: asyncio.Queue[object] = asyncio.Queue()
        self._changed = asyncio.Condition()
        self._handlers: dict[type, Callable[[Any], None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def on(self, kind: type[T], handler: Callable[[T], None]) -> None:
        """`handler(event)` runs in the loop for every posted event of this type."""
        self._handlers[kind] = handler

    def post(self, event: object) -> None:
        self._events.put_nowait(event)

    def post_call(self, action: Callable[[], object]) -> None:
        """Run `action` in the loop, soon; for callbacks that cannot await `call`."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._events.put_nowait(_Call(action, future))

    async def call(self, action: Callable[[], T]) -> T:
        """Run `action` in the loop (where state may be written); its result or exception."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._events.put(_Call(action, future))
        return await future

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `predicate()` holds after some event; False on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout_s)
            except TimeoutError:
                return False
        return True

    async def run(self) -> None:
        while True:
            event = await self._events.get()
            if isinstance(event, _Call):
                try:
                    event.future.set_result(event.action())
                except Exception as exc:  # noqa: BLE001 - handed back to the caller
                    if not event.future.done():
                        event.future.set_exception(exc)
            else:
                try:
                    self._handlers[type(event)](event)
                except Exception as exc:  # noqa: BLE001 - one bad event must not stop the loop
                    log.error("daemon.event_failed", error=f"{type(exc).__name__}: {exc}")
            async with self._changed:
                self._changed.notify_all()

    # -- the daemon's tasks ---------------------------------------------------------------

    def spawn(
        self, coroutine: Coroutine[Any, Any, Any], name: str | None = None
    ) -> asyncio.Task[Any]:
        """A task the daemon keeps (and cancels at the end); its failure is logged."""
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def has_task(self, name: str) -> bool:
        return any(task.get_name() == name for task in self._tasks)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("daemon.task_failed", error=f"{type(exc).__name__}: {exc}")

    async def cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ProviderLocks:
    """One lock per provider: a job (restart, start, drill, revival) holds the providers it
    acts on, so two never act on one provider at once while jobs for others go on."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self.holders: dict[str, str] = {}  # provider -> what holds it (a job id, "revival")

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def holding(self, names: Iterable[str], holder: str) -> AsyncIterator[None]:
        """Hold every named provider (taken in sorted order: no deadlock between jobs)."""
        taken: list[str] = []
        try:
            for name in sorted(set(names)):
                await self._lock(name).acquire()
                taken.append(name)
                self.holders[name] = holder
            yield
        finally:
            for name in taken:
                self.holders.pop(name, None)
                self._lock(name).release()

    def locked(self, name: str) -> bool:
        return self._lock(name).locked()

    def any_locked(self) -> bool:
        return any(lock.locked() for lock in self._locks.values())


# The daemon's named steps, where the fault drills of the test suite kill it (kill -9): the
# step named in the file `$DIVERSITYD_FAULT_FILE` (read at each step, removed when it fires,
# so the restarted daemon goes on). Unset in production: one environment lookup per step.
FAULT_FILE_ENV = "DIVERSITYD_FAULT_FILE"


def checkpoint(step: str) -> None:
    """A named step of a rollout or a gateway reload (see FAULT_FILE_ENV)."""
    fault_file = os.environ.get(FAULT_FILE_ENV)
    if not fault_file:
        return
    path = Path(fault_file)
    try:
        wanted = path.read_text(encoding="utf-8").strip()
    except OSError:
        return
    if wanted != step:
        return
    path.unlink(missing_ok=True)
    log.warning("daemon.fault_injected", state=step, error="killed at this step (a fault drill)")
    os.kill(os.getpid(), signal.SIGKILL)
