"""The daemon's control interface on the user bus, and the client diversityctl uses.

Bus name `io.github.diversityd`, object `/io/github/diversityd`, interface
`io.github.diversityd.Manager1`. Payloads are JSON strings (one schema, shared with
`status --json`). Long operations (a rolling restart, a failover drill) return a job id at
once and report through the `JobProgress` and `JobFinished` signals, so no call outlives
D-Bus's method timeout; `Job(id)` answers a job's latest report at any time.

Methods: Status() -> s; Reload() -> s; Restart(s provider) -> s job_id;
Stop(s provider) -> s job_id; Start(s provider) -> s job_id (on purpose: kept across restarts);
Job(s job_id) -> s; History() -> s (the gateway's recent configs); Rollback(s id) -> s job_id;
FailoverTest(s provider, s mode, b force) -> s job_id (a live drill through the gateway).
Later issues extend this interface; they never rename.
"""

# No `from __future__ import annotations`: dbus-fast reads the D-Bus signatures from the
# annotations ("s") at definition time.

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_fast import DBusError, Message, MessageType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method, signal

from diversityd.adapters.busclient import BUS_NAME, INTERFACE, NO_SUCH_NAME, OBJECT_PATH
from diversityd.adapters.systemd import connect_session_bus
from diversityd.errors import DiversitydError, UsageError

ERROR_PREFIX = "io.github.diversityd.Error"

Handler = Callable[..., Awaitable[Any]]


class DaemonUnavailableError(DiversitydError):
    """The daemon is not on the bus."""


class ControlError(DiversitydError):
    """The daemon refused or failed a call; keeps the daemon's exit code and fix."""

    def __init__(
        self,
        message: str,
        dbus_name: str | None = None,
        *,
        hint: str | None = None,
        exit_code: int = 1,
    ) -> None:
        super().__init__(message, hint=hint)
        self.dbus_name = dbus_name
        self.exit_code = exit_code


class ControlInterface(ServiceInterface):
    """Thin: every method hands the request to the daemon and returns its JSON answer."""

    def __init__(self, handlers: dict[str, Handler]) -> None:
        super().__init__(INTERFACE)
        self._handlers = handlers

    async def _answer(self, name: str, *args: Any) -> str:
        try:
            result = await self._handlers[name](*args)
        except DiversitydError as exc:
            # The D-Bus error carries the class name, the message, the fix and the exit code.
            detail = json.dumps({"message": str(exc), "hint": exc.hint, "exit_code": exc.exit_code})
            raise DBusError(f"{ERROR_PREFIX}.{type(exc).__name__}", detail) from exc
        return json.dumps(result)

    @method()
    async def Status(self) -> "s":  # type: ignore[name-defined] # noqa: F821, N802
        return await self._answer("status")

    @method()
    async def Reload(self) -> "s":  # type: ignore[name-defined] # noqa: F821, N802
        return await self._answer("reload")

    @method()
    async def Restart(self, provider: "s") -> "s":  # type: ignore[name-defined] # noqa: F821, N802
        return await self._answer("restart", provider)

    @method()
    async def Stop(self, provider: "s") -> "s":  # type: ignore[name-defined] # noqa: F821, N802
        return await self._answer("stop", provider)

    @method()
    async def Start(self, provider: "s") -> "s":  # type: ignore[name-defined] # noqa: F821, N802
        return await self._answer("start", provider)

    @method()
    async def Job(self, job_id: "s") -> "s":  # type: ignore[name-defined] # noqa: F821, N802
        return await self._answer("job", job_id)

    @method()
    async def History(self) -> "s":  # type: ignore[name-defined] # noqa: F821, N802
        return await self._answer("history")

    @method()
    async def Rollback(self, entry_id: "s") -> "s":  # type: ignore[name-defined] # noqa: F821, N802
        return await self._answer("rollback", entry_id)

    @method()
    async def FailoverTest(  # noqa: N802
        self,
        provider: "s",  # type: ignore[name-defined] # noqa: F821
        mode: "s",  # type: ignore[name-defined] # noqa: F821
        force: "b",  # type: ignore[name-defined] # noqa: F821
    ) -> "s":  # type: ignore[name-defined] # noqa: F821
        return await self._answer("failover_test", provider, mode, force)

    @signal()
    def JobProgress(self, job_id: str, payload: str) -> "ss":  # type: ignore[name-defined] # noqa: F821, N802
        return [job_id, payload]

    @signal()
    def JobFinished(self, job_id: str, payload: str) -> "ss":  # type: ignore[name-defined] # noqa: F821, N802
        return [job_id, payload]


