"""Benchmark: a steady request stream through the gateway across new gateway processes.

Sets up a private systemd --user manager, the embedded stack (real llama-server and
llama-cpp-python, the Ollama and vLLM stand-ins, the real LiteLLM gateway) and diversityd;
tears it down after. While requests flow (a new connection each, plain and streaming in
turn), a setting a LiteLLM process reads only at start (`litellm_settings.drop_params`) is
changed and `diversityctl reload` run, twice per cycle: each change starts a new process
blue/green on the held socket. (A provider's state change reaches the running process
in-process, with no new one: bench/routing.py measures that.)

- requests: sent during the run; reload_refused: refused connections; reload_failed: any
  other failure (HTTP errors, broken streams); p50_ms, p99_ms, max_ms: latency.
- reloads: gateway reloads that happened meanwhile.

Usage: python bench/gateway.py [--quick]. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import yaml

from diversityd.adapters.litellm import read_master_key
from diversityd.drill import percentile
from diversityd_lab.embedded import LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM, StackSpec
from diversityd_lab.measure import emit
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import RunningStack, free_port, temporary_stack
from diversityd_lab.traffic import GatewayStream

PROVIDERS = (LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM)


def reloads(running: RunningStack) -> int:
    return int(running.status()["gateway"]["reloads"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one cycle of two new processes")
    args = parser.parse_args()
    cycles = 1 if args.quick else 3

    def spec(manager: PrivateManager) -> StackSpec:
        return StackSpec(
            ports={**{name: free_port() for name in PROVIDERS}, "gateway": free_port()},
            providers=PROVIDERS,
            unit_dir=manager.unit_dir,
        )

    with temporary_stack("bench-gateway-", spec) as running:
        gateway = running.wait_for(
            lambda d: d["gateway"]["in_sync"] and d["gateway"]["state"] == "ready", 180, 0.5
        )["gateway"]
        first = reloads(running)
        key = read_master_key(Path(gateway["key_file"]))
        models = ("llama-cpp-native", "llama3.1:latest")
        with GatewayStream(gateway["url"], key, models) as sender:
            time.sleep(2)
            path = running.stack.config_dir / "diversityd.yaml"
            for _ in range(cycles):
                for drop in (True, False):
                    before = reloads(running)
                    settings = yaml.safe_load(path.read_text())
                    settings["gateway"]["litellm_settings"] = {"drop_params": drop}
                    path.write_text(yaml.safe_dump(settings, sort_keys=False))
                    running.ctl("reload", "--config-dir", str(running.stack.config_dir))
                    running.wait_for(
                        lambda d, b=before: d["gateway"]["reloads"] > b and d["gateway"]["in_sync"],
                        timeout_s=180,
                        poll_s=0.5,
                    )
            time.sleep(2)
        answers = sender.answers
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
