"""systemd over the user D-Bus (dbus-fast): units, jobs, and their property changes.

Errors keep the D-Bus error name (`org.freedesktop.systemd1.NoSuchUnit`, ...). Signals are
delivered to callbacks; the daemon turns them into events for its single state task: the
watched units' property changes, and their jobs (JobNew, the job's type read at once,
JobRemoved), by which a stop someone asked for is told apart from a process that ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from diversityd.adapters.busclient import session_bus_address
from diversityd.errors import DiversitydError
from diversityd.execline import IGNORE_FAILURE, ExecCommand
from diversityd.foreignunits import LoadedUnit
from diversityd.state import UnitSnapshot

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
JOB_IFACE = "org.freedesktop.systemd1.Job"
PROPERTIES = "org.freedesktop.DBus.Properties"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
CALL_TIMEOUT_S = 25.0  # below D-Bus's own 25 s default method timeout
MAX_EARLY_JOBS = 256


class SystemdError(DiversitydError):
    """A systemd call failed; `dbus_name` is the D-Bus error name."""

    def __init__(self, message: str, dbus_name: str | None = None) -> None:
        super().__init__(message)
        self.dbus_name = dbus_name


async def connect_session_bus(address: str | None = None) -> MessageBus:
    try:
        return await MessageBus(
            bus_address=address or session_bus_address(), bus_type=BusType.SESSION
        ).connect()
    except (OSError, EOFError) as exc:
        raise SystemdError(
            f"cannot connect to the user bus at {address or session_bus_address()}: {exc}"
        ) from exc


def unit_object_path(name: str) -> str:
    """systemd's escaping of a unit name into its object path (bus_label_escape)."""
    escaped = "".join(ch if ch.isalnum() and ch.isascii() else f"_{ord(ch):02x}" for ch in name)
    return UNIT_PATH_PREFIX + escaped


UnitCallback = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class JobSignal:
    """A job of a watched unit: `new` (just queued), `typed` (its type, read from the job
    object while it lasts: `stop`, `start`, `restart`, ...) or `removed` (with systemd's
    result: done, canceled, failed, ...)."""

    unit: str
    job_path: str
    phase: str  # new | typed | removed
    job_type: str | None = None
    result: str | None = None


JobCallback = Callable[[JobSignal], None]


@dataclass(frozen=True)
class ManagedUnit:
    """A unit as the manager has it: its states, its file, what triggers it (a socket, a
    timer, a path unit) and, for a loaded service, its command lines as systemd parsed
    them (`loaded`)."""

    name: str
    load_state: str
    active_state: str
    unit_file_state: str
    fragment_path: str
    triggered_by: tuple[str, ...] = ()
    loaded: LoadedUnit | None = None


