"""A journal a person can read (issue 13), counted in a real journal: the whole stack (the
two llama servers, the Ollama and vLLM stand-ins, LiteLLM behind diversityd) run for a while
under an openai client, with a frozen server and a stopped one, then every line read back."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diversityd.log import event_text
from diversityd.units import DAEMON_UNIT, unit_name
from diversityd_lab.embedded import LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM, StackSpec
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import RunningStack, free_port, start_stack
from tests.integration.test_gateway import gateway_url, master_key, wait_gateway_ready

pytestmark = pytest.mark.integration

PROVIDERS = (LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM)
PROBE_PATHS = ("/v1/models", "/health", "/api/tags", "/api/version")
# llama-server's per-request timing lines (its default verbosity, info, prints them)
TIMING_MARKS = ("prompt eval time", "print_timing", "eval time =")


@pytest.fixture(scope="module")
def journal_stack(
    shared_private_manager: PrivateManager,
    tmp_path_factory: pytest.TempPathFactory,
    llama_server_bin: Path,
    llama_cpp_python_interpreter: Path,
    litellm_python: Path,
) -> Iterator[RunningStack]:
    spec = StackSpec(
        ports={**{name: free_port() for name in PROVIDERS}, "gateway": free_port()},
        providers=PROVIDERS,
        unit_dir=shared_private_manager.unit_dir,
        # the frozen server stays frozen while requests fail over (not killed as hung)
        extra_settings={"supervision": {"hung_grace_s": 120}},
    )
    running = start_stack(shared_private_manager, tmp_path_factory.mktemp("journal"), spec)
    try:
        running.wait_all_ready(timeout_s=90)
        wait_gateway_ready(running)
        yield running
    finally:
        shared_private_manager.systemctl("stop", DAEMON_UNIT, check=False)
        shared_private_manager.systemctl(
            "stop", "diversityd-gateway@blue.service", "diversityd-gateway@green.service",
            "diversityd-gateway.socket", check=False,
        )  # fmt: skip


def message_of(entry: dict[str, Any]) -> str:
    """journalctl -o json writes a message with control bytes (ANSI) as a list of bytes."""
    message = entry.get("MESSAGE", "")
    if isinstance(message, list):
        return bytes(message).decode("utf-8", "replace")
    return str(message or "")


def unit_of(entry: dict[str, Any]) -> str:
    return str(entry.get("_SYSTEMD_UNIT") or entry.get("USER_UNIT") or "")


def ask_all(client: Any, models: list[str], rounds: int) -> list[str]:
    import openai

    failures = []
    for _ in range(rounds):
        for model in models:
            try:
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
            except openai.APIError as exc:
                failures.append(f"{model}: {type(exc).__name__}")
    return failures


def test_the_journal_reads_as_words_without_colour_probes_or_tracebacks(
    journal_stack: RunningStack,
) -> None:
    import openai

    running = journal_stack
    manager = running.manager
    assert isinstance(manager, PrivateManager)
    client = openai.OpenAI(
        base_url=f"{gateway_url(running)}/v1",
        api_key=master_key(running),
        max_retries=0,
        timeout=30,
    )
    models = [model.id for model in client.models.list()]
    assert ask_all(client, models, rounds=2) == []
    # A frozen server (timeouts, then fallbacks and cooldowns) and a stopped one (its
    # model answered retryably): LiteLLM's failures, request after request.
    python_unit, vllm_unit = unit_name(LLAMA_PYTHON), unit_name(VLLM)
    manager.systemctl("kill", "--signal=SIGSTOP", python_unit)
    manager.systemctl("stop", vllm_unit)
    try:
        running.wait_for(
            lambda d: "qwen-coder-vllm" in d["gateway"]["left_out"] and d["gateway"]["in_sync"],
            timeout_s=120,
            poll_s=0.5,
        )
        failed = ask_all(client, ["llama-cpp-default", "qwen-coder-vllm"], rounds=6)
        assert any(f.startswith("qwen-coder-vllm") for f in failed), failed
    finally:
        manager.systemctl("kill", f"--signal={signal.SIGCONT.name}", python_unit, check=False)
        manager.systemctl("start", vllm_unit, check=False)
    running.wait_all_ready(timeout_s=90)
    # LiteLLM's own failures (a name no deployment serves: its 400, logged as an error)
    assert len(ask_all(client, ["no-such-model"], rounds=2)) == 2
    time.sleep(3)  # some more probes of every server

    entries = manager.journal()
    ours = [e for e in entries if "diversityd" in unit_of(e)]
    assert len(ours) > 50, len(ours)  # the stack's lines are there to count
    messages = [(unit_of(e), message_of(e)) for e in ours]

    server_units = {unit_name(name) for name in PROVIDERS}
    native = unit_name(LLAMA_NATIVE)
    found: dict[str, list[tuple[str, str]]] = {
        "coloured": [m for m in messages if "\x1b[" in m[1]],
        "probe lines": [
            m for m in messages if m[0] in server_units and any(p in m[1] for p in PROBE_PATHS)
        ],
        "tracebacks": [m for m in messages if "Traceback (most recent call last)" in m[1]],
        "timing lines": [
            m for m in messages if m[0] == native and any(t in m[1] for t in TIMING_MARKS)
        ],
    }
    events = [e for e in entries if unit_of(e) == DAEMON_UNIT and e.get("EVENT")]
    assert len(events) > 10, len(events)
    # installed by `diversityctl install` of this very version: its own unit is current
    assert "daemon.unit_stale" not in {e["EVENT"] for e in events}
    found["events without words"] = [
        (str(e["EVENT"]), message_of(e))
        for e in events
        if not message_of(e).startswith(event_text(str(e["EVENT"])))
        or re.match(r"^[a-z_]+\.[a-z_]+\b", message_of(e))
    ]
    # every gateway instance warmed up before it took a client: in full with every server up
    # (at start), in part while one was frozen (its requests time out: the budget ends it)
    warmed = [text for unit, text in messages if "gateway@" in unit and "warm" in text]
    assert any(re.fullmatch(r"gateway warmed ([1-9]\d*)/\1 requests", t) for t in warmed), warmed
    shapes = (r"gateway warmed \d+/\d+ requests", "gateway warm-up cut short")
    assert all(any(re.fullmatch(shape, t) for shape in shapes) for t in warmed), warmed
    # LiteLLM did log the failures (one line each, not a traceback): the count means something
    assert any("ERROR" in text for unit, text in messages if "gateway" in unit)
    counts = {kind: len(lines) for kind, lines in found.items()}
    samples = {kind: lines[:3] for kind, lines in found.items() if lines}
    print(json.dumps(samples, indent=1))  # shown when the test fails
    assert counts == dict.fromkeys(found, 0), counts
