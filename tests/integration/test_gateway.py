"""The real LiteLLM gateway owned by diversityd: blue/green reloads on a held socket."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from diversityd.adapters.gatewayclient import ask, new_client
from diversityd.adapters.litellm import read_master_key
from diversityd.drill import Answer
from diversityd.gateway import process_settings_of
from diversityd_lab.clients import read_whole_stream
from diversityd_lab.embedded import (
    LLAMA_NATIVE,
    LLAMA_PYTHON,
    OLLAMA,
    PAID,
    PAID_KEY,
    VLLM,
    StackSpec,
)
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import RunningStack, free_port, start_stack
from diversityd_lab.traffic import GatewayStream

pytestmark = pytest.mark.integration

PROVIDERS = (LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM, PAID)


@pytest.fixture(scope="module")
def gateway_stack(
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
        extra_settings={"supervision": {"hung_grace_s": 2}},
    )
    running = start_stack(shared_private_manager, tmp_path_factory.mktemp("gw"), spec)
    with (running.stack.root / "paid.log").open("ab") as log:
        paid = subprocess.Popen(running.stack.paid_cloud_command(), stdout=log, stderr=log)
    try:
        running.wait_all_ready(timeout_s=90)
        wait_gateway_ready(running)
        yield running
    finally:
        shared_private_manager.systemctl("stop", "diversityd.service", check=False)
        shared_private_manager.systemctl(
            "stop", "diversityd-gateway@blue.service", "diversityd-gateway@green.service",
            "diversityd-gateway.socket", check=False,
        )  # fmt: skip
        paid.terminate()
        paid.wait(10)


def wait_gateway_ready(running: RunningStack, timeout_s: float = 120) -> dict[str, Any]:
    return running.wait_for(
        lambda d: d["gateway"].get("state") == "ready" and d["gateway"].get("in_sync") is True,
        timeout_s=timeout_s,
        poll_s=0.5,
    )


def gateway_url(running: RunningStack) -> str:
    return f"http://127.0.0.1:{running.stack.spec.ports['gateway']}"


def master_key(running: RunningStack) -> str:
    return read_master_key(Path(running.status()["gateway"]["key_file"]))


def ask_once(running: RunningStack, model: str, stream: bool) -> Answer:
    async def go() -> Answer:
        async with new_client(60) as client:
            return await ask(
                client, gateway_url(running), master_key(running), model, stream=stream
            )

    return asyncio.run(go())


def gateway_stream(running: RunningStack, model: str) -> GatewayStream:
    """Requests for one model through the gateway, plain and streamed in turn."""
    return GatewayStream(gateway_url(running), master_key(running), [model])


def test_gateway_serves_what_the_daemon_says_is_served(gateway_stack: RunningStack) -> None:
    document = gateway_stack.status()
    gateway = document["gateway"]
    assert gateway["owned"] is True
    assert gateway["unit"].startswith("diversityd-gateway@")
    key_file = Path(gateway["key_file"])
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = read_master_key(key_file)
    assert key.startswith("sk-")
    assert key not in json.dumps(document)  # the key's file is shown, never its value
    config_text = Path(gateway["config"]).read_text()
    assert key not in config_text
    assert "os.environ/LITELLM_MASTER_KEY" in config_text
    request = urllib.request.Request(
        f"{gateway_url(gateway_stack)}/v1/models", headers={"Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        served = sorted(m["id"] for m in json.load(response)["data"])
    assert served == sorted(gateway["models"])
    assert {"llama-cpp-native", "llama-cpp-default", "llama3.1:latest", "qwen-coder-vllm"} <= set(
        served
    )
    bases = {
        "llama-cpp-native": gateway_stack.stack.base_url(LLAMA_NATIVE) + "/v1",
        "llama-cpp-default": gateway_stack.stack.base_url(LLAMA_PYTHON) + "/v1",
        "llama3.1:latest": gateway_stack.stack.base_url(OLLAMA),
        "qwen-coder-vllm": gateway_stack.stack.base_url(VLLM) + "/v1",
    }
    for model, base in bases.items():
        for stream in (False, True):
            answer = ask_once(gateway_stack, model, stream)
            assert answer.ok, answer
            assert answer.api_base == base, answer


def test_an_outside_stop_changes_the_routes_in_process_within_seconds(
    gateway_stack: RunningStack,
) -> None:
    """Issue 17: a `systemctl --user stop` took 17.1 s to reach the gateway (a new LiteLLM
    per change), and 13.5 s more after the server was back. Now the running instance gets
    new routes over its control channel: no new process, and no request for the model
    reaches the stopped server once the daemon has seen the stop."""
    before = wait_gateway_ready(gateway_stack)["gateway"]
    vllm_unit = f"diversityd-{VLLM}.service"
    with gateway_stream(gateway_stack, "llama-cpp-native") as stream:
        time.sleep(1)
        stopped_at = time.monotonic()
        gateway_stack.manager.systemctl("stop", vllm_unit)
        out = gateway_stack.wait_for(
            lambda d: "qwen-coder-vllm" in d["gateway"]["left_out"] and d["gateway"]["in_sync"],
            timeout_s=60,
            poll_s=0.1,
        )["gateway"]
        routed_out_s = time.monotonic() - stopped_at
        gateway_stack.manager.systemctl("start", vllm_unit)
        started_at = time.monotonic()
        back = gateway_stack.wait_for(
            lambda d: "qwen-coder-vllm" in d["gateway"]["models"] and d["gateway"]["in_sync"],
            timeout_s=60,
            poll_s=0.1,
        )["gateway"]
        routed_back_s = time.monotonic() - started_at
        time.sleep(1)
    assert out["reloads"] == back["reloads"] == before["reloads"]  # no new process
    assert back["unit"] == before["unit"]
    assert back["route_updates"] >= before["route_updates"] + 2  # out, and back in
    assert back["last_change"]["change"] == "in-process"
    # generous bounds (the benchmark measures it): 17.1 s before, the same again back
    assert routed_out_s < 5, routed_out_s
    assert routed_back_s < 10, routed_back_s  # vLLM's start and first probe included
    assert stream.failed == [], stream.failed[:5]
    assert len(stream.answers) >= 10
    assert gateway_stack.journal_events("gateway.routes_updated")


def test_a_setting_fixed_at_start_takes_a_new_process_and_fails_nothing(
    gateway_stack: RunningStack,
) -> None:
    """What a running LiteLLM cannot take in-process (here a `litellm_settings` key) still
    goes blue/green: the new process serves before the old one stops."""
    before = wait_gateway_ready(gateway_stack)["gateway"]
    settings_file = gateway_stack.stack.config_dir / "diversityd.yaml"
    original = settings_file.read_text()
    settings = yaml.safe_load(original)
    settings["gateway"]["litellm_settings"] = {"drop_params": True}
    try:
        with gateway_stream(gateway_stack, "llama-cpp-native") as stream:
            time.sleep(1)
            settings_file.write_text(yaml.safe_dump(settings))
            reloaded = gateway_stack.ctl("reload")
            after = gateway_stack.wait_for(
                lambda d: (
                    d["gateway"]["reloads"] > before["reloads"] and d["gateway"]["state"] == "ready"
                ),
                timeout_s=120,
                poll_s=0.5,
            )["gateway"]
            time.sleep(1)
        assert reloaded.returncode == 0, reloaded.stderr
        assert "gateway: a new process" in reloaded.stdout, reloaded.stdout
        assert "litellm_settings.drop_params" in reloaded.stdout
        assert after["unit"] != before["unit"]  # the other colour took over
        assert after["last_reload"]["ok"] is True
        assert after["last_change"]["change"] == "new process"
        assert stream.failed == [], stream.failed[:5]
        assert len(stream.answers) >= 10
        gateway_stack.wait_for(
            lambda _: gateway_stack.unit_property(before["unit"], "ActiveState") == "inactive",
            timeout_s=120,
        )  # the old proxy stopped after the new one served
    finally:
        settings_file.write_text(original)
        gateway_stack.ctl("reload")
        wait_gateway_ready(gateway_stack)


def provider_doc(document: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in document["providers"] if p["name"] == name)


def test_a_crash_costs_no_new_gateway_process(gateway_stack: RunningStack) -> None:
    """Issue 12 kept a crashed server in the gateway for a grace, because each change cost
    a new LiteLLM; issue 17: the routes follow (out at once, back when it answers) with no
    new process at all."""
    document = wait_gateway_ready(gateway_stack)
    before = document["gateway"]
    pid = provider_doc(document, LLAMA_NATIVE)["pid"]
    assert pid
    with gateway_stream(gateway_stack, "llama-cpp-native") as stream:
        time.sleep(1)
        os.kill(pid, signal.SIGKILL)
        gateway_stack.wait_for(
            lambda d: (
                provider_doc(d, LLAMA_NATIVE)["state"] == "ready"
                and provider_doc(d, LLAMA_NATIVE)["pid"] not in (None, pid)
                and "llama-cpp-native" not in d["gateway"]["substituted"]
                and d["gateway"]["in_sync"]
            ),
            timeout_s=60,
            poll_s=0.2,
        )
        time.sleep(2)
    after = gateway_stack.status()["gateway"]
    assert after["reloads"] == before["reloads"], after["last_reload"]
    assert after["unit"] == before["unit"]
    assert after["route_updates"] >= before["route_updates"] + 2  # out, and back in
    assert after["in_sync"] is True
    assert stream.failed == [], stream.failed[:5]
    assert len(stream.answers) >= 20
    # the crashed server answers through the gateway again
    answer = ask_once(gateway_stack, "llama-cpp-native", stream=False)
    assert answer.api_base == gateway_stack.stack.base_url(LLAMA_NATIVE) + "/v1", answer


def test_an_instance_restarted_by_systemd_comes_back_on_the_current_routes(
    gateway_stack: RunningStack,
) -> None:
    """After every in-process change the instance's config file is rewritten too: a
    `Restart=` of the instance (kill -9) loads the routes in force, not the ones it
    started with."""
    before = wait_gateway_ready(gateway_stack)["gateway"]
    vllm_unit = f"diversityd-{VLLM}.service"
    gateway_stack.manager.systemctl("stop", vllm_unit)
    try:
        changed = gateway_stack.wait_for(
            lambda d: "qwen-coder-vllm" in d["gateway"]["left_out"] and d["gateway"]["in_sync"],
            timeout_s=60,
            poll_s=0.2,
        )["gateway"]
        assert changed["reloads"] == before["reloads"]
        os.kill(changed["pid"], signal.SIGKILL)  # systemd's Restart= brings it back
        back = gateway_stack.wait_for(
            lambda d: (
                d["gateway"]["state"] == "ready"
                and d["gateway"]["pid"] not in (None, changed["pid"])
                and d["gateway"]["in_sync"]
            ),
            timeout_s=120,
            poll_s=0.5,
        )["gateway"]
        assert back["unit"] == changed["unit"]
        # the restarted process answers qwen-coder-vllm as the routes in force say (vLLM is
        # stopped: a 503 naming it); the routes it first started with sent it to vLLM
        answer = ask_once(gateway_stack, "qwen-coder-vllm", stream=False)
        assert answer.status == 503, answer
        assert "vllm is stopped" in (answer.error or ""), answer
    finally:
        gateway_stack.manager.systemctl("start", vllm_unit)
        gateway_stack.wait_for(
            lambda d: "qwen-coder-vllm" not in d["gateway"]["left_out"] and d["gateway"]["in_sync"],
            timeout_s=120,
            poll_s=0.5,
        )


def test_a_broken_new_config_leaves_the_old_gateway_serving(gateway_stack: RunningStack) -> None:
    before = wait_gateway_ready(gateway_stack)["gateway"]
    settings_file = gateway_stack.stack.config_dir / "diversityd.yaml"
    original = settings_file.read_text()
    settings = yaml.safe_load(original)
    settings["gateway"]["router_settings"] = {"routing_strategy": "no-such-strategy"}
    old_config = Path(before["config"]).read_text()
    try:
        settings_file.write_text(yaml.safe_dump(settings))
        with gateway_stream(gateway_stack, "llama-cpp-default") as stream:
            result = gateway_stack.ctl("reload")
            assert result.returncode == 0, result.stderr  # diversityd accepts it; LiteLLM won't
            failed = gateway_stack.wait_for(
                lambda d: (d["gateway"]["last_reload"] or {}).get("ok") is False,
                timeout_s=120,
                poll_s=0.5,
            )["gateway"]
        assert failed["unit"] == before["unit"]  # still the old instance
        assert failed["state"] == "ready"
        assert "did not become ready" in failed["last_reload"]["error"]
        # the last good settings in place (with the routes of the moment: they still follow
        # the providers in-process while the new config cannot start)
        in_place = yaml.safe_load(Path(failed["config"]).read_text())
        assert process_settings_of(in_place) == process_settings_of(yaml.safe_load(old_config))
        assert stream.failed == [], stream.failed[:5]
        assert gateway_stack.journal_events("gateway.reload_failed")
        table = gateway_stack.ctl("status").stdout
        assert "gateway: ready" in table
    finally:
        settings_file.write_text(original)
        gateway_stack.ctl("reload")
    # With the settings mended, what renders is what already serves: in sync, no reload.
    recovered = gateway_stack.wait_for(
        lambda d: d["gateway"]["in_sync"] is True and d["gateway"]["state"] == "ready",
        timeout_s=120,
        poll_s=0.5,
    )["gateway"]
    assert recovered["unit"] == before["unit"]
    assert "routing_strategy" not in Path(recovered["config"]).read_text()


def test_history_and_rollback(gateway_stack: RunningStack) -> None:
    before = wait_gateway_ready(gateway_stack)["gateway"]
    # one more config in the history: a setting that takes a new process
    settings_file = gateway_stack.stack.config_dir / "diversityd.yaml"
    original = settings_file.read_text()
    settings = yaml.safe_load(original)
    settings["gateway"]["litellm_settings"] = {"drop_params": True}
    settings_file.write_text(yaml.safe_dump(settings))
    assert gateway_stack.ctl("reload").returncode == 0
    gateway_stack.wait_for(
        lambda d: d["gateway"]["reloads"] > before["reloads"] and d["gateway"]["in_sync"],
        timeout_s=120,
        poll_s=0.5,
    )
    settings_file.write_text(original)
    assert gateway_stack.ctl("reload").returncode == 0
    gateway_stack.wait_for(
        lambda d: d["gateway"]["reloads"] > before["reloads"] + 1 and d["gateway"]["in_sync"],
        timeout_s=120,
        poll_s=0.5,
    )
    result = gateway_stack.ctl("history", "--json")
    assert result.returncode == 0, result.stderr
    history = json.loads(result.stdout)["history"]
    assert len(history) >= 2
    assert sum(entry["current"] for entry in history) == 1
    current = next(entry for entry in history if entry["current"])
    older = next(entry for entry in history if entry["sha256"] != current["sha256"])
    rolled = gateway_stack.ctl("rollback", older["id"], timeout=300)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    gateway = gateway_stack.status()["gateway"]
    assert gateway["pinned"] == older["id"]
    assert Path(gateway["config"]).read_text() == Path(older["path"]).read_text()
    # the pin outlives the daemon (issue 10, scenario 4): a new daemon does not reload the
    # config the user rolled back from
    daemon = gateway_stack.daemon_pid()
    os.kill(daemon, signal.SIGKILL)
    gateway_stack.wait_for(
        lambda d: d["daemon"].get("running") is True and d["daemon"]["pid"] != daemon,
        timeout_s=60,
    )
    time.sleep(8)  # past the debounce and the interval between reloads
    again = gateway_stack.status()["gateway"]
    assert again["pinned"] == older["id"]
    assert again["unit"] == gateway["unit"]
    assert Path(again["config"]).read_text() == Path(older["path"]).read_text()
    # a configuration reload ends the pin and renders afresh
    assert gateway_stack.ctl("reload").returncode == 0
    gateway_stack.wait_for(lambda d: d["gateway"]["pinned"] is None, timeout_s=30)


# Every provider whose models all have a fallback, in each mode (vLLM's model has none:
# its drill is refused, below).
@pytest.mark.parametrize("mode", ["kill", "stop", "hang"])
@pytest.mark.parametrize("provider", [LLAMA_PYTHON, OLLAMA, LLAMA_NATIVE])
def test_failover_drill_fails_no_request_and_restores(
    gateway_stack: RunningStack, mode: str, provider: str
) -> None:
    wait_gateway_ready(gateway_stack)
    before = gateway_stack.provider(provider)
    result = gateway_stack.ctl("failover-test", provider, "--mode", mode, "--json", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    (drill,) = report["drills"]
    assert drill["provider"] == provider
    assert drill["mode"] == mode
    assert drill["failed"] == 0, drill["failures"]
    if mode == "stop":  # announced: drained first, a planned stop loses nothing
        assert drill["cut_mid_stream"] == 0, drill
    assert drill["restored"] is True
    assert drill["sent"] >= 10
    assert drill["p99_ms"] >= drill["p50_ms"] > 0
    # the dead provider was covered by others: more than one server answered
    assert len(drill["answered_by"]) >= 2, drill["answered_by"]
    own_base = gateway_stack.stack.base_url(provider)
    assert any(base.startswith(own_base) for base in drill["answered_by"])
    after = gateway_stack.provider(provider)
    assert after["state"] == "ready"
    # a hung server is killed after its grace (requests it held fail over at once) and
    # systemd brings it back: every mode ends with a new process
    assert after["pid"] != before["pid"]
    if mode == "hang":
        assert gateway_stack.journal_events("provider.hung_killed", provider=provider)


def test_an_unannounced_stop_fails_over_and_counts_cut_streams_apart(
    gateway_stack: RunningStack,
) -> None:
    """`--mode outside-stop` stops the unit as another tool would, with no drain: what it
    tests is failover. A stream cut there is counted apart (`cut_mid_stream`), as a kill's
    is; no other request fails."""
    wait_gateway_ready(gateway_stack)
    result = gateway_stack.ctl(
        "failover-test", LLAMA_PYTHON, "--mode", "outside-stop", "--json", timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (drill,) = json.loads(result.stdout)["drills"]
    assert drill["mode"] == "outside-stop"
    assert drill["failed"] == 0, drill["failures"]
    assert drill["restored"] is True
    assert "cut_mid_stream" in drill
    assert gateway_stack.provider(LLAMA_PYTHON)["state"] == "ready"


def test_a_drill_that_would_leave_a_model_without_fallback_is_refused(
    gateway_stack: RunningStack,
) -> None:
    # qwen-coder-vllm is a terminal: with vLLM down nothing serves it
    result = gateway_stack.ctl("failover-test", VLLM, "--mode", "stop")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "qwen-coder-vllm" in result.stderr
    assert "--force" in result.stderr
    assert gateway_stack.provider(VLLM)["state"] == "ready"  # nothing was touched


def test_a_model_with_no_live_server_answers_retryably_and_stays_listed(
    gateway_stack: RunningStack,
) -> None:
    """Issue 11, scenario 2: its name was left out of the gateway, which answered 400
    `Invalid model name`, a status clients do not retry."""
    import openai

    wait_gateway_ready(gateway_stack)
    unit = f"diversityd-{VLLM}.service"
    client = openai.OpenAI(
        base_url=f"{gateway_url(gateway_stack)}/v1",
        api_key=master_key(gateway_stack),
        max_retries=0,
        timeout=60,
    )
    gateway_stack.manager.systemctl("stop", unit)
    try:
        gateway_stack.wait_for(
            lambda d: "qwen-coder-vllm" in d["gateway"]["left_out"] and d["gateway"]["in_sync"],
            timeout_s=120,
            poll_s=0.5,
        )
        assert "qwen-coder-vllm" in [m.id for m in client.models.list()]  # still listed
        statuses, messages, retry_after = [], [], []
        for _ in range(3):
            with pytest.raises(openai.APIStatusError) as failed:
                client.chat.completions.create(
                    model="qwen-coder-vllm",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=4,
                )
            statuses.append(failed.value.status_code)
            messages.append(str(failed.value.message))
            retry_after.append(failed.value.response.headers.get("retry-after"))
        assert all(status in (429, 503) for status in statuses), statuses  # clients retry
        first = messages[0]
        assert "vllm is stopped" in first, first  # names the provider and its state
        assert any(value is not None for value in retry_after), retry_after
    finally:
        gateway_stack.manager.systemctl("start", unit)
        gateway_stack.wait_for(
            lambda d: "qwen-coder-vllm" not in d["gateway"]["left_out"] and d["gateway"]["in_sync"],
            timeout_s=120,
            poll_s=0.5,
        )


def test_the_serving_gateway_stopped_by_hand_is_replaced_on_the_current_config(
    gateway_stack: RunningStack,
) -> None:
    """Issue 11, scenario 4: when the serving instance died for good nothing started one
    with the current config, and socket activation started the `Service=` colour (blue)
    on whatever config blue had last served, while status said the other was in sync."""
    vllm = f"diversityd-{VLLM}.service"
    settings_file = gateway_stack.stack.config_dir / "diversityd.yaml"
    original = settings_file.read_text()
    settings = yaml.safe_load(original)
    wait_gateway_ready(gateway_stack)
    try:
        # green serves a config blue never had (vLLM away, then a setting changed)
        gateway_stack.manager.systemctl("stop", vllm)
        before = gateway_stack.wait_for(
            lambda d: "qwen-coder-vllm" in d["gateway"]["left_out"] and d["gateway"]["in_sync"],
            timeout_s=120,
            poll_s=0.5,
        )["gateway"]
        if before["unit"] != "diversityd-gateway@green.service":
            # colours alternate: one more new process (a setting fixed at its start)
            settings["gateway"]["litellm_settings"] = {"drop_params": True}
            settings_file.write_text(yaml.safe_dump(settings))
            assert gateway_stack.ctl("reload").returncode == 0
            before = gateway_stack.wait_for(
                lambda d: (
                    d["gateway"]["unit"] == "diversityd-gateway@green.service"
                    and d["gateway"]["in_sync"]
                    and d["gateway"]["state"] == "ready"
                ),
                timeout_s=120,
                poll_s=0.5,
            )["gateway"]
        with gateway_stream(gateway_stack, "llama-cpp-native") as stream:
            time.sleep(1)
            gateway_stack.manager.systemctl("stop", before["unit"])
            after = gateway_stack.wait_for(
                lambda d: (
                    d["gateway"]["state"] == "ready"
                    and d["gateway"]["in_sync"]
                    and d["gateway"]["pid"] not in (None, before["pid"])
                ),
                timeout_s=120,
                poll_s=0.5,
            )["gateway"]
            time.sleep(2)
        assert after["config_sha256"] == before["config_sha256"]  # the current config...
        served = Path(after["config"]).read_text()
        assert "diversityd_unavailable" in served  # ...which answers qwen-coder-vllm itself
        assert gateway_stack.unit_property(after["unit"], "ActiveState") == "active"
        assert stream.failed == [], stream.failed[:5]  # waited on the held socket
        assert len(stream.answers) > 0
    finally:
        settings_file.write_text(original)
        gateway_stack.ctl("reload")
        gateway_stack.manager.systemctl("start", vllm)
        wait_gateway_ready(gateway_stack)


@pytest.fixture
def gateway_faults(gateway_stack: RunningStack) -> Iterator[Path]:
    """The daemon of `gateway_stack` reads the step to die at from the returned file."""
    manager = gateway_stack.manager
    settings_file = gateway_stack.stack.config_dir / "diversityd.yaml"
    original = settings_file.read_text()
    fault = gateway_stack.stack.root / "fault"
    drop_in = manager.unit_dir / "diversityd.service.d" / "fault.conf"
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text(f'[Service]\nEnvironment="DIVERSITYD_FAULT_FILE={fault}"\n')
    manager.systemctl("daemon-reload")
    manager.systemctl("restart", "diversityd.service", timeout=60)
    try:
        wait_gateway_ready(gateway_stack)
        yield fault
    finally:
        fault.unlink(missing_ok=True)
        drop_in.unlink(missing_ok=True)
        settings_file.write_text(original)
        manager.systemctl("daemon-reload")
        manager.systemctl("restart", "diversityd.service", timeout=60)
        gateway_stack.manager.systemctl("start", f"diversityd-{VLLM}.service")
        wait_gateway_ready(gateway_stack)


@pytest.mark.parametrize(
    "step",
    [
        "gateway.routes_written",
        "gateway.config_written",
        "gateway.instance_ready",
        "gateway.switched",
    ],
)
def test_a_daemon_killed_in_a_gateway_reload_leaves_one_gateway_in_sync(
    gateway_stack: RunningStack, gateway_faults: Path, step: str
) -> None:
    """kill -9 of the daemon at each step of a change of routes (in-process) or of a new
    process (blue/green): clients see nothing, and once systemd has restarted the daemon
    one instance serves what renders."""
    document = wait_gateway_ready(gateway_stack)
    daemon = document["daemon"]["pid"]
    vllm = f"diversityd-{VLLM}.service"
    verb = "stop" if gateway_stack.unit_property(vllm, "ActiveState") == "active" else "start"
    settings_file = gateway_stack.stack.config_dir / "diversityd.yaml"
    settings = yaml.safe_load(settings_file.read_text())
    gateway_faults.write_text(step)
    with gateway_stream(gateway_stack, "llama-cpp-native") as stream:
        if step == "gateway.routes_written":
            gateway_stack.manager.systemctl(verb, vllm)  # the routes change
        else:  # a setting fixed at a process's start changes: a new process
            drop = not settings["gateway"].get("litellm_settings", {}).get("drop_params")
            settings["gateway"]["litellm_settings"] = {"drop_params": drop}
            settings_file.write_text(yaml.safe_dump(settings))
            gateway_stack.ctl("reload")
        gateway_stack.wait_for(
            lambda d: d["daemon"].get("running") is True and d["daemon"]["pid"] != daemon,
            timeout_s=240,
            poll_s=0.5,
        )
        settled = wait_gateway_ready(gateway_stack, timeout_s=240)
    assert not gateway_faults.exists(), "the daemon never reached the step"
    assert gateway_stack.journal_events("daemon.fault_injected", state=step)
    assert stream.failed == [], stream.failed[:5]
    assert len(stream.answers) > 0
    active = [
        color
        for color in ("blue", "green")
        if gateway_stack.unit_property(f"diversityd-gateway@{color}.service", "ActiveState")
        in ("active", "deactivating")
    ]
    assert settled["gateway"]["unit"] in {f"diversityd-gateway@{c}.service" for c in active}
    gateway_stack.wait_for(
        lambda _: (
            [
                c
                for c in ("blue", "green")
                if gateway_stack.unit_property(f"diversityd-gateway@{c}.service", "ActiveState")
                == "active"
            ]
            == [settled["gateway"]["unit"].split("@")[1].split(".")[0]]
        ),
        timeout_s=180,
        poll_s=1.0,
    )


def test_nothing_but_a_client_ever_asks_the_paid_cloud(gateway_stack: RunningStack) -> None:
    """Issue 17: each new LiteLLM's warm-up sent real completions to every model, clouds
    included (a counting stand-in got 6 from 3 reloads, none from any client). The paid
    cloud here ends two chains; by now this module has made new processes (warm-ups),
    drilled every provider in every mode, probed for minutes, and never asked for it."""
    wait_gateway_ready(gateway_stack)
    assert gateway_stack.stack.paid_requests() == []
    # one more new process, its warm-up included, and a drill whose chain ends at the cloud
    before = gateway_stack.status()["gateway"]
    settings_file = gateway_stack.stack.config_dir / "diversityd.yaml"
    original = settings_file.read_text()
    settings = yaml.safe_load(original)
    settings["gateway"]["litellm_settings"] = {"drop_params": True}
    try:
        settings_file.write_text(yaml.safe_dump(settings))
        assert gateway_stack.ctl("reload").returncode == 0
        gateway_stack.wait_for(
            lambda d: d["gateway"]["reloads"] > before["reloads"] and d["gateway"]["in_sync"],
            timeout_s=120,
            poll_s=0.5,
        )
        drill = gateway_stack.ctl(
            "failover-test", LLAMA_PYTHON, "--mode", "stop", "--json", timeout=600
        )
        assert drill.returncode == 0, drill.stdout + drill.stderr
    finally:
        settings_file.write_text(original)
        gateway_stack.ctl("reload")
        wait_gateway_ready(gateway_stack)
    assert gateway_stack.stack.paid_requests() == []
    # a client may ask it by name, and the key goes out resolved (never os.environ/NAME)
    answer = ask_once(gateway_stack, "paid-model", stream=False)
    assert answer.ok, answer
    (request,) = gateway_stack.stack.paid_requests()
    assert request["authorization"] == f"Bearer {PAID_KEY}"


def test_a_keep_alive_client_loses_nothing_across_new_gateway_processes(
    gateway_stack: RunningStack,
) -> None:
    """Issue 18: a client on a keep-alive connection (the `openai` package's default) got
    APIConnectionError when the old instance closed it during a blue/green switch. The old
    process now answers with `Connection: close` and keeps idle connections past the
    clients' keep-alive expiry (httpx: 5 s) before it closes them."""
    import threading

    import openai

    before = wait_gateway_ready(gateway_stack)["gateway"]
    client = openai.OpenAI(
        base_url=f"{gateway_url(gateway_stack)}/v1",
        api_key=master_key(gateway_stack),
        max_retries=0,  # a retry would hide the broken connection
        timeout=60,
    )
    errors: list[str] = []
    answers = 0
    stop = threading.Event()

    def send() -> None:
        nonlocal answers
        turn = 0
        while not stop.is_set():
            turn += 1
            try:
                if turn % 2:
                    client.chat.completions.create(
                        model="llama-cpp-native",
                        messages=[{"role": "user", "content": "hi"}],
                        max_tokens=8,
                    )
                else:
                    for _ in client.chat.completions.create(
                        model="llama-cpp-native",
                        messages=[{"role": "user", "content": "hi"}],
                        max_tokens=8,
                        stream=True,
                    ):
                        pass
                answers += 1
            except openai.APIError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            # pauses of every length around the clients' 5 s keep-alive expiry
            time.sleep((0.05, 0.5, 2.0, 4.9, 5.2)[turn % 5])

    settings_file = gateway_stack.stack.config_dir / "diversityd.yaml"
    original = settings_file.read_text()
    settings = yaml.safe_load(original)
    sender = threading.Thread(target=send)
    sender.start()
    try:
        for switch in range(3):
            settings["gateway"]["litellm_settings"] = {"drop_params": switch % 2 == 0}
            settings_file.write_text(yaml.safe_dump(settings))
            assert gateway_stack.ctl("reload").returncode == 0
            gateway_stack.wait_for(
                lambda d, n=switch: (
                    d["gateway"]["reloads"] > before["reloads"] + n and d["gateway"]["in_sync"]
                ),
                timeout_s=120,
                poll_s=0.5,
            )
            time.sleep(8)  # the old process's idle grace, and then some
    finally:
        stop.set()
        sender.join(120)
        settings_file.write_text(original)
        gateway_stack.ctl("reload")
        wait_gateway_ready(gateway_stack)
    assert errors == [], errors
    assert answers >= 10


def test_a_planned_stop_cuts_no_stream(gateway_stack: RunningStack) -> None:
    """Issue 18's root cause: a planned stop stopped llama-cpp-python under the streams it
    was sending (its server closes them at SIGTERM): the drill's and the demo's `stream
    ended without content`. `diversityctl stop` now takes it out of the routes, waits for
    its answers in flight, then stops it: long streams through the real `openai` client
    all end whole."""
    import threading

    import openai

    wait_gateway_ready(gateway_stack)
    client = openai.OpenAI(
        base_url=f"{gateway_url(gateway_stack)}/v1",
        api_key=master_key(gateway_stack),
        max_retries=0,
        timeout=120,
    )
    outcomes: list[tuple[str, str | None, str | None]] = []  # (text, finish, error)
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            outcomes.append(
                read_whole_stream(
                    client, "llama-cpp-default", "Tell me a long story.", max_tokens=200
                )
            )

    senders = [threading.Thread(target=stream) for _ in range(2)]
    for sender in senders:
        sender.start()
    try:
        time.sleep(1.5)
        stopped = gateway_stack.ctl("stop", LLAMA_PYTHON, "--json", timeout=300)
        time.sleep(2)  # the fallback (llama-cpp-native) answers meanwhile
    finally:
        stop.set()
        for sender in senders:
            sender.join(120)
        gateway_stack.ctl("start", LLAMA_PYTHON, timeout=300)
        wait_gateway_ready(gateway_stack)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    drain = json.loads(stopped.stdout)["drain"]
    assert drain["routed_out"] is True
    assert drain["left"] == 0, drain  # every answer in flight finished before the stop
    broken = [o for o in outcomes if o[2] is not None or not o[0] or o[1] is None]
    assert broken == [], broken[:3]
    assert len(outcomes) >= 4
    assert gateway_stack.journal_events("provider.drained", provider=LLAMA_PYTHON)


def test_two_instances_both_take_the_routes_and_one_killed_leaves_the_other_serving(
    gateway_stack: RunningStack,
) -> None:
    """Issue 17: `gateway.instances: 2` keeps a second LiteLLM on the socket, current
    in-process like the first: a kill -9 of one leaves the other taking the requests,
    where one instance alone makes them wait for a new LiteLLM (seconds)."""
    manager = gateway_stack.manager
    settings_file = gateway_stack.stack.config_dir / "diversityd.yaml"
    original = settings_file.read_text()
    settings = yaml.safe_load(original)
    settings["gateway"]["instances"] = 2
    vllm_unit = f"diversityd-{VLLM}.service"

    def both_active(d: dict[str, Any]) -> bool:
        return sum(i["state"] == "active" for i in d["gateway"]["instances"]) == 2

    try:
        settings_file.write_text(yaml.safe_dump(settings))
        manager.systemctl("restart", "diversityd.service", timeout=120)
        gateway_stack.wait_for(
            lambda d: both_active(d) and d["gateway"]["in_sync"], timeout_s=240, poll_s=0.5
        )
        manager.systemctl("stop", vllm_unit)  # a routes change reaches both
        document = gateway_stack.wait_for(
            lambda d: (
                both_active(d)
                and "qwen-coder-vllm" in d["gateway"]["left_out"]
                and d["gateway"]["in_sync"]
                and len({i["routes_digest"] for i in d["gateway"]["instances"]}) == 1
            ),
            timeout_s=60,
            poll_s=0.2,
        )
        digests = {i["routes_digest"] for i in document["gateway"]["instances"]}
        assert None not in digests
        killed = document["gateway"]["pid"]
        with gateway_stream(gateway_stack, "llama-cpp-native") as stream:
            time.sleep(1)
            killed_at = time.monotonic()
            os.kill(killed, signal.SIGKILL)
            time.sleep(4)  # systemd's RestartSec and a new LiteLLM's start: longer than this
        after = [a for a in stream.answers if a.started > killed_at + 0.5]
        assert after, "nothing was answered while the killed instance restarted"
        assert all(a.ok for a in after), [a for a in after if not a.ok][:3]
        assert max(a.latency_ms for a in after) < 4000  # never waited for a new LiteLLM
        assert len([a for a in stream.answers if not a.ok]) <= 1  # the one it held, if any
    finally:
        settings_file.write_text(original)
        manager.systemctl("start", vllm_unit)
        manager.systemctl("restart", "diversityd.service", timeout=120)
        gateway_stack.wait_for(
            lambda d: (
                sum(i["state"] == "active" for i in d["gateway"]["instances"]) == 1
                and d["gateway"]["in_sync"]
                and "qwen-coder-vllm" not in d["gateway"]["left_out"]
            ),
            timeout_s=240,
            poll_s=0.5,
        )


def test_an_old_process_answers_a_reused_idle_connection_then_closes_it(
    gateway_stack: RunningStack,
) -> None:
    """Issue 18, the mechanism under a switch: a client's idle keep-alive connection to the
    old process is not closed under it when the process starts to stop (uvicorn closed
    idle connections at once; a request sent on one just then was lost). It stays open
    past the clients' keep-alive expiry, and a request on it is answered, with
    `Connection: close`."""
    import socket

    before = wait_gateway_ready(gateway_stack)["gateway"]
    port = gateway_stack.stack.spec.ports["gateway"]
    request = b"GET /health/liveliness HTTP/1.1\r\nHost: gateway\r\n\r\n"

    def answer(sock: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data  # closed by the server
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            body += sock.recv(65536)
        return head

    settings_file = gateway_stack.stack.config_dir / "diversityd.yaml"
    original = settings_file.read_text()
    settings = yaml.safe_load(original)
    settings["gateway"]["litellm_settings"] = {"drop_params": True}
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        assert b" 200 " in answer(sock)  # a keep-alive connection to the serving process
        try:
            settings_file.write_text(yaml.safe_dump(settings))
            assert gateway_stack.ctl("reload").returncode == 0
            deadline = time.monotonic() + 120
            while gateway_stack.unit_property(before["unit"], "ActiveState") == "active":
                assert time.monotonic() < deadline, "the old process was never stopped"
                time.sleep(0.05)
            time.sleep(1)  # it is stopping: a client reuses its idle connection now
            sock.sendall(request)
            head = answer(sock)
            assert b" 200 " in head, head
            assert b"connection: close" in head.lower(), head
            assert sock.recv(1) == b""  # then it closes it
        finally:
            settings_file.write_text(original)
            gateway_stack.ctl("reload")
            wait_gateway_ready(gateway_stack)
