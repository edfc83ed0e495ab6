"""The link watcher stays awake (issue 11, scenario 6): a replaced folder is watched again,
a lost event queue counts as a change of everything. Real inotify on tmp_path."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from diversityd.adapters.inotify import IN_Q_OVERFLOW, InotifyEvent
from diversityd.adapters.modellink import LinkWatcher, resolve


def link(folder: Path, target: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "current.gguf"
    temporary = folder / "current.gguf.new"
    temporary.symlink_to(target)
    os.replace(temporary, path)
    return path


async def changes_after(seen: list[str], count: int) -> bool:
    """Whether `seen` reaches `count` entries within 3 s."""
    for _ in range(60):
        if len(seen) >= count:
            return True
        await asyncio.sleep(0.05)
    return False


def test_a_replaced_folder_is_watched_again(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        seen: list[str] = []
        watcher = LinkWatcher(seen.append, debounce_s=0.05, rewatch_s=0.1)
        watcher.start(asyncio.get_running_loop())
        active = tmp_path / "models" / "active"
        path = link(active, "../a.gguf")
        watcher.watch(resolve(str(path)))
        # the whole folder replaced (`mv new active`): the old watch is gone
        staged = tmp_path / "models" / "staged"
        link(staged, "../b.gguf")
        shutil.rmtree(active)
        staged.rename(active)
        assert await changes_after(seen, 1), "no change seen when the folder went"
        before = len(seen)
        await asyncio.sleep(0.3)  # the watch is renewed on the new folder
        link(active, "../c.gguf")  # and a later re-point is still heard
        assert await changes_after(seen, before + 1), "deaf after the folder was replaced"
        # the kernel dropped events: every watched path counts as changed
        before = len(seen)
        watcher._on_event(InotifyEvent(Path(), "", IN_Q_OVERFLOW))
        assert await changes_after(seen, before + 1)
        watcher.close()
        return seen

    seen = asyncio.run(scenario())
    assert set(seen) == {str(tmp_path / "models" / "active" / "current.gguf")}
