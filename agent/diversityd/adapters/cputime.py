"""CPU time used by a server's whole process tree (busy or hung?), read cheaply.

Probed every couple of seconds per provider, so the cost matters: the unit's cgroup keeps
the sum for every process in it (one small file read); where that file is not there, the
tree is walked through /proc's `children` lists rather than psutil's scan of every pid on
the machine (~2 ms per call per hundred processes).
"""

from __future__ import annotations

from pathlib import Path

import psutil

CGROUP_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))  # v2, hybrid


def _cgroup_cpu_s(pid: int, proc: Path, roots: tuple[Path, ...]) -> float | None:
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    unified = next((line[3:] for line in lines if line.startswith("0::")), None)
    if not unified or unified == "/":  # the root cgroup holds the whole machine, not the unit
        return None
    for root in roots:
        try:
            text = (root / unified.lstrip("/") / "cpu.stat").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
    return None


def _descendants(pid: int, proc: Path) -> list[int]:
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = list((proc / str(parent) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in children:
                found.append(int(child))
                pending.append(int(child))
    return found


def tree_cpu_s(
    pid: int, proc: Path = Path("/proc"), roots: tuple[Path, ...] = CGROUP_ROOTS
) -> float | None:
    """CPU seconds of `pid` and everything below it (Ollama's runners, vLLM's engine);
    None when the process is gone."""
    from_cgroup = _cgroup_cpu_s(pid, proc, roots)
    if from_cgroup is not None:
        return from_cgroup
    total = 0.0
    for each in (pid, *_descendants(pid, proc)):
        try:
            times = psutil.Process(each).cpu_times()
        except psutil.Error:
            if each == pid:
                return None
            continue  # a child that just exited
        total += times.user + times.system
    return total
