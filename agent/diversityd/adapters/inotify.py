"""inotify through ctypes, read from the asyncio loop: file changes without a polling loop.

The kernel watches an inode; diversityd means a path. A folder renamed away (`mv active
active.old`) keeps its watch, and its events would still be taken for the path's: so a
watch whose folder moved or went is dropped at once and reported lost, and the path is
watched again, on whatever folder is there now (`FolderWatch`, `LinkWatcher`)."""

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
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

DIRECTORY_CHANGES = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE | IN_ATTRIB
# The watched folder itself moved or went: its path no longer leads to the watched inode.
SELF_GONE = IN_MOVE_SELF | IN_DELETE_SELF | IN_UNMOUNT | IN_IGNORED
_EVENT_HEADER = struct.Struct("iIII")


@dataclass(frozen=True)
class InotifyEvent:
    directory: Path
    name: str
    mask: int
    renewed: bool = False  # the path is watched again, on the folder now there

    @property
    def watch_lost(self) -> bool:
        """The folder's watch is gone (deleted, replaced, renamed away): watch its path
        again."""
        return bool(self.mask & SELF_GONE)

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
        self._watches: dict[int, list[Path]] = {}  # one inode may be reached by two paths
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch_directory(
        self, directory: Path, mask: int = DIRECTORY_CHANGES, *, create: bool = False
    ) -> None:
        """Watch a folder (a symlink to one is followed: dotfile managers link ~/.config)."""
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        wd = self._libc.inotify_add_watch(
            self.fd, os.fsencode(directory), mask | IN_ONLYDIR | IN_MOVE_SELF | IN_DELETE_SELF
        )
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_add_watch {directory}: {os.strerror(code)}")
        paths = self._watches.setdefault(wd, [])
        if directory not in paths:
            paths.append(directory)

    def watched(self) -> set[Path]:
        return {path for paths in self._watches.values() for path in paths}

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
            directories = self._watches.get(wd)
            if directories is None:
                continue  # dropped already (the IN_IGNORED after our own removal)
            if mask & SELF_GONE:
                # Renamed away, the inode still lives: drop the watch, or its events
                # would pass for the path's. The path is watched again by the caller.
                del self._watches[wd]
                if not mask & IN_IGNORED:
                    self._libc.inotify_rm_watch(self.fd, wd)
            for directory in directories:
                self._callback(InotifyEvent(directory, os.fsdecode(raw_name), mask))

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._loop = None
        os.close(self.fd)


class FolderWatch:
    """One folder, watched by its path: when it is renamed away or deleted, the path is
    watched again as soon as a folder is there (`renewed`), and made empty only after
    `return_s`: one made at once would swallow a folder being moved in (`mv staged user`
    into an existing `user` moves it inside)."""

    def __init__(
        self,
        folder: Path,
        on_event: Callable[[InotifyEvent], None],
        *,
        return_s: float = 5.0,
        poll_s: float = 0.2,
    ) -> None:
        self.folder = folder
        self._on_event = on_event
        self._return_s = return_s
        self._poll_s = poll_s
        self._inotify = Inotify(self._event)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._lost_at = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._inotify.watch_directory(self.folder, create=True)
        self._inotify.start(loop)

    def _event(self, event: InotifyEvent) -> None:
        lost = event.watch_lost and self.folder not in self._inotify.watched()
        if lost and self._loop is not None and self._retry is None:
            self._lost_at = self._loop.time()
            self._retry = self._loop.call_later(self._poll_s, self._rewatch)
        self._on_event(event)

    def _rewatch(self) -> None:
        self._retry = None
        assert self._loop is not None
        waited = self._loop.time() - self._lost_at
        try:
            self._inotify.watch_directory(self.folder, create=waited >= self._return_s)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
            self._retry = self._loop.call_later(self._poll_s, self._rewatch)
            return
        self._on_event(InotifyEvent(self.folder, "", 0, renewed=True))

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        self._inotify.close()
