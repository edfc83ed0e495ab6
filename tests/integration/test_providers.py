"""Real llama servers behind the active GGUF symlink; probes; hang detection."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from diversityd_lab.embedded import (
    LLAMA_NATIVE,
    LLAMA_PYTHON,
    OLLAMA,
    SERVED_NAMES,
    StackSpec,
    point_link,
    write_stack,
    write_truncated_model,
)
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import RunningStack, free_port, mapped_models
from diversityd_lab.standins.binaries import MODELS_ENV
from diversityd_lab.traffic import RequestStream, chat

pytestmark = pytest.mark.integration

ALIASES = SERVED_NAMES


def test_both_llama_servers_answer_a_chat_from_their_rendered_units(
    running_stack: RunningStack,
) -> None:
    running_stack.wait_all_ready()
    for base_url, alias in running_stack.stack.llama_endpoints():
        answer = chat(base_url, alias)
        choices = answer["choices"]
        assert isinstance(choices, list)
        assert choices[0]["message"]["content"]
        assert answer["model"] == alias


def test_repointing_the_link_under_load_answers_every_request(running_stack: RunningStack) -> None:
    document = running_stack.wait_all_ready()
    stack = running_stack.stack
    pids = {name: running_stack.provider(name, document)["pid"] for name in ALIASES}
    assert all(mapped_models(pid) == {"tiny-a.gguf"} for pid in pids.values())
    with RequestStream(running_stack.stack.llama_endpoints()) as stream:
        time.sleep(0.5)
        point_link(stack.active_link, "../tiny-b.gguf")  # what `ln -sfn` does: atomic
        final = running_stack.wait_for(
            lambda d: all(
                running_stack.provider(name, d)["pid"] not in (None, pids[name])
                and running_stack.provider(name, d)["state"] == "ready"
                for name in ALIASES
            ),
            timeout_s=60,
        )
        time.sleep(0.5)
    assert stream.unanswered == [], stream.unanswered
    assert stream.answered > 10
    for name, alias in ALIASES.items():
        entry = running_stack.provider(name, final)
        assert mapped_models(entry["pid"]) == {"tiny-b.gguf"}
        assert entry["model_file"]["target"] == str(stack.models_dir / "tiny-b.gguf")
        assert entry["models"] == [alias]  # the served name stays stable
    events = running_stack.journal_events("model.changed")
    assert events
    assert events[-1]["MODEL"].endswith("tiny-b.gguf")
    # one at a time: the second restart began after the first server answered again
    restarting = sorted(
        running_stack.journal_events("unit.restarting"),
        key=lambda e: int(e["__REALTIME_TIMESTAMP"]),
    )[-2:]
    restarted = running_stack.journal_events("unit.restarted", provider=restarting[0]["PROVIDER"])
    assert int(restarting[1]["__REALTIME_TIMESTAMP"]) >= int(restarted[-1]["__REALTIME_TIMESTAMP"])


@pytest.mark.parametrize("kind", ["dangling", "directory", "not-gguf", "truncated"])
def test_a_bad_repoint_changes_nothing(running_stack: RunningStack, kind: str) -> None:
    document = running_stack.wait_all_ready()
    stack = running_stack.stack
    pids = {name: running_stack.provider(name, document)["pid"] for name in ALIASES}
    serving = {name: mapped_models(pid) for name, pid in pids.items()}
    good_target = os.readlink(stack.active_link)
    bad = stack.models_dir / f"bad-{kind}"
    if kind == "directory":
        bad.mkdir()
    elif kind == "not-gguf":
        bad.write_bytes(b"this is not a model\n" * 100)
    elif kind == "truncated":
        write_truncated_model(stack.models_dir, bad.name)
    try:
        point_link(stack.active_link, f"../{bad.name}")
        rejected = running_stack.wait_for(
            lambda d: all(
                (running_stack.provider(name, d)["model_file"] or {}).get("error")
                for name in ALIASES
            ),
            timeout_s=10,
        )
        time.sleep(1.0)  # give a wrong restart every chance to happen
        after = running_stack.status()
        for name in ALIASES:
            entry = running_stack.provider(name, after)
            assert entry["pid"] == pids[name]
            assert entry["state"] == "ready"
            assert mapped_models(entry["pid"]) == serving[name]
        error = running_stack.provider(LLAMA_NATIVE, rejected)["model_file"]["error"]
        assert bad.name in error or "missing" in error
        table = running_stack.ctl("status").stdout
        assert f"{LLAMA_NATIVE}: model file refused:" in table
        assert running_stack.journal_events("model.rejected")
    finally:
        point_link(stack.active_link, good_target)
        running_stack.wait_for(
            lambda d: all(
                not (running_stack.provider(name, d)["model_file"] or {}).get("error")
                for name in ALIASES
            ),
            timeout_s=10,
        )


def test_sigstop_is_detected_within_two_probe_intervals_and_sigcont_recovers(
    running_stack: RunningStack,
) -> None:
    document = running_stack.wait_all_ready()
    interval = running_stack.stack.spec.probe_interval_s
    timeout = running_stack.stack.spec.probe_timeout_s
    pid = running_stack.provider(LLAMA_NATIVE, document)["pid"]
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        hung = running_stack.wait_for(
            lambda d: running_stack.provider(LLAMA_NATIVE, d)["state"] == "hung",
            timeout_s=10,
            poll_s=0.05,
        )
        detected = running_stack.provider(LLAMA_NATIVE, hung)["last_state_change_monotonic"]
        assert detected - stopped_at <= 2 * interval + timeout, detected - stopped_at
        assert running_stack.provider(LLAMA_PYTHON, hung)["state"] == "ready"
    finally:
        os.kill(pid, signal.SIGCONT)
    back = running_stack.wait_for(
        lambda d: running_stack.provider(LLAMA_NATIVE, d)["state"] == "ready", timeout_s=30
    )
    assert running_stack.provider(LLAMA_NATIVE, back)["pid"] == pid  # recovered, not restarted


def test_what_a_provider_reports_filters_its_configured_models(
    private_manager: PrivateManager, tmp_path: Path
) -> None:
    """A configured model the server does not serve is missing; one it serves beyond the
    configuration is shown, never routed to."""
    spec = StackSpec(
        ports={OLLAMA: free_port()}, providers=(OLLAMA,), unit_dir=private_manager.unit_dir
    )
    stack = write_stack(tmp_path / "stack", spec)
    providers = yaml.safe_load((stack.config_dir / "providers.yaml").read_text())
    providers["providers"][OLLAMA]["models"].append("ghost:7b")
    (stack.config_dir / "providers.yaml").write_text(yaml.safe_dump(providers))
    settings = yaml.safe_load((stack.config_dir / "diversityd.yaml").read_text())
    settings["providers"][OLLAMA]["environment"][MODELS_ENV] += ",extra:1b"
    (stack.config_dir / "diversityd.yaml").write_text(yaml.safe_dump(settings))
    running = RunningStack(private_manager, stack)
    installed = running.ctl("install", "--config-dir", str(stack.config_dir), "--now")
    assert installed.returncode == 0, installed.stderr
    try:
        document = running.wait_all_ready()
        entry = running.provider(OLLAMA, document)
        assert entry["models"] == ["llama3.1:latest", "qwen2.5-coder:7b", "ghost:7b"]
        assert entry["models_missing"] == ["ghost:7b"]
        assert entry["models_extra"] == ["extra:1b"]
        table = running.ctl("status").stdout
        assert "configured, not served: ghost:7b" in table
        assert "served, not configured: extra:1b" in table
    finally:
        private_manager.systemctl("stop", "diversityd.service", check=False)
