"""inotify through ctypes, read from the asyncio loop: file changes without a polling loop."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

DIRECTORY_CHANGES = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE | IN_ATTRIB
_EVENT_HEADER = struct.Struct("iIII")


@dataclass(frozen=True)
class InotifyEvent:
    directory: Path
    name: str
    mask: int

    @property
    def watch_lost(self) -> bool:
        """The folder's watch is gone (it was deleted or replaced): watch its path again."""
        return bool(self.mask & IN_IGNORED)

    @property
    def overflow(self) -> bool:
        """The kernel dropped events: look at everything again."""
        return bool(self.mask & IN_Q_OVERFLOW)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Inotify:
    """Watch directories; `callback(event)` runs on the loop for every event."""

    def __init__(self, callback: Callable[[InotifyEvent], None]) -> None:
        self._libc = _libc()
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        self.fd: int = fd
        self._callback = callback
        self._watches: dict[int, Path] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch_directory(
        self, directory: Path, mask: int = DIRECTORY_CHANGES, *, create: bool = False
    ) -> None:
        """Watch a folder (a symlink to one is followed: dotfile managers link ~/.config)."""
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), mask | IN_ONLYDIR)
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_add_watch {directory}: {os.strerror(code)}")
        self._watches[wd] = directory

    def watched(self) -> set[Path]:
        return set(self._watches.values())

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.fd, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 64 * 1024)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return
            raise
        offset = 0
        while offset + _EVENT_HEADER.size <= len(data):
            wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
            offset += _EVENT_HEADER.size
            raw_name = data[offset : offset + length].rstrip(b"\0")
            offset += length
            if mask & IN_Q_OVERFLOW:
                self._callback(InotifyEvent(Path(), "", mask))
                continue
            directory = self._watches.get(wd)
            if directory is None:
                continue
            if mask & IN_IGNORED:
                del self._watches[wd]  # the kernel removed it: the folder went away
            self._callback(InotifyEvent(directory, os.fsdecode(raw_name), mask))

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._loop = None
        os.close(self.fd)
