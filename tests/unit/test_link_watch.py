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


def test_a_folder_renamed_away_is_watched_again_by_its_path(tmp_path: Path) -> None:
    """Issue 20, point 3: `mv active active.old; mv staged active` kept the watch on the
    old folder (renamed, not deleted: no IN_IGNORED), so nothing after the swap was heard."""

    async def scenario() -> tuple[int, int]:
        seen: list[str] = []
        watcher = LinkWatcher(seen.append, debounce_s=0.05, rewatch_s=0.1)
        watcher.start(asyncio.get_running_loop())
        active = tmp_path / "models" / "active"
        path = link(active, "../a.gguf")
        watcher.watch(resolve(str(path)))
        staged = tmp_path / "models" / "staged"
        link(staged, "../b.gguf")
        active.rename(tmp_path / "models" / "active.old")
        staged.rename(active)
        swap_seen = await changes_after(seen, 1)
        await asyncio.sleep(0.3)  # the path is watched again, on the folder now there
        before = len(seen)
        link(active, "../c.gguf")
        later_seen = await changes_after(seen, before + 1)
        # the old folder, renamed away, is no longer this path: its changes are not ours
        before = len(seen)
        link(tmp_path / "models" / "active.old", "../d.gguf")
        await asyncio.sleep(0.3)
        watcher.close()
        return int(swap_seen) + int(later_seen), len(seen) - before

    heard, from_old_folder = asyncio.run(scenario())
    assert heard == 2, "deaf after the folder was renamed away and another moved in"
    assert from_old_folder == 0


def test_the_unit_folder_renamed_away_is_watched_again_by_its_path(tmp_path: Path) -> None:
    """Issue 20, point 3, the unit-folder check: after `mv user user.old; mv staged user`
    a hand edit in the new folder is heard, and no empty folder is made in between (it
    would swallow the second `mv`)."""
    from diversityd.adapters.inotify import FolderWatch

    async def scenario() -> tuple[list[InotifyEvent], list[InotifyEvent]]:
        events: list[InotifyEvent] = []
        folder = tmp_path / "systemd" / "user"
        watch = FolderWatch(folder, events.append, return_s=5.0, poll_s=0.05)
        watch.start(asyncio.get_running_loop())
        (folder / "a.service").write_text("[Service]\n")
        await asyncio.sleep(0.1)
        staged = tmp_path / "systemd" / "staged"
        staged.mkdir()
        folder.rename(tmp_path / "systemd" / "user.old")
        await asyncio.sleep(0.3)  # the path is empty a while: nothing may be made there
        assert not folder.exists()
        staged.rename(folder)
        await asyncio.sleep(0.3)
        before = list(events)
        (folder / "b.service").write_text("[Service]\n")
        (tmp_path / "systemd" / "user.old" / "c.service").write_text("[Service]\n")
        await asyncio.sleep(0.2)
        watch.close()
        return before, events[len(before) :]

    before, after = asyncio.run(scenario())
    assert any(e.watch_lost for e in before)
    assert any(e.renewed for e in before)
    names = {e.name for e in after}
    assert "b.service" in names
    assert "c.service" not in names
