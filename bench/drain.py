"""Benchmark: a planned change loses nothing (issue 18).

Sets up a private systemd --user manager, the embedded stack (the real llama-server and
llama-cpp-python on a tiny GGUF, the Ollama and vLLM stand-ins, the real LiteLLM gateway)
and diversityd; tears it down after. Load: long streamed answers (max_tokens 96,
temperature 0) through the real `openai` client, three clients at once, each on its own
keep-alive connections (the package's default), `max_retries=0`, for the two llama
servers' names. While it runs, one planned change after another:

- restart: `diversityctl restart llama_cpp_python`;
- repoint: the active GGUF link re-pointed (both llama servers roll, one after the other);
- config: llama_cpp_native's `ctx` edited, `diversityctl reload` (it restarts);
- stop_start: `diversityctl stop llama_cpp_native`, then `start`;
- drill_stop: `diversityctl failover-test llama_cpp_python --mode stop` (announced);
- switch: a `litellm_settings` key edited, `diversityctl reload` (a new gateway process).

And `held`: vLLM's model has no fallback; while vLLM restarts on purpose (`diversityctl
restart vllm`), a client asking it (plain requests, one after another) is held in the
gateway until vLLM serves again: `sent`, `failed`, `max_ms` (the longest wait).

Per change, over the requests sent from its start until 3 s after it settled: `sent`,
`failed` (an error before any content), `cut` (an error after some content), `empty`
(finished with no content), `truncated_as_whole` (finished `stop` with a strict prefix of
an answer seen whole for the same model: a half answer passed off as whole), and
`drain_s` (the longest drain the daemon logged meanwhile). Targets: 0 for each count.

Usage: python bench/drain.py [--quick]. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import yaml

from diversityd.adapters.litellm import read_master_key
from diversityd_lab.clients import read_whole_stream
from diversityd_lab.embedded import LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM, StackSpec, point_link
from diversityd_lab.measure import emit
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import LOCAL, RunningStack, free_port, temporary_stack

PROVIDERS = (LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM)
MODELS = ("llama-cpp-native", "llama-cpp-default")
MAX_TOKENS = 96
CLIENTS = 3
TAIL_S = 3.0


def say(message: str) -> None:
    print(f"[drain {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Streamed:
    model: str
    started: float
    ended: float
    text: str
    finish: str | None
    error: str | None


class Load:
    """Clients streaming long answers, each on its own keep-alive connections."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.results: list[Streamed] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def _run(self, index: int) -> None:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0,
                               timeout=120)  # fmt: skip
        turn = index
        while not self._stop.is_set():
            model = MODELS[turn % len(MODELS)]
            turn += 1
            started = time.monotonic()
            text, finish, error = read_whole_stream(
                client, model, "Tell me a long story.", max_tokens=MAX_TOKENS, temperature=0
            )
            error = error[:300] if error else None
            self.results.append(Streamed(model, started, time.monotonic(), text, finish, error))


def judge(results: list[Streamed], whole: dict[str, set[str]]) -> dict[str, int]:
    truncated = 0
    for r in results:
        if r.error is None and r.finish == "stop" and r.text:
            known = whole.get(r.model, set())
            truncated += any(w != r.text and w.startswith(r.text) for w in known)
    return {
        "sent": len(results),
        "failed": sum(r.error is not None and not r.text for r in results),
        "cut": sum(r.error is not None and bool(r.text) for r in results),
        "empty": sum(r.error is None and not r.text for r in results),
        "truncated_as_whole": truncated,
    }


def steady(running: RunningStack) -> dict[str, Any]:
    return running.wait_for(
        lambda d: (
            d["gateway"].get("state") == "ready"
            and d["gateway"].get("in_sync")
            and not d["daemon"].get("jobs_running")
            and all(p["state"] == "ready" for p in d["providers"] if p["type"] in LOCAL)
        ),
        timeout_s=240,
        poll_s=0.3,
    )


def ctl(running: RunningStack, *args: str) -> None:
    result = running.ctl(*args, "--config-dir", str(running.stack.config_dir), timeout=600)
    if result.returncode != 0:
        say(f"diversityctl {' '.join(args)}: exit {result.returncode}: {result.stderr[-300:]}")


def edit_settings(running: RunningStack, change: Callable[[dict[str, Any]], None]) -> None:
    path = running.stack.config_dir / "diversityd.yaml"
    settings = yaml.safe_load(path.read_text())
    change(settings)
    path.write_text(yaml.safe_dump(settings, sort_keys=False))


