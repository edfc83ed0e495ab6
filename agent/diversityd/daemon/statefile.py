"""The daemon's decisions on disk (persisted.py's format), in the state directory.

Read once at start: a damaged file is reported and the daemon rebuilds what it can from
systemd and the unit files. Written from the state loop (a consistent snapshot, atomically,
mode 0600) whenever a decision that must outlive the daemon changes.
"""

from __future__ import annotations

from pathlib import Path

from diversityd.adapters.files import write_atomic
from diversityd.config import read_bounded
from diversityd.daemon.loop import StateLoop
from diversityd.daemon.store import Store
from diversityd.log import get_logger
from diversityd.persisted import (
    MAX_STATE_BYTES,
    STATE_FILE,
    Persisted,
    dump_persisted,
    load_persisted,
)

log = get_logger()


class StateFile:
    def __init__(self, loop: StateLoop, store: Store, state_dir: Path) -> None:
        self.loop = loop
        self.store = store
        self.path = state_dir / STATE_FILE
        self._written: str | None = None
        self.error: str | None = None  # the last failed write (a full disk): retried

    def load(self) -> Persisted:
        try:
            data = read_bounded(self.path, MAX_STATE_BYTES)  # not a FIFO, not /dev/zero
        except OSError as exc:
            log.error("state.unreadable", path=str(self.path), error=f"{exc}; rebuilt from systemd")
            return Persisted()
        if data is None:
            return Persisted()
        text = data.decode("utf-8", errors="replace")  # not UTF-8: reported as not JSON
        state, problems = load_persisted(text)
        for problem in problems:
            log.error("state.damaged", path=str(self.path), error=problem)
        self._written = text
        return state

    def write(self) -> None:
        """(In the state loop.) Write the state if it changed; raises OSError (a full disk)."""
        text = dump_persisted(self.store.persisted())
        if text == self._written:
            return
        try:
            write_atomic(self.path, text, mode=0o600)
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror or exc}"
            raise
        self._written = text
        self.error = None

    def save_in_loop(self) -> bool:
        """(In the state loop.) Write, logging a failure: the next change retries."""
        try:
            self.write()
        except OSError as exc:
            log.error("state.write_failed", path=str(self.path), error=str(exc))
            return False
        return True

    async def save(self) -> bool:
        return await self.loop.call(self.save_in_loop)

    async def must_save(self) -> None:
        """Write or raise OSError: for an intent a crash must not lose."""
        await self.loop.call(self.write)