class Systemd:
    """A client of the user manager. `on_unit_change(name, changed_properties)` is called
    from the bus reader for every PropertiesChanged of a watched unit."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self._watched_paths: dict[str, str] = {}  # object path -> unit name
        self._jobs: dict[str, asyncio.Future[str]] = {}
        self._finished_jobs: dict[str, str] = {}  # results that beat StartUnit's reply
        self._on_unit_change: UnitCallback | None = None
        self._on_job: JobCallback | None = None
        self._type_reads: set[asyncio.Task[None]] = set()
        bus.add_message_handler(self._handle_message)

    @classmethod
    async def connect(cls, address: str | None = None) -> Systemd:
        bus = await connect_session_bus(address)
        client = cls(bus)
        await client._call_manager("Subscribe", "", [])
        for member in ("JobNew", "JobRemoved"):
            await client._add_match(
                f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}',member='{member}'"
            )
        return client

    def disconnect(self) -> None:
        self.bus.disconnect()

    # -- low-level ------------------------------------------------------------------

    async def _call(self, message: Message, timeout_s: float = CALL_TIMEOUT_S) -> Message:
        try:
            reply = await asyncio.wait_for(self.bus.call(message), timeout_s)
        except TimeoutError as exc:
            raise SystemdError(
                f"{message.member}: no answer from systemd in {timeout_s} s"
            ) from exc
        except (OSError, EOFError) as exc:
            raise SystemdError(f"{message.member}: the bus connection failed: {exc}") from exc
        if reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply.body else ""
            raise SystemdError(f"{message.member}: {reply.error_name}: {detail}", reply.error_name)
        return reply

    async def _call_manager(self, member: str, signature: str, body: list[Any]) -> list[Any]:
        reply = await self._call(
            Message(
                destination=SYSTEMD,
                path=SYSTEMD_PATH,
                interface=MANAGER,
                member=member,
                signature=signature,
                body=body,
            )
        )
        return list(reply.body)

    async def _add_match(self, rule: str) -> None:
        await self._call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[rule],
            )
        )

    def _handle_message(self, message: Message) -> bool | None:
        if message.message_type != MessageType.SIGNAL:
            return None
        if message.member == "JobNew" and message.interface == MANAGER:
            _job_id, job_path, unit = message.body
            self._job_seen(JobSignal(unit, job_path, "new"))
            return None
        if message.member == "JobRemoved" and message.interface == MANAGER:
            _job_id, job_path, unit, result = message.body
            self._job_seen(JobSignal(unit, job_path, "removed", result=result))
            future = self._jobs.pop(job_path, None)
            if future is None:
                # Jobs of every unit in the manager end here too: keep only the latest few
                # (a StartUnit reply is at most a few messages behind its JobRemoved).
                self._finished_jobs[job_path] = result
                while len(self._finished_jobs) > MAX_EARLY_JOBS:
                    self._finished_jobs.pop(next(iter(self._finished_jobs)))
            elif not future.done():
                future.set_result(result)
            return None
        if message.member == "PropertiesChanged" and message.interface == PROPERTIES:
            name = self._watched_paths.get(message.path or "")
            if name is not None and self._on_unit_change is not None:
                _iface, changed, _invalidated = message.body
                values = {key: unpack(value) for key, value in changed.items()}
                self._on_unit_change(name, values)
        return None

    def _job_seen(self, job: JobSignal) -> None:
        if self._on_job is None or job.unit not in self._watched_paths.values():
            return
        self._on_job(job)
        if job.phase == "new":
            # Its type is not in the signal: read it from the job object at once, while it
            # lasts (a stop waits for its process to end; one gone first is judged by
            # what it left: reconcile.stops_unit).
            task = asyncio.ensure_future(self._read_job_type(job))
            self._type_reads.add(task)
            task.add_done_callback(self._type_reads.discard)

    async def _read_job_type(self, job: JobSignal) -> None:
        try:
            reply = await self._call(
                Message(
                    destination=SYSTEMD,
                    path=job.job_path,
                    interface=PROPERTIES,
                    member="Get",
                    signature="ss",
                    body=[JOB_IFACE, "JobType"],
                )
            )
        except SystemdError:
            return  # finished already
        if self._on_job is not None:
            job_type = str(unpack(reply.body[0]))
            self._on_job(JobSignal(job.unit, job.job_path, "typed", job_type=job_type))

    # -- units ----------------------------------------------------------------------

    def watch_jobs(self, callback: JobCallback) -> None:
        """Deliver the jobs of watched units (new, typed, removed)."""
        self._on_job = callback

    async def watch(self, names: list[str], callback: UnitCallback) -> None:
        """Deliver property changes of these units (kill -9 reaches us in milliseconds)."""
        self._on_unit_change = callback
        for name in names:
            path = unit_object_path(name)
            if path in self._watched_paths:
                continue
            self._watched_paths[path] = name
            await self._add_match(
                f"type='signal',sender='{SYSTEMD}',interface='{PROPERTIES}',"
                f"member='PropertiesChanged',path='{path}'"
            )

    async def snapshot(self, name: str) -> UnitSnapshot:
        path = (await self._call_manager("LoadUnit", "s", [name]))[0]
        props: dict[str, Any] = {}
        interfaces = (UNIT_IFACE, SERVICE_IFACE) if name.endswith(".service") else (UNIT_IFACE,)
        for iface in interfaces:
            props.update(await self._get_all(path, iface))
        return UnitSnapshot.from_properties(name, props)

    async def start(self, name: str, wait: bool = True, timeout_s: float = 120) -> str:
        return await self._job("StartUnit", name, wait, timeout_s)

    async def stop(self, name: str, wait: bool = True, timeout_s: float = 120) -> str:
        return await self._job("StopUnit", name, wait, timeout_s)

    async def restart(self, name: str, wait: bool = True, timeout_s: float = 120) -> str:
        return await self._job("RestartUnit", name, wait, timeout_s)

    async def _job(self, method: str, name: str, wait: bool, timeout_s: float) -> str:
        """Queue a job; with `wait`, return systemd's result (done, failed, timeout, ...)."""
        loop = asyncio.get_running_loop()
        (job_path,) = await self._call_manager(method, "ss", [name, "replace"])
        if not wait:
            return "queued"
        early = self._finished_jobs.pop(job_path, None)
        if early is not None:
            return early
        future: asyncio.Future[str] = loop.create_future()
        self._jobs[job_path] = future
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError as exc:
            raise SystemdError(f"{method} {name}: job not finished after {timeout_s} s") from exc
        finally:
            self._jobs.pop(job_path, None)

    async def enable(self, names: list[str]) -> None:
        """`systemctl --user enable`: the [Install] section's symlinks."""
        await self._call_manager("EnableUnitFiles", "asbb", [names, False, True])

    async def disable(self, names: list[str]) -> list[tuple[str, str, str]]:
        """`systemctl --user disable`: removes the units' enabling symlinks. Returns
        systemd's changes: (type, file, destination)."""
        (changes,) = await self._call_manager("DisableUnitFiles", "asb", [names, False])
        return [(str(kind), str(path), str(dest)) for kind, path, dest in changes]

    async def unit_file_state(self, name: str) -> str:
        """enabled, disabled, static, linked, masked, ... ("" when no such file)."""
        try:
            (state,) = await self._call_manager("GetUnitFileState", "s", [name])
        except SystemdError as exc:
            if exc.dbus_name in (
                "org.freedesktop.DBus.Error.FileNotFound",
                "org.freedesktop.systemd1.NoSuchUnit",
            ):
                return ""
            raise
        return str(state)

    async def list_units(self, patterns: list[str]) -> list[tuple[str, str, str, str]]:
        """Loaded units matching the glob patterns: (name, load, active, sub state)."""
        (units,) = await self._call_manager("ListUnitsByPatterns", "asas", [[], patterns])
        return [(str(u[0]), str(u[2]), str(u[3]), str(u[4])) for u in units]

    async def list_unit_files(self, patterns: list[str]) -> list[tuple[str, str]]:
        """Unit files the manager knows matching the patterns: (path, state)."""
        (files,) = await self._call_manager("ListUnitFilesByPatterns", "asas", [[], patterns])
        return [(str(path), str(state)) for path, state in files]

    async def managed_unit(self, name: str) -> ManagedUnit:
        """Load the unit (as `systemctl show` does) and read what install needs of it."""
        path = (await self._call_manager("LoadUnit", "s", [name]))[0]
        unit = await self._get_all(path, UNIT_IFACE)
        load_state = str(unit.get("LoadState", ""))
        loaded = None
        if load_state == "loaded" and name.endswith(".service"):
            service = await self._get_all(path, SERVICE_IFACE)
            loaded = LoadedUnit(
                commands=_exec_commands(service),
                environment=tuple(str(e) for e in service.get("Environment") or ()),
            )
        return ManagedUnit(
            name=name,
            load_state=load_state,
            active_state=str(unit.get("ActiveState", "")),
            unit_file_state=await self.unit_file_state(name),
            fragment_path=str(unit.get("FragmentPath", "")),
            triggered_by=tuple(str(t) for t in unit.get("TriggeredBy") or ()),
            loaded=loaded,
        )

    async def _get_all(self, path: str, interface: str) -> dict[str, Any]:
        reply = await self._call(
            Message(
                destination=SYSTEMD,
                path=path,
                interface=PROPERTIES,
                member="GetAll",
                signature="s",
                body=[interface],
            )
        )
        return {key: unpack(value) for key, value in reply.body[0].items()}

    async def mask(self, names: list[str]) -> None:
        """`systemctl --user mask`: a link to /dev/null in the user's unit folder, which
        no Wants=, socket or timer can start (fails where a file of that name is there)."""
        await self._call_manager("MaskUnitFiles", "asbb", [names, False, False])

    async def unmask(self, names: list[str]) -> None:
        await self._call_manager("UnmaskUnitFiles", "asb", [names, False])

    async def reload_manager(self) -> None:
        """daemon-reload: systemd re-reads every unit file."""
        await self._call_manager("Reload", "", [])

    async def kill(self, name: str, signal_number: int, whom: str = "main") -> None:
        await self._call_manager("KillUnit", "ssi", [name, whom, signal_number])

    async def reset_failed(self, name: str) -> None:
        with contextlib.suppress(SystemdError):
            await self._call_manager("ResetFailedUnit", "s", [name])

    async def unit_of_pid(self, pid: int) -> str | None:
        try:
            (path,) = await self._call_manager("GetUnitByPID", "u", [pid])
            reply = await self._call(
                Message(
                    destination=SYSTEMD,
                    path=path,
                    interface=PROPERTIES,
                    member="Get",
                    signature="ss",
                    body=[UNIT_IFACE, "Id"],
                )
            )
        except SystemdError:
            return None  # gone meanwhile, or no unit: the caller reports the pid
        return str(unpack(reply.body[0]))


def _exec_commands(service: dict[str, Any]) -> tuple[ExecCommand, ...]:
    """ExecStartEx (path, argv, the prefixes' flags), or ExecStart (path, argv, `-`) where
    the manager is older than systemd 243."""
    if "ExecStartEx" in service:
        return tuple(
            ExecCommand(str(path), tuple(map(str, argv)), frozenset(map(str, flags)))
            for path, argv, flags, *_ in service["ExecStartEx"]
        )
    return tuple(
        ExecCommand(str(path), tuple(map(str, argv)), frozenset({IGNORE_FAILURE} if ignore else ()))
        for path, argv, ignore, *_ in service.get("ExecStart") or ()
    )


def unpack(value: Any) -> Any:
    while isinstance(value, Variant):
        value = value.value
    return value
