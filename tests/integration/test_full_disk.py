"""A full disk in the middle of a re-point (issue 10, scenario 8): nothing is accepted that
was not written, nothing restarts onto anything, and once there is room again the rollout
happens with nobody's help. The unit folder and the state folder are small tmpfs mounts."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from diversityd.units import DAEMON_UNIT
from diversityd_lab.embedded import LLAMA_NATIVE, LLAMA_PYTHON, StackSpec, point_link
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import free_port, mapped_models, start_stack
from tests.conftest import unavailable

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def small_disk(path: Path, size: str = "2m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        unavailable(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Write until the disk is full; the filler file's path (remove it to make room)."""
    filler = disk / ".filler"
    with filler.open("wb") as handle, pytest.raises(OSError) as full:
        write_forever(handle)
    assert full.value.errno == errno.ENOSPC
    return filler


def write_forever(handle: BinaryIO) -> None:
    while True:
        handle.write(b"\0" * 65536)
        handle.flush()


def test_a_full_disk_during_a_repoint_rolls_out_once_there_is_room(
    private_manager: PrivateManager,
    tmp_path: Path,
    llama_server_bin: Path,
    llama_cpp_python_interpreter: Path,
) -> None:
    state = tmp_path / "state"
    with small_disk(private_manager.unit_dir), small_disk(state):
        spec = StackSpec(
            ports={LLAMA_NATIVE: free_port(), LLAMA_PYTHON: free_port()},
            unit_dir=private_manager.unit_dir,
            extra_settings={"state_dir": str(state)},
        )
        running = start_stack(private_manager, tmp_path / "stack", spec)
        try:
            document = running.wait_all_ready(timeout_s=90)
            pids = {p["name"]: p["pid"] for p in document["providers"]}
            fillers = [fill(private_manager.unit_dir), fill(state)]
            point_link(running.stack.active_link, "../tiny-b.gguf")
            stuck = running.wait_for(lambda d: d["daemon"]["unit_files_error"], timeout_s=30)
            assert "No space left" in stuck["daemon"]["unit_files_error"]
            assert {p["name"]: p["pid"] for p in stuck["providers"]} == pids
            assert (
                "tiny-a.gguf"
                in (private_manager.unit_dir / f"diversityd-{LLAMA_NATIVE}.service").read_text()
            )
            assert "unit files NOT written" in running.ctl("status").stdout
            for filler in fillers:
                os.unlink(filler)
            rolled = running.wait_for(
                lambda d: (
                    d["daemon"]["unit_files_error"] is None
                    and all(p["state"] == "ready" for p in d["providers"])
                    and all(mapped_models(p["pid"]) == {"tiny-b.gguf"} for p in d["providers"])
                ),
                timeout_s=90,
            )
            assert all(p["pid"] != pids[p["name"]] for p in rolled["providers"])
            assert running.journal_events("unit.write_failed")
            assert (state / "daemon-state.json").stat().st_mode & 0o777 == 0o600
        finally:
            private_manager.systemctl("stop", DAEMON_UNIT, check=False)
            for name in (LLAMA_NATIVE, LLAMA_PYTHON):
                private_manager.systemctl("stop", f"diversityd-{name}.service", check=False)
