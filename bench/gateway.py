"""Benchmark: a steady request stream through the gateway across reloads.

Sets up a private systemd --user manager, the embedded stack (real llama-server and
llama-cpp-python, the Ollama and vLLM stand-ins, the real LiteLLM gateway) and diversityd;
tears it down after. While requests flow (a new connection each, plain and streaming in
turn), vLLM is stopped and started again: each change makes diversityd render a new config
and reload the gateway blue/green on the held socket.

- requests: sent during the run; reload_refused: refused connections; reload_failed: any
  other failure (HTTP errors, broken streams); p50_ms, p99_ms, max_ms: latency.
- reloads: gateway reloads that happened meanwhile.

Usage: python bench/gateway.py [--quick]. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # reuse the tests' harness

from tests.benchsupport import bench_stack, emit
from tests.conftest import free_port
from tests.integration.harness import RunningStack

from diversityd.adapters.gatewayclient import ask, new_client
from diversityd.adapters.litellm import read_master_key
from diversityd.drill import Answer, percentile
from diversityd.embedded import LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM, StackSpec
from diversityd.privatemanager import PrivateManager

PROVIDERS = (LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM)


def stream_requests(running: RunningStack, answers: list[Answer], stop: threading.Event) -> None:
    gateway = running.status()["gateway"]
    key = read_master_key(Path(gateway["key_file"]))

    async def loop() -> None:
        async with new_client(60) as client:
            flip = False
            while not stop.is_set():
                flip = not flip
                model = "llama-cpp-native" if flip else "llama3.1:latest"
                answers.append(await ask(client, gateway["url"], key, model, stream=flip))
                await asyncio.sleep(0.05)

    asyncio.run(loop())


def reloads(running: RunningStack) -> int:
    return int(running.status()["gateway"]["reloads"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one stop/start of vLLM")
    args = parser.parse_args()
    cycles = 1 if args.quick else 3
    answers: list[Answer] = []

    def spec(manager: PrivateManager) -> StackSpec:
        return StackSpec(
            ports={**{name: free_port() for name in PROVIDERS}, "gateway": free_port()},
            providers=PROVIDERS,
            unit_dir=manager.unit_dir,
        )

    with bench_stack("bench-gateway-", spec) as running:
        manager = running.manager
        running.wait_for(
            lambda d: d["gateway"]["in_sync"] and d["gateway"]["state"] == "ready", 180, 0.5
        )
        first = reloads(running)
        stop = threading.Event()
        sender = threading.Thread(target=stream_requests, args=(running, answers, stop))
        sender.start()
        time.sleep(2)
        unit = f"diversityd-{VLLM}.service"
        for _ in range(cycles):
            for verb in ("stop", "start"):
                before = reloads(running)
                manager.systemctl(verb, unit)
                running.wait_for(
                    lambda d, b=before: d["gateway"]["reloads"] > b and d["gateway"]["in_sync"],
                    timeout_s=180,
                    poll_s=0.5,
                )
        time.sleep(2)
        stop.set()
        sender.join(timeout=120)
        done = reloads(running) - first
    refused = [a for a in answers if not a.ok and (a.error or "").startswith("ConnectError")]
    latencies = [a.latency_ms for a in answers]
    emit(
        {
            "requests": len(answers),
            "reload_failed": sum(not a.ok for a in answers) - len(refused),
            "reload_refused": len(refused),
            "reloads": done,
            "p50_ms": round(statistics.median(latencies), 1),
            "p99_ms": round(percentile(latencies, 0.99), 1),
            "max_ms": round(max(latencies), 1),
        }
    )


if __name__ == "__main__":
    main()
