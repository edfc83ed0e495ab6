"""Benchmark: how fast the gateway's routing follows what the daemon knows (issue 17).

Sets up a private systemd --user manager, the embedded stack (the real llama-server behind
a wrapper that can be made to crash, the real llama-cpp-python, the Ollama and vLLM
stand-ins, a recording stand-in for a paid cloud at the end of two chains, the real LiteLLM
gateway) and diversityd; tears it down after.

Faults on llama-server (the primary of `llama-cpp-native`), under a stream of requests for
that name (the `openai`-shaped client of the lab, a new connection each, plain and
streamed in turn), each watched by the bench's own probe of the server (every 0.1 s):
kill (-9), outside stop (`systemctl --user stop`, start 5 s later), crash loop (the
server exits until systemd gives up; fixed 3 s later), hang (SIGSTOP; the daemon kills it
after `hung_grace_s`, 3 s here).

- `routing_s`: from a provider's state change in the daemon to the gateway instance
  acknowledging the new routes (both journal events, on the host's monotonic clock):
  median and max over every change that moved the server in or out.
- per fault, `out_s`: from the fault to the last request sent to the server (answered by
  it, or tried on it and failed over) before it was back: how long routing kept sending it
  requests; `held_s`: to the end of the last of those (a hung server holds its requests
  until it is killed, `hung_grace_s` after it is judged hung); `back_s`: from its first
  good probe to the first request it answered (the return).
- `gateway_processes_started`: new gateway processes during the faults (target 0).
- `cloud_requests`: requests the paid cloud got, from anything (target 0).
- `gateway_kill_max_ms`: kill -9 of a serving gateway instance under a stream, the slowest
  request answered, with `gateway.instances: 1` and `2` (`failed` beside it: requests in
  the killed process).
- `gateway_rss_mib`: each gateway instance's RSS in steady state.

Usage: python bench/routing.py [--quick]. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from diversityd import parts
from diversityd.adapters.litellm import read_master_key
from diversityd.units import DAEMON_UNIT
from diversityd_lab.embedded import LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, PAID, VLLM, StackSpec
from diversityd_lab.faults import FaultKind, FaultRunner, PlannedFault, write_crash_wrapper
from diversityd_lab.faultwatch import (
    FaultyServer,
    ServerWatch,
    answered_by,
    failover_s,
    touched,
)
from diversityd_lab.measure import emit
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.procstat import rss_mib
from diversityd_lab.stack import LOCAL, RunningStack, free_port, temporary_stack
from diversityd_lab.traffic import GatewayStream

PROVIDERS = (LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM, PAID)
MODEL = "llama-cpp-native"
HUNG_GRACE_S = 3.0
FAULTS = {
    "kill": PlannedFault(FaultKind.KILL, LLAMA_NATIVE, 0.0, 0.0),
    "outside_stop": PlannedFault(FaultKind.STOP_START, LLAMA_NATIVE, 5.0, 0.0),
    "crash_loop": PlannedFault(FaultKind.CRASH_LOOP, LLAMA_NATIVE, 3.0, 0.0),
    "hang": PlannedFault(FaultKind.HANG, LLAMA_NATIVE, 3.0, 0.0),
}
SERVING = ("ready", "busy")


def say(message: str) -> None:
    print(f"[routing {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def steady(running: RunningStack, timeout_s: float = 180) -> dict[str, Any]:
    return running.wait_for(
        lambda d: (
            d["gateway"].get("state") == "ready"
            and d["gateway"].get("in_sync")
            and all(p["state"] == "ready" for p in d["providers"] if p["type"] in LOCAL)
        ),
        timeout_s=timeout_s,
        poll_s=0.2,
    )


def journal(running: RunningStack, event: str) -> list[tuple[float, str]]:
    """(monotonic seconds, message) of each `event` of the daemon, oldest first."""
    entries = running.journal_events(event)
    return [(int(e["__MONOTONIC_TIMESTAMP"]) / 1e6, str(e.get("MESSAGE", ""))) for e in entries]


def routing_lags(running: RunningStack, since: float) -> list[float]:
    """For each state change of a provider into or out of serving, the time until the
    gateway's next acknowledged routes change."""
    updates = [at for at, _ in journal(running, "gateway.routes_updated") if at >= since]
    lags = []
    for at, message in journal(running, "provider.state"):
        if at < since:
            continue
        fields = dict(part.split("=", 1) for part in message.split() if "=" in part)
        moved = (fields.get("state") in SERVING) != (fields.get("previous") in SERVING)
        following = [u for u in updates if u >= at]
        if moved and following:
            lags.append(following[0] - at)
    return lags


def back_at(watch: ServerWatch, name: str, since: float) -> float | None:
    return watch.back_at(name, since)


