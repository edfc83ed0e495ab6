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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
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
