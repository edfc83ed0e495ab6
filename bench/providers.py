"""Benchmark: how fast a hung or dead llama server is marked down, and what a re-point of
the active GGUF link costs clients.

Sets up a private systemd --user manager, the embedded stack (real llama-server and
llama-cpp-python behind `models/active/current.gguf`) and diversityd; tears it down after.

- sigstop_to_down_ms: SIGSTOP of llama-server -> the daemon marks it not ready (hung);
  probes every 0.5 s with a 0.5 s timeout, so the bound is two intervals (1.0 s) + timeout.
- kill_to_down_ms: kill -9 -> the daemon marks it down (systemd tells it; no probe needed).
- repoint_s: re-pointing the link -> both servers serve the new file (one at a time).
- repoint_failed_requests: requests that found neither server answering meanwhile (each
  request tries one server and, if refused, the other, as the gateway would).

Usage: python bench/providers.py [--quick]. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

from diversityd_lab.embedded import LLAMA_NATIVE, SERVED_NAMES, point_link
from diversityd_lab.measure import emit, summary
from diversityd_lab.stack import RunningStack, temporary_stack
from diversityd_lab.traffic import RequestStream

NATIVE = LLAMA_NATIVE
ALIASES = SERVED_NAMES


def left_ready_after(running: RunningStack, since: float) -> float:
    document = running.wait_for(
        lambda d: (running.provider(NATIVE, d)["left_ready_monotonic"] or 0) > since,
        timeout_s=15,
        poll_s=0.02,
    )
    return float(running.provider(NATIVE, document)["left_ready_monotonic"]) - since


def repoint(running: RunningStack, target: str) -> float:
    document = running.wait_all_ready()
    pids = {name: running.provider(name, document)["pid"] for name in ALIASES}
    started = time.monotonic()
    point_link(running.stack.active_link, f"../{target}")
    running.wait_for(
        lambda d: all(
            running.provider(n, d)["pid"] not in (None, pids[n])
            and running.provider(n, d)["state"] == "ready"
            for n in ALIASES
        ),
        timeout_s=120,
        poll_s=0.05,
    )
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a few minutes)")
    args = parser.parse_args()
    rounds = 3 if args.quick else 10
    with temporary_stack("bench-providers-") as running:
        manager = running.manager
        unit = f"diversityd-{NATIVE}.service"
        stops: list[float] = []
        kills: list[float] = []
        for _ in range(rounds):
            running.wait_all_ready()
            pid = running.provider(NATIVE)["pid"]
            stopped_at = time.monotonic()
            os.kill(pid, signal.SIGSTOP)
            stops.append(left_ready_after(running, stopped_at) * 1000)
            os.kill(pid, signal.SIGCONT)
            running.wait_all_ready()
            pid = running.provider(NATIVE)["pid"]
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            kills.append(left_ready_after(running, killed_at) * 1000)
            running.wait_all_ready()
            manager.systemctl("reset-failed", unit, check=False)  # not a crash loop
        repoints: list[float] = []
        with RequestStream(running.stack.llama_endpoints()) as stream:
            for index in range(rounds):
                repoints.append(
                    repoint(running, "tiny-b.gguf" if index % 2 == 0 else "tiny-a.gguf")
                )
            time.sleep(0.5)
    emit(
        {
            "sigstop_to_down_ms": summary(stops),
            "kill_to_down_ms": summary(kills),
            "repoint_s": summary(repoints),
            "repoint_failed_requests": len(stream.unanswered),
            "repoint_answered_requests": stream.answered,
        }
    )


if __name__ == "__main__":
    main()
