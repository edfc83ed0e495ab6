"""The active GGUF symlink: resolve it, check its target, watch it (inotify, no polling).

`models/active/current.gguf -> ../x.gguf` (relative or absolute targets, chains of links).
A target is accepted only when it exists, is a regular file, and its GGUF header reads
whole (magic, version, metadata, a tensor table that fits the file): a half-copied file
must never reach a restart.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from pathlib import Path

from diversityd.adapters.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    Inotify,
    InotifyEvent,
)
from diversityd.gguf import GGUFError, read_gguf
from diversityd.reconcile import ModelTarget

MAX_HOPS = 40  # as the kernel's own limit on symlink chains
# IN_MODIFY too: a file rewritten in place (`cp new.gguf current-target.gguf`) must be seen
# at its first write, not only when the copy ends.
LINK_CHANGES = (
    IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM | IN_ATTRIB | IN_CLOSE_WRITE | IN_MODIFY
)


def resolve(path: str) -> ModelTarget:
    """Follow the chain of links hop by hop (reporting where it breaks), then check the file."""
    hops = [path]
    current = Path(path)
    for _ in range(MAX_HOPS):
        try:
            info = current.lstat()
        except FileNotFoundError:
            problem = (
                "does not exist" if len(hops) == 1 else f"dangling link ({current} is missing)"
            )
            return ModelTarget(path, tuple(hops), None, None, f"{path}: {problem}")
        except OSError as exc:
            return ModelTarget(path, tuple(hops), None, None, f"{current}: {exc.strerror}")
        if not stat.S_ISLNK(info.st_mode):
            break
        try:
            link_text = os.readlink(current)
        except OSError as exc:  # replaced between lstat and readlink (`rm` + `ln`)
            return ModelTarget(path, tuple(hops), None, None, f"{current}: {exc.strerror}")
        # Relative targets are relative to the link's real folder (which may itself be
        # reached through a symlink), as the kernel resolves them.
        current = Path(os.path.normpath(Path(os.path.realpath(current.parent)) / link_text))
        hops.append(str(current))
    else:
        return ModelTarget(path, tuple(hops), None, None, f"{path}: more than {MAX_HOPS} links")
    target = str(current)
    if stat.S_ISDIR(info.st_mode):
        return ModelTarget(path, tuple(hops), target, None, f"{target} is a directory, not a GGUF")
    if not stat.S_ISREG(info.st_mode):
        return ModelTarget(path, tuple(hops), target, None, f"{target} is not a regular file")
    identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    try:
        read_gguf(target)
    except GGUFError as exc:
        return ModelTarget(path, tuple(hops), target, identity, str(exc))
    except OSError as exc:
        return ModelTarget(path, tuple(hops), target, identity, f"{target}: {exc.strerror}")
    return ModelTarget(path, tuple(hops), target, identity)


class LinkWatcher:
    """Calls `on_change(path)` (debounced) when anything on a watched path's chain changes:
    the link re-pointed (`ln -sfn`: create + rename), a hop replaced, the target rewritten.

    A folder that goes away (deleted, or replaced by `mv`) loses its watch: its path is
    watched again as soon as it exists, and a lost event queue means every path changed."""

    def __init__(
        self,
        on_change: Callable[[str], None],
        debounce_s: float = 0.2,
        rewatch_s: float = 1.0,
    ) -> None:
        self._on_change = on_change
        self._debounce_s = debounce_s
        self._rewatch_s = rewatch_s
        self._inotify = Inotify(self._on_event)
        self._directories: dict[str, set[str]] = {}  # watched directory -> configured paths
        self._missing: dict[str, set[str]] = {}  # not watched (yet) -> configured paths
        self._pending: dict[str, asyncio.TimerHandle] = {}
        self._rewatch: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._inotify.start(loop)

    def watch(self, target: ModelTarget) -> None:
        """Watch the directory of every hop (so a change anywhere in the chain is seen)."""
        for hop in target.hops:
            self._watch_directory(str(Path(hop).parent), {target.path})

    def _watch_directory(self, directory: str, paths: set[str]) -> bool:
        if directory in self._directories:
            self._directories[directory] |= paths
            return True
        try:
            self._inotify.watch_directory(Path(directory), LINK_CHANGES)
        except OSError:
            # A missing hop's folder (mid-replace, or never there): tried again shortly.
            self._missing.setdefault(directory, set()).update(paths)
            self._schedule_rewatch()
            return False
        self._directories[directory] = set(paths)
        return True

    def _on_event(self, event: InotifyEvent) -> None:
        if event.overflow:
            for path in {p for paths in self._directories.values() for p in paths}:
                self._schedule(path)
            return
        directory = str(event.directory)
        paths = self._directories.get(directory, set())
        if event.watch_lost:
            self._directories.pop(directory, None)
            self._missing.setdefault(directory, set()).update(paths)
            self._schedule_rewatch()
        for path in paths:
            self._schedule(path)

    def _schedule_rewatch(self) -> None:
        if self._loop is None or self._rewatch is not None:
            return
        self._rewatch = self._loop.call_later(self._rewatch_s, self._try_rewatch)

    def _try_rewatch(self) -> None:
        self._rewatch = None
        for directory, paths in list(self._missing.items()):
            del self._missing[directory]
            if self._watch_directory(directory, paths):
                for path in paths:
                    self._schedule(path)  # it changed while unwatched, perhaps

    def _schedule(self, path: str) -> None:
        """At most one check per `debounce_s`: a burst (a rename, a long copy's writes) is
        looked at shortly after it starts and again after each interval while it lasts."""
        if self._loop is None or path in self._pending:
            return
        self._pending[path] = self._loop.call_later(self._debounce_s, self._fire, path)

    def _fire(self, path: str) -> None:
        self._pending.pop(path, None)
        self._on_change(path)

    def close(self) -> None:
        for handle in self._pending.values():
            handle.cancel()
        if self._rewatch is not None:
            self._rewatch.cancel()
        self._inotify.close()