class SecondDaemonError(UsageError):
    """Another diversityd holds the bus name: this one touches nothing and exits (2: its
    unit's RestartPreventExitStatus=, so systemd does not start it over and over)."""


async def claim_bus_name(bus: MessageBus) -> None:
    """Take the daemon's bus name, or raise if another process holds it: one daemon per
    user manager. Done first, before any unit is thawed, written, stopped or retired and
    before the state file is written."""
    reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    if reply in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        return
    holder = await _owner_pid(bus)
    raise SecondDaemonError(
        f"another diversityd{f' (pid {holder})' if holder else ''} holds {BUS_NAME} on this "
        "bus: this one changes nothing and exits",
        hint="systemctl --user status diversityd; stop the other one first",
    )


async def _owner_pid(bus: MessageBus) -> int | None:
    reply = await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="GetConnectionUnixProcessID",
            signature="s",
            body=[BUS_NAME],
        )
    )
    if reply is None or reply.message_type != MessageType.METHOD_RETURN:
        return None
    return int(reply.body[0])


async def export_interface(bus: MessageBus, interface: ControlInterface) -> None:
    """Answer on the bus name taken at start (`claim_bus_name`)."""
    bus.export(OBJECT_PATH, interface)
    await claim_bus_name(bus)


# ---------------------------------------------------------------------------------------
# Client


class ControlClient:
    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self._signal_queue: asyncio.Queue[tuple[str, str, dict[str, Any]]] = asyncio.Queue()

    @classmethod
    async def connect(cls, address: str | None = None) -> "ControlClient":
        return cls(await connect_session_bus(address))

    def close(self) -> None:
        self.bus.disconnect()

    async def daemon_running(self) -> bool:
        reply = await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="NameHasOwner",
                signature="s",
                body=[BUS_NAME],
            )
        )
        return bool(reply.body and reply.body[0])

    async def call(self, member: str, *args: str | bool, timeout_s: float = 20.0) -> Any:
        signature = "".join("b" if isinstance(arg, bool) else "s" for arg in args)
        message = Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface=INTERFACE,
            member=member,
            signature=signature,
            body=list(args),
        )
        try:
            reply = await asyncio.wait_for(self.bus.call(message), timeout_s)
        except TimeoutError as exc:
            raise ControlError(f"the daemon did not answer {member} in {timeout_s:g} s") from exc
        if reply.message_type == MessageType.ERROR:
            name = reply.error_name or ""
            detail = reply.body[0] if reply.body else name
            if name in NO_SUCH_NAME:
                raise DaemonUnavailableError("diversityd is not running on the user bus")
            if name.startswith(ERROR_PREFIX):
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    fields = json.loads(str(detail))
                    raise ControlError(
                        str(fields["message"]),
                        name,
                        hint=fields.get("hint"),
                        exit_code=int(fields.get("exit_code", 1)),
                    )
            raise ControlError(str(detail), name)
        return json.loads(reply.body[0])

    async def subscribe_jobs(self) -> None:
        await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[f"type='signal',interface='{INTERFACE}',path='{OBJECT_PATH}'"],
            )
        )

        def on_message(message: Message) -> None:
            if message.message_type == MessageType.SIGNAL and message.interface == INTERFACE:
                job_id, payload = message.body
                with contextlib.suppress(ValueError):
                    self._signal_queue.put_nowait(
                        (message.member or "", job_id, json.loads(payload))
                    )

        self.bus.add_message_handler(on_message)

    async def follow_job(
        self,
        job_id: str,
        on_progress: Callable[[dict[str, Any]], None],
        timeout_s: float,
        poll_s: float = 2.0,
    ) -> dict[str, Any]:
        """Wait for JobFinished of `job_id` (polling Job() too, in case a signal was missed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ControlError(f"job {job_id} not finished after {timeout_s:g} s")
            try:
                member, signal_job, payload = await asyncio.wait_for(
                    self._signal_queue.get(), min(poll_s, remaining)
                )
            except TimeoutError:
                report = await self.call("Job", job_id)
                if report.get("finished"):
                    return dict(report)
                continue
            if signal_job != job_id:
                continue
            if member == "JobFinished":
                return payload
            on_progress(payload)
