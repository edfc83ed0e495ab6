"""What the benchmarks read about processes from /proc: resident memory, CPU time, who runs
(by command line), and systemd's monotonic timestamps of a unit."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """VmRSS of one process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS (a kernel thread, or a zombie)")


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU time of one process (all its threads), with `children` also that
    of its children it waited for, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # after the command: state(0) ... utime(11) stime(12) cutime(13) cstime(14)
    return sum(int(value) for value in fields[11 : 15 if children else 13]) / CLOCK_TICKS


def busy_cpu_seconds() -> float:
    """The machine's non-idle CPU time so far, all cores together, in seconds."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()
    ticks = [int(value) for value in first[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / CLOCK_TICKS


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def find_pids(matches: Callable[[str], bool], seen: dict[int, bool] | None = None) -> list[int]:
    """Processes whose command line satisfies `matches`; `seen` caches the verdict per
    PID between calls (a command line is read once per process)."""
    seen = {} if seen is None else seen
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        verdict = seen.get(pid)
        if verdict is None:
            line = command_line(pid)
            verdict = matches(line)
            # a child systemd forked shows the manager's command line until it execs
            if verdict or "systemd" not in line:
                seen[pid] = verdict
        if verdict:
            found.append(pid)
    return found


def monotonic_s(value: str) -> float | None:
    """A systemd `...TimestampMonotonic` property (µs of CLOCK_MONOTONIC, as Python's
    time.monotonic()) in seconds; None when it never happened (0)."""
    micros = int(value or "0")
    return micros / 1e6 if micros else None


@dataclass
class ProcessLife:
    """One sampled process: when it was first and last seen, its CPU time then."""

    pid: int
    first_seen: float
    last_seen: float
    first_cpu_s: float
    last_cpu_s: float

    @property
    def cpu_s(self) -> float:
        return self.last_cpu_s - self.first_cpu_s


@dataclass
class CpuSampler:
    """Samples, every `interval_s` in a thread, the CPU time of the processes whose command
    line satisfies `matches`, and the machine's busy CPU time."""

    matches: Callable[[str], bool]
    interval_s: float = 0.5
    lives: dict[int, ProcessLife] = field(default_factory=dict)
    machine: list[tuple[float, float]] = field(default_factory=list)  # (time, busy CPU s)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _verdicts: dict[int, bool] = field(default_factory=dict)

    def __enter__(self) -> CpuSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            self.machine.append((now, busy_cpu_seconds()))
            for pid in find_pids(self.matches, self._verdicts):
                try:
                    used = cpu_seconds(pid)
                except (OSError, ValueError, IndexError):
                    continue
                life = self.lives.get(pid)
                if life is None:
                    self.lives[pid] = ProcessLife(pid, now, now, used, used)
                else:
                    life.last_seen, life.last_cpu_s = now, used
            self._stop.wait(self.interval_s)

    def overlaps(self) -> list[tuple[float, float]]:
        """Periods when two or more sampled processes lived at once (for gateway instances:
        a blue/green reload, from the new one's start to the old one's exit)."""
        edges = sorted(
            [(life.first_seen, 1) for life in self.lives.values()]
            + [(life.last_seen, -1) for life in self.lives.values()]
        )
        periods: list[tuple[float, float]] = []
        alive, opened = 0, 0.0
        for when, step in edges:
            alive += step
            if alive >= 2 and step == 1 and alive - step < 2:
                opened = when
            elif alive < 2 and step == -1 and alive - step >= 2:
                periods.append((opened, when))
        return periods

    def machine_busy_fraction(self, start: float, end: float) -> float | None:
        """The machine's CPU use between two times, as a fraction of all its cores."""
        inside = [(t, busy) for t, busy in self.machine if start <= t <= end]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        cores = os.cpu_count() or 1
        return (inside[-1][1] - inside[0][1]) / ((inside[-1][0] - inside[0][0]) * cores)
