"""Benchmark: how fast diversityd hears of a dead provider, and how fast `status` answers.

Sets up a private systemd --user manager, the embedded stack (real llama-server and
llama-cpp-python) and diversityd as a unit; tears all of it down at the end.

- kill_to_event_ms: `kill -9` of llama-server's main process -> the daemon's record of the
  exit (both CLOCK_MONOTONIC; the daemon's time comes from `status --json`).
- status_ms: wall time of `diversityctl status` as a process; python_startup_ms: wall time
  of `python -c pass` with the same interpreter, measured alternately in the same run.

Usage: python bench/units.py [--quick]. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from diversityd_lab.measure import emit, summary
from diversityd_lab.stack import ctl_env, temporary_stack

NATIVE = "llama_cpp_native"


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, capture_output=True, check=True, timeout=60)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a few minutes)")
    args = parser.parse_args()
    kills = 5 if args.quick else 20
    status_runs = 15 if args.quick else 50

    with temporary_stack("bench-units-") as running:
        manager = running.manager
        unit = f"diversityd-{NATIVE}.service"

        latencies: list[float] = []
        for _ in range(kills):
            pid = running.provider(NATIVE)["pid"]
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            document = running.wait_for(
                lambda d, t=killed_at: (
                    (running.provider(NATIVE, d)["last_exit_monotonic"] or 0) > t
                ),
                timeout_s=10,
                poll_s=0.02,
            )
            seen = running.provider(NATIVE, document)["last_exit_monotonic"]
            latencies.append((seen - killed_at) * 1000)
            running.wait_for(lambda d: running.provider(NATIVE, d)["state"] == "ready", 30)
            # Each kill counts against the unit's start limit; a benchmark is not a crash loop.
            manager.systemctl("reset-failed", unit, check=False)

        env = ctl_env(manager)
        status_cmd = [sys.executable, "-m", "diversityd.cli", "status"]
        startup_cmd = [sys.executable, "-c", "pass"]
        timed(status_cmd, env)  # warm the page cache once
        status_ms: list[float] = []
        startup_ms: list[float] = []
        for _ in range(status_runs):
            status_ms.append(timed(status_cmd, env))
            startup_ms.append(timed(startup_cmd, env))

    emit(
        {
            "kill_to_event_ms": summary(latencies),
            "status_ms": summary(status_ms),
            "python_startup_ms": summary(startup_ms),
        }
    )


if __name__ == "__main__":
    main()
