"""The CPU time of a server's process tree: what tells a busy server from a hung one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from diversityd.adapters.cputime import tree_cpu_s

BURN = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"


def test_a_grandchild_burning_cpu_advances_its_ancestors_time() -> None:
    # parent -> child -> grandchild; only the grandchild works (like Ollama's runners)
    spawn_burner = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BURN!r}])"
    parent = subprocess.Popen([sys.executable, "-c", spawn_burner])
    try:
        time.sleep(0.5)
        # no cgroup roots: the /proc walk alone, which is what is left without cgroup v2
        before = tree_cpu_s(parent.pid, roots=())
        time.sleep(1.0)
        after = tree_cpu_s(parent.pid, roots=())
        assert before is not None
        assert after is not None
        assert after - before > 0.5  # the grandchild's second of CPU, seen from the top
    finally:
        parent.kill()
        parent.wait()
        subprocess.run(["pkill", "-f", "end = time.monotonic"], check=False)


def test_a_gone_process_has_no_time() -> None:
    assert tree_cpu_s(2**22 + 7, roots=()) is None


def test_the_units_cgroup_is_read_when_it_is_there(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text("1:name=systemd:/x\n0::/user.slice/llama.service\n")
    unit = tmp_path / "unified" / "user.slice" / "llama.service"
    unit.mkdir(parents=True)
    (unit / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    assert tree_cpu_s(42, proc=proc, roots=(tmp_path / "v2", tmp_path / "unified")) == 2.5


def test_the_root_cgroup_is_not_taken_for_the_units(tmp_path: Path) -> None:
    # a process in "/" (no per-unit cgroup): the machine's sum would hide a hang
    (tmp_path / "cpu.stat").write_text("usage_usec 9000000000\n")
    fake_proc = tmp_path / "proc" / str(os.getpid())
    fake_proc.mkdir(parents=True)
    (fake_proc / "cgroup").write_text("0::/\n")
    got = tree_cpu_s(os.getpid(), proc=tmp_path / "proc", roots=(tmp_path,))
    # this process's own time instead (psutil reads the real /proc), not the machine's
    assert got is not None
    assert got < 1000