def changes(running: RunningStack) -> dict[str, Callable[[], None]]:
    state = {"model": "tiny-a.gguf", "ctx": 256, "drop": False}

    def repoint() -> None:
        state["model"] = "tiny-b.gguf" if state["model"] == "tiny-a.gguf" else "tiny-a.gguf"
        point_link(running.stack.active_link, f"../{state['model']}")

    def config() -> None:
        state["ctx"] = 320 if state["ctx"] == 256 else 256
        edit_settings(running, lambda s: s["providers"][LLAMA_NATIVE].update(ctx=state["ctx"]))
        ctl(running, "reload")

    def stop_start() -> None:
        ctl(running, "stop", LLAMA_NATIVE)
        time.sleep(2)
        ctl(running, "start", LLAMA_NATIVE)

    def switch() -> None:
        state["drop"] = not state["drop"]
        edit_settings(
            running, lambda s: s["gateway"].update(litellm_settings={"drop_params": state["drop"]})
        )
        ctl(running, "reload")

    return {
        "restart": lambda: ctl(running, "restart", LLAMA_PYTHON),
        "repoint": repoint,
        "config": config,
        "stop_start": stop_start,
        "drill_stop": lambda: ctl(running, "failover-test", LLAMA_PYTHON, "--mode", "stop"),
        "switch": switch,
    }


def held(running: RunningStack, url: str, key: str) -> dict[str, Any]:
    """Requests for a model whose only server restarts on purpose."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    latencies: list[float] = []
    failed: list[str] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                client.chat.completions.create(
                    model="qwen-coder-vllm",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=8,
                )
                latencies.append((time.monotonic() - started) * 1000)
            except openai.APIError as exc:
                failed.append(f"{type(exc).__name__}: {exc}"[:200])
            time.sleep(0.05)

    asking = threading.Thread(target=ask)
    asking.start()
    try:
        time.sleep(1)
        ctl(running, "restart", VLLM)
        steady(running)
        time.sleep(1)
    finally:
        stop.set()
        asking.join(150)
    return {
        "sent": len(latencies) + len(failed),
        "failed": len(failed),
        "max_ms": round(max(latencies), 1) if latencies else None,
        "failures": failed[:3],
    }


def drained_s(running: RunningStack, since: float, until: float) -> float | None:
    waits = [
        float(e.get("ELAPSED_MS", 0)) / 1000
        for e in running.journal_events("provider.drained")
        if since <= int(e["__MONOTONIC_TIMESTAMP"]) / 1e6 <= until
    ]
    return round(max(waits), 2) if waits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="each change once")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3

    def spec(manager: PrivateManager) -> StackSpec:
        return StackSpec(
            ports={**{n: free_port() for n in PROVIDERS}, "gateway": free_port()},
            providers=PROVIDERS,
            unit_dir=manager.unit_dir,
        )

    with temporary_stack("bench-drain-", spec) as running:
        gateway = steady(running)["gateway"]
        key = read_master_key(Path(gateway["key_file"]))
        plan = changes(running)
        spans: dict[str, list[tuple[float, float]]] = {name: [] for name in plan}
        with Load(gateway["url"], key) as load:
            time.sleep(5)  # whole answers to compare with
            for _ in range(repeats):
                for name, change in plan.items():
                    began = time.monotonic()
                    say(f"{name}...")
                    change()
                    steady(running)
                    time.sleep(TAIL_S)
                    spans[name].append((began, time.monotonic()))
        results = list(load.results)
        whole: dict[str, set[str]] = {}
        for r in results:
            if r.error is None and r.finish == "length":
                whole.setdefault(r.model, set()).add(r.text)
        report: dict[str, Any] = {}
        for name, windows in spans.items():
            inside = [r for r in results if any(a <= r.started <= b for a, b in windows)]
            report[name] = {
                **judge(inside, whole),
                "drain_s": max(
                    (d for a, b in windows if (d := drained_s(running, a, b)) is not None),
                    default=None,
                ),
            }
        totals = judge(results, whole)
        held_requests = held(running, gateway["url"], key)
    emit(
        {
            "changes": report,
            "total": totals,
            "held": held_requests,
            "settings": {"clients": CLIENTS, "max_tokens": MAX_TOKENS, "repeats": repeats},
        }
    )


if __name__ == "__main__":
    main()
