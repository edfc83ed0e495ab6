"""Benchmark: one fleet of two workstations (issue 22).

Sets up the lab's two hosts (diversityd_lab.fleet: each a network namespace with its own
private systemd manager, the real llama servers, the Ollama and vLLM stand-ins, the real
LiteLLM gateway and diversityd) and a Redis in a namespace of its own; tears it all down.
On h0 vLLM is stopped: its model's chain crosses to h1, whose gateway serves it. Clients
(the `openai` package, `max_retries=0`, plain and streamed in turn) run inside h0 and h1,
each asking its own gateway for `qwen-coder-vllm` (h0: through h1) and `llama-cpp-native`
(one client per model, so a request held up holds no other).

Faults, each undone by the lab, one after the other: h1 frozen (then thawed), the h0-h1
link cut (then mended), h1's daemon killed (systemd restarts it), Redis killed (then
started), Redis cut off from h0 (then mended). Per fault, over the requests sent from the
fault until 5 s after it was undone:
- `sent`, `failed`;
- `failed_with_live_chain`: failed while a member of the model's chain was up on either
  host (h0's vLLM is stopped on purpose; a frozen or cut-off h1 is not up for h0);
- `in_flight_cut`: requests already sent to h1 when the fault hit (nothing can move them);
- `routing_s`: from the fault to the last request h0 still sent to h1 (host faults);
- `recovery_s`: from the undo to the first request h1 answered for h0 again.
Targets: failed_with_live_chain 0; routing_s at most 3 s for a host lost or cut off; no
failure at all for a Redis fault.

`redis`: commands Redis processed per second per host while the fleet ran (every fault's
window included), and the size of one host's record: what DESIGN.md extrapolates to 10 and
50 hosts.

Usage: python bench/fleet.py [--quick]. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diversityd_lab.embedded import VLLM
from diversityd_lab.fleet import Fleet, FleetSpec
from diversityd_lab.measure import emit
from diversityd_lab.redislab import REDIS_CLI, REDIS_PORT

FLEET = {"heartbeat_s": 0.5, "ttl_s": 3.0, "probe_interval_s": 0.5, "probe_timeout_s": 1.0}
MODELS = ("qwen-coder-vllm", "llama-cpp-native")
HOLD_S = 6.0  # how long each fault lasts before it is undone
TAIL_S = 5.0

# A client inside a host: one JSON line per request (started/ended on CLOCK_MONOTONIC,
# which every namespace shares).
CLIENT = r"""
import json, sys, threading, time, openai
key = open(sys.argv[1]).read().strip().split("=", 1)[-1]
client = openai.OpenAI(base_url="http://127.0.0.1:4000/v1", api_key=key, max_retries=0,
                       timeout=60)
model, lock = sys.argv[2], threading.Lock()

def ask(stream):
    started, ok, by, error = time.monotonic(), False, None, None
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
            stream=stream)
        by = raw.headers.get("x-litellm-model-api-base")
        answer = raw.parse()
        text = ("".join(c.choices[0].delta.content or "" for c in answer if c.choices)
                if stream else answer.choices[0].message.content)
        ok = bool(text)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    with lock:
        print(json.dumps({"model": model, "started": started, "ended": time.monotonic(),
                          "ok": ok, "by": by, "error": error}), flush=True)

turn = 0
while True:  # a request every 0.25 s, each on its own thread: one held up holds no other
    turn += 1
    if threading.active_count() < 64:
        threading.Thread(target=ask, args=(turn % 2 == 1,), daemon=True).start()
    time.sleep(0.25)
"""


@dataclass(frozen=True)
class Request:
    host: str
    model: str
    started: float
    ended: float
    ok: bool
    by: str | None
    error: str | None


class Clients:
    """One client process inside each host, reading its lines as they come."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.requests: list[Request] = []
        self._procs: list[Any] = []

    def __enter__(self) -> Clients:
        from diversityd_lab import netns

        for host in self.fleet.hosts:
            key_file = self.fleet.running(host).status()["gateway"]["key_file"]
            for model in MODELS:  # one client per model: a request held up holds no other
                args = [sys.executable, "-c", CLIENT, key_file, model]
                process = netns.spawn_in(self.fleet.netns(host), args)
                self._procs.append(process)
                threading.Thread(target=self._read, args=(host, process), daemon=True).start()
        return self

    def _read(self, host: str, process: Any) -> None:
        for line in process.stdout:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            self.requests.append(Request(host, **data))

    def __exit__(self, *_: object) -> None:
        for process in self._procs:
            process.terminate()
            process.wait(10)