def run_fault(
    running: RunningStack, runner: FaultRunner, url: str, key: str, name: str
) -> dict[str, Any]:
    server = FaultyServer(LLAMA_NATIVE, running.stack.base_url(LLAMA_NATIVE), frozenset({MODEL}))
    with ServerWatch([server]) as watch, GatewayStream(url, key, [MODEL]) as stream:
        time.sleep(2)
        fault_at = time.monotonic()
        record = runner.run(FAULTS[name])
        say(f"{name}: {record.detail}")
        steady(running)
        back = back_at(watch, LLAMA_NATIVE, fault_at)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            a.ok and answered_by(a, server) and back is not None and a.started >= back
            for a in list(stream.answers)
        ):
            time.sleep(0.2)
        time.sleep(1)
    answers = list(stream.answers)
    returned = [
        a.started for a in answers if a.ok and answered_by(a, server) and back and a.started >= back
    ]
    until = back or float("inf")
    sent_to = [a.started for a in answers if touched(a, server) and fault_at <= a.started < until]
    return {
        "sent": len(answers),
        "failed": sum(not a.ok for a in answers),
        "out_s": round(max(sent_to) - fault_at, 2) if sent_to else 0.0,
        "held_s": round(failover_s(answers, server, fault_at, until), 2),
        "back_s": round(min(returned) - back, 2) if returned and back else None,
        "done": record.done,
    }


def gateway_kill(running: RunningStack, url: str, key: str) -> dict[str, Any]:
    """kill -9 of the serving instance under a stream; the slowest answered request."""
    document = steady(running)
    pid = document["gateway"]["pid"]
    with GatewayStream(url, key, [MODEL, "llama3.1:latest"], timeout_s=60) as stream:
        time.sleep(2)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        running.wait_for(
            lambda d: d["gateway"]["state"] == "ready" and d["gateway"]["pid"] not in (None, pid),
            timeout_s=120,
            poll_s=0.2,
        )
        time.sleep(3)
    around = [a for a in stream.answers if a.started + a.latency_ms / 1000 >= killed_at]
    answered = [a.latency_ms for a in around if a.ok]
    return {
        "max_ms": round(max(answered), 1) if answered else None,
        "sent": len(around),
        "failed": sum(not a.ok for a in around),
    }


def instance_rss(running: RunningStack) -> list[float]:
    gateway = steady(running)["gateway"]
    return [round(rss_mib(i["pid"]), 1) for i in gateway["instances"] if i["pid"]]


def set_instances(running: RunningStack, count: int) -> None:
    path = running.stack.config_dir / "diversityd.yaml"
    settings = yaml.safe_load(path.read_text())
    settings["gateway"]["instances"] = count
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    running.manager.systemctl("restart", DAEMON_UNIT, timeout=120)
    running.wait_for(
        lambda d: (
            sum(i["state"] == "active" for i in d["gateway"]["instances"]) == count
            and d["gateway"]["in_sync"]
        ),
        timeout_s=240,
        poll_s=0.5,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="each fault once")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as scratch:
        flag = Path(scratch) / "broken"
        wrapper = write_crash_wrapper(
            Path(scratch) / "llama-server", parts.llama_server_binary(), flag
        )

        def spec(manager: PrivateManager) -> StackSpec:
            return StackSpec(
                ports={**{n: free_port() for n in PROVIDERS}, "gateway": free_port()},
                providers=PROVIDERS,
                unit_dir=manager.unit_dir,
                llama_server=wrapper,
                extra_settings={"supervision": {"hung_grace_s": HUNG_GRACE_S}},
            )

        with temporary_stack("bench-routing-", spec) as running:
            with (running.stack.root / "paid.log").open("ab") as log:
                paid = subprocess.Popen(running.stack.paid_cloud_command(), stdout=log, stderr=log)
            try:
                result = measure(running, flag, repeats)
            finally:
                paid.terminate()
                paid.wait(10)
    emit(result)


def measure(running: RunningStack, flag: Path, repeats: int) -> dict[str, Any]:
    gateway = steady(running)["gateway"]
    url, key = gateway["url"], read_master_key(Path(gateway["key_file"]))
    runner = FaultRunner(running, crash_flag=flag, daemon_ends_hangs=True)
    since = time.monotonic()
    processes_before = int(gateway["reloads"])
    faults: dict[str, list[dict[str, Any]]] = {name: [] for name in FAULTS}
    try:
        for _ in range(repeats):
            for name in FAULTS:
                faults[name].append(run_fault(running, runner, url, key, name))
    finally:
        runner.thaw_all()
    processes = int(steady(running)["gateway"]["reloads"]) - processes_before
    lags = routing_lags(running, since)
    rss = instance_rss(running)
    kill_one = gateway_kill(running, url, key)
    set_instances(running, 2)
    rss_two = instance_rss(running)
    kill_two = gateway_kill(running, url, key)

    def median(name: str, key: str) -> float | None:
        values = [r[key] for r in faults[name] if r[key] is not None]
        return round(statistics.median(values), 2) if values else None

    return {
        "routing_s": {
            "median": round(statistics.median(lags), 3) if lags else None,
            "max": round(max(lags), 3) if lags else None,
            "changes": len(lags),
        },
        "faults": {
            name: {
                "out_s": median(name, "out_s"),
                "held_s": median(name, "held_s"),
                "back_s": median(name, "back_s"),
                "sent": sum(r["sent"] for r in runs),
                "failed": sum(r["failed"] for r in runs),
                "done": all(r["done"] for r in runs),
            }
            for name, runs in faults.items()
        },
        "gateway_processes_started": processes,
        "cloud_requests": len(running.stack.paid_requests()),
        "gateway_kill_max_ms": {"instances_1": kill_one, "instances_2": kill_two},
        "gateway_rss_mib": {"instances_1": rss, "instances_2": rss_two},
        "settings": {
            "repeats": repeats,
            "hung_grace_s": HUNG_GRACE_S,
            "probe_interval_s": 0.5,
            "probe_timeout_s": 0.5,
        },
    }


if __name__ == "__main__":
    main()