def say(message: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def judge(
    fleet: Fleet, requests: list[Request], began: float, undone: float, host_fault: bool
) -> dict[str, Any]:
    h1_for_h0 = fleet.gateway_url("h1", seen_from="h0")
    window = [r for r in requests if began <= r.started <= undone + TAIL_S]
    in_flight = [r for r in requests if r.started < began < r.ended]
    # on h0, qwen-coder-vllm's chain is h1's server only (h0's vLLM stopped on purpose)
    live = not host_fault

    def chain_live(r: Request) -> bool:
        if r.model == "qwen-coder-vllm" and r.host == "h0":
            return live or r.started > undone + TAIL_S / 2
        return True  # served on the host itself

    failed = [r for r in window if not r.ok]
    to_h1 = [r.started for r in window if r.host == "h0" and (r.by or "").startswith(h1_for_h0)]
    during = [t for t in to_h1 if t < undone]
    back = [t for t in to_h1 if t >= undone]
    return {
        "sent": len(window),
        "failed": len(failed),
        "failed_with_live_chain": sum(chain_live(r) for r in failed if r not in in_flight),
        "in_flight_cut": sum(not r.ok for r in in_flight),
        "routing_s": round(max(during) - began, 2) if host_fault and during else 0.0,
        "recovery_s": round(min(back) - undone, 2) if back else None,
        "errors": sorted({f"+{r.started - began:.1f}s {r.host}: {r.error}" for r in failed})[:4],
    }


def redis_commands(fleet: Fleet) -> int:
    """Redis' `total_commands_processed`, read from inside h0."""
    result = fleet.run_in(
        "h0",
        [str(REDIS_CLI), "-h", fleet.redis_address("h0"), "-p", str(REDIS_PORT), "INFO", "stats"],
    )
    for line in result.stdout.splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":", 1)[1])
    return 0


def record_bytes(fleet: Fleet) -> int:
    result = fleet.run_in(
        "h0",
        [str(REDIS_CLI), "-h", fleet.redis_address("h0"), "-p", str(REDIS_PORT), "GET",
         "diversityd:v1:host:h1"],
    )  # fmt: skip
    return len(result.stdout.strip().encode())


def faults(fleet: Fleet) -> dict[str, tuple[Callable[[], None], Callable[[], None], bool]]:
    def kill_daemon() -> None:
        fleet.kill_daemon("h1")

    return {
        "host_frozen": (lambda: fleet.freeze("h1"), lambda: fleet.thaw("h1"), True),
        "link_cut": (
            lambda: fleet.cut_link("h0", "h1"),
            lambda: fleet.mend_link("h0", "h1"),
            True,
        ),
        "daemon_killed": (kill_daemon, lambda: None, False),
        "redis_killed": (fleet.kill_redis, fleet.start_redis, False),
        "redis_cut_from_h0": (
            lambda: fleet.cut_redis("h0"),
            lambda: fleet.mend_redis("h0"),
            False,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="each fault once")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    spec = FleetSpec(hosts=2, fleet=True, fleet_settings=FLEET)
    report: dict[str, list[dict[str, Any]]] = {}
    with Fleet(spec) as fleet:
        fleet.running("h0").manager.systemctl("stop", f"diversityd-{VLLM}.service")
        fleet.running("h0").wait_for(
            lambda d: d["gateway"]["substituted"].get("qwen-coder-vllm") == "qwen-coder-vllm@h1",
            timeout_s=60,
        )
        plan = faults(fleet)
        size = record_bytes(fleet)
        commands, counted_from = redis_commands(fleet), time.monotonic()
        time.sleep(10)  # steady: heartbeats, reads, no fault
        steady_rate = (redis_commands(fleet) - commands) / (time.monotonic() - counted_from)
        with Clients(fleet) as clients:
            time.sleep(3)
            for _ in range(repeats):
                for name, (make, undo, host_fault) in plan.items():
                    say(name)
                    began = time.monotonic()
                    make()
                    time.sleep(HOLD_S)
                    undone = time.monotonic()
                    undo()
                    time.sleep(TAIL_S + 3)
                    report.setdefault(name, []).append(
                        judge(fleet, list(clients.requests), began, undone, host_fault)
                    )
        statuses = {host: fleet.running(host).status()["fleet"] for host in fleet.hosts}
    emit(
        {
            "faults": {
                name: {
                    key: (runs[0][key] if len(runs) == 1 else [r[key] for r in runs])
                    for key in runs[0]
                }
                for name, runs in report.items()
            },
            "redis_ok_at_end": {h: s["redis"]["ok"] for h, s in statuses.items()},
            "redis": {
                "commands_per_s_per_host": round(steady_rate / len(statuses), 1),
                "record_bytes": size,
            },
            "settings": {**FLEET, "repeats": repeats, "hold_s": HOLD_S},
        }
    )


if __name__ == "__main__":
    main()
