"""Decisions that survive (issue 10): the daemon killed at each named step, a bad model
link across a restart, a unit systemd gave up on, the user's stop, a frozen provider, a
provider removed while the daemon was down, the bus lost. Real servers, a real manager."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from diversityd.units import DAEMON_UNIT, unit_name
from diversityd_lab.embedded import (
    LLAMA_NATIVE,
    LLAMA_PYTHON,
    StackSpec,
    point_link,
    write_truncated_model,
)
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import RunningStack, ctl_env, free_port, mapped_models, start_stack
from diversityd_lab.traffic import RequestStream

pytestmark = pytest.mark.integration

NATIVE_UNIT = unit_name(LLAMA_NATIVE)
PYTHON_UNIT = unit_name(LLAMA_PYTHON)
SUPERVISION = {
    "start_grace_s": 20,
    "ready_wait_s": 90,
    "revive_initial_s": 2,
    "revive_max_s": 8,
    "hung_grace_s": 2,
}


@pytest.fixture(scope="module")
def recovery_stack(
    shared_private_manager: PrivateManager,
    tmp_path_factory: pytest.TempPathFactory,
    llama_server_bin: Path,
    llama_cpp_python_interpreter: Path,
) -> Iterator[RunningStack]:
    """The two llama servers; llama-server behind a wrapper that fails while a flag file
    exists (a cause the test can take away), or exits 0 once; the daemon reads a fault
    file."""
    root = tmp_path_factory.mktemp("recovery")
    wrapper = root / "llama-server-wrapper"
    wrapper.write_text(
        "#!/bin/sh\n"
        # it dies after its start job is done: as a server dies loading a broken model
        f'if [ -e "{root}/broken" ]; then sleep 0.5; echo "broken on purpose" >&2; exit 3; fi\n'
        # a server that ends cleanly by itself (exit 0: no failure to systemd)
        f'if [ -e "{root}/exit0" ]; then rm -f "{root}/exit0"; sleep 0.5; exit 0; fi\n'
        f'exec "{llama_server_bin}" "$@"\n'
    )
    wrapper.chmod(0o755)
    manager = shared_private_manager
    drop_in = manager.unit_dir / f"{DAEMON_UNIT}.d" / "fault.conf"
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text(f'[Service]\nEnvironment="DIVERSITYD_FAULT_FILE={root}/fault"\n')
    spec = StackSpec(
        ports={LLAMA_NATIVE: free_port(), LLAMA_PYTHON: free_port()},
        unit_dir=manager.unit_dir,
        llama_server=wrapper,
        extra_settings={"supervision": SUPERVISION},
    )
    running = start_stack(manager, root / "stack", spec)
    try:
        running.wait_all_ready(timeout_s=90)
        yield running
    finally:
        manager.systemctl("stop", DAEMON_UNIT, check=False)
        drop_in.unlink(missing_ok=True)


def pids_of(running: RunningStack, document: dict[str, Any] | None = None) -> dict[str, int]:
    document = document or running.status()
    return {p["name"]: p["pid"] for p in document["providers"]}


def kill_daemon(running: RunningStack) -> int:
    pid = running.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_daemon_back(running: RunningStack, old_pid: int) -> dict[str, Any]:
    return running.wait_for(
        lambda d: d["daemon"].get("running") is True and d["daemon"]["pid"] != old_pid,
        timeout_s=60,
    )


def settled(running: RunningStack, target: str) -> dict[str, Any]:
    """Every provider ready and serving `target` (a GGUF file name)."""
    return running.wait_for(
        lambda d: (
            d["daemon"].get("running") is True
            and all(p["state"] == "ready" for p in d["providers"])
            and all(mapped_models(p["pid"]) == {target} for p in d["providers"])
        ),
        timeout_s=120,
    )


def other_model(running: RunningStack) -> str:
    current = os.readlink(running.stack.active_link)
    return "tiny-b.gguf" if current.endswith("tiny-a.gguf") else "tiny-a.gguf"


def fault_file(running: RunningStack) -> Path:
    """Where the daemon of `recovery_stack` reads the step to die at."""
    return running.stack.root.parent / "fault"


def test_a_bad_link_is_never_rolled_out_by_a_restarted_daemon_or_a_reload(
    recovery_stack: RunningStack,
) -> None:
    """Issue 10, scenario 1: the new daemon used to write the link's path into the units
    and restart healthy servers onto the bad file."""
    running = recovery_stack
    serving = os.readlink(running.stack.active_link)
    document = settled(running, Path(serving).name)
    pids = pids_of(running, document)
    bad = write_truncated_model(running.stack.models_dir)
    try:
        point_link(running.stack.active_link, f"../{bad.name}")
        running.wait_for(
            lambda d: all((p["model_file"] or {}).get("error") for p in d["providers"]), 15
        )
        wait_daemon_back(running, kill_daemon(running))
        time.sleep(3)  # every chance for a wrong restart
        reloaded = running.ctl("reload")
        assert reloaded.returncode == 0, reloaded.stderr
        time.sleep(3)
        after = running.wait_all_ready()
        assert pids_of(running, after) == pids
        for name in (LLAMA_NATIVE, LLAMA_PYTHON):
            entry = running.provider(name, after)
            assert mapped_models(entry["pid"]) == {Path(serving).name}
            assert entry["model_file"]["target"].endswith(Path(serving).name)
            assert entry["model_file"]["error"]
        unit_text = (running.manager.unit_dir / NATIVE_UNIT).read_text()
        assert bad.name not in unit_text
        assert Path(serving).name in unit_text
    finally:
        point_link(running.stack.active_link, serving)
    back = running.wait_for(
        lambda d: not any((p["model_file"] or {}).get("error") for p in d["providers"]), 15
    )
    assert pids_of(running, back) == pids  # the same file again: nothing rolls


@pytest.mark.parametrize(
    "step",
    [
        "rollout.intent_saved",
        "rollout.files_written",
        "rollout.manager_reloaded",
        "rollout.provider_restarted",
    ],
)
def test_a_daemon_killed_at_a_rollout_step_finishes_the_rollout(
    recovery_stack: RunningStack, step: str
) -> None:
    """kill -9 of the daemon in the middle of a re-point's rollout: when systemd has
    restarted it, both servers run the new file, and no request went unanswered."""
    running = recovery_stack
    document = settled(running, Path(os.readlink(running.stack.active_link)).name)
    target = other_model(running)
    daemon = document["daemon"]["pid"]
    fault_file(running).write_text(step)
    with RequestStream(running.stack.llama_endpoints()) as stream:
        point_link(running.stack.active_link, f"../{target}")
        wait_daemon_back(running, daemon)
        settled(running, target)
    assert not fault_file(running).exists(), "the daemon never reached the step"
    assert running.journal_events("daemon.fault_injected", state=step)
    assert stream.unanswered == []
    assert stream.answered > 0


def test_a_failed_unit_ends_its_job_at_once_and_is_revived_once_its_cause_is_gone(
    recovery_stack: RunningStack,
) -> None:
    """Issue 10, scenarios 2 and 3: a restart job waited its whole timeout on a unit
    systemd had failed, and the user's restart of another provider queued behind it; the
    failed unit stayed failed until restarted by hand."""
    running = recovery_stack
    settled(running, Path(os.readlink(running.stack.active_link)).name)
    broken = running.stack.root.parent / "broken"
    broken.touch()
    try:
        doomed = subprocess.Popen(
            [sys.executable, "-m", "diversityd.cli", "restart", LLAMA_NATIVE],
            env=ctl_env(running.manager),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)
        started = time.monotonic()
        other = running.ctl("restart", LLAMA_PYTHON, timeout=60)
        assert other.returncode == 0, other.stdout + other.stderr
        assert time.monotonic() - started < 45  # not queued behind the doomed job
        out, err = doomed.communicate(timeout=60)  # ends once systemd gave up, not in 300 s
        assert doomed.returncode == 1, out + err
        assert "NOT BACK (failed)" in out
        failed = running.wait_for(
            lambda d: (
                running.provider(LLAMA_NATIVE, d)["state"] == "failed"
                and running.provider(LLAMA_NATIVE, d)["revival"] is not None
            ),
            timeout_s=30,
        )
        revival = running.provider(LLAMA_NATIVE, failed)["revival"]
        assert "unit failed" in revival["last_failure"]
        assert "reviving" in running.ctl("status").stdout
    finally:
        broken.unlink(missing_ok=True)
    # The cause is gone: nobody helps, it serves again within its backoff (at most 8 s).
    back = running.wait_for(
        lambda d: running.provider(LLAMA_NATIVE, d)["state"] == "ready", timeout_s=60
    )
    assert running.provider(LLAMA_NATIVE, back)["revival"] is None
    assert running.journal_events("unit.reviving", provider=LLAMA_NATIVE)


def test_what_the_user_stopped_stays_stopped_until_started(recovery_stack: RunningStack) -> None:
    running = recovery_stack
    settled(running, Path(os.readlink(running.stack.active_link)).name)
    stopped = running.ctl("stop", LLAMA_PYTHON)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    try:
        wait_daemon_back(running, kill_daemon(running))
        time.sleep(4)  # a restarted daemon would start it here
        entry = running.provider(LLAMA_PYTHON)
        assert entry["state"] == "stopped"
        assert entry["stopped_by_user"] is True
        assert running.unit_property(PYTHON_UNIT, "ActiveState") == "inactive"
    finally:
        started = running.ctl("start", LLAMA_PYTHON)
    assert started.returncode == 0, started.stdout + started.stderr
    assert running.provider(LLAMA_PYTHON)["stopped_by_user"] is False

    # `systemctl --user stop` of an owned unit is the user's word too
    running.manager.systemctl("stop", NATIVE_UNIT)
    try:
        running.wait_for(lambda d: running.provider(LLAMA_NATIVE, d)["stopped_by_user"], 15)
        running.manager.systemctl("restart", DAEMON_UNIT, timeout=60)
        time.sleep(4)
        assert running.unit_property(NATIVE_UNIT, "ActiveState") == "inactive"
    finally:
        running.manager.systemctl("start", NATIVE_UNIT)
    back = running.wait_for(
        lambda d: (
            running.provider(LLAMA_NATIVE, d)["state"] == "ready"
            and not running.provider(LLAMA_NATIVE, d)["stopped_by_user"]
        ),
        timeout_s=30,
    )
    assert back["daemon"]["running"]


def test_a_server_that_ends_by_itself_serves_again_within_its_backoff(
    recovery_stack: RunningStack,
) -> None:
    """Issue 20, point 1: a `kill -TERM` from outside (earlyoom, a script) and a server that
    exits 0 are `success` to systemd, which Restart=on-failure leaves stopped; the daemon
    took them for the user's stop and never revived them. No stop job ran: revived."""
    running = recovery_stack
    backoff_s = SUPERVISION["revive_initial_s"]
    document = settled(running, Path(os.readlink(running.stack.active_link)).name)
    pids = pids_of(running, document)
    os.kill(pids[LLAMA_PYTHON], signal.SIGTERM)
    ended = time.monotonic()
    running.wait_for(lambda d: running.provider(LLAMA_PYTHON, d)["state"] == "stopped", 15)
    back = running.wait_for(
        lambda d: (
            running.provider(LLAMA_PYTHON, d)["state"] == "ready"
            and running.provider(LLAMA_PYTHON, d)["pid"] != pids[LLAMA_PYTHON]
        ),
        timeout_s=60,
    )
    entry = running.provider(LLAMA_PYTHON, back)
    assert entry["stopped_by_user"] is False
    assert entry["revival"] is None  # served again: the backoff starts afresh next time
    # the backoff, the settling instant, a tick, then its start (seconds of loading)
    assert time.monotonic() - ended < backoff_s + 30
    assert running.journal_events("unit.reviving", provider=LLAMA_PYTHON)

    # llama-server's wrapper exits 0 once, the next time it starts (after a kill -9,
    # systemd's own Restart= starts it)
    exit_once = running.stack.root.parent / "exit0"
    exit_once.touch()
    try:
        os.kill(pids[LLAMA_NATIVE], signal.SIGKILL)
        running.wait_for(lambda _d: not exit_once.exists(), 15)
        back = running.wait_for(
            lambda d: (
                running.provider(LLAMA_NATIVE, d)["state"] == "ready"
                and running.provider(LLAMA_NATIVE, d)["pid"] != pids[LLAMA_NATIVE]
            ),
            timeout_s=60,
        )
    finally:
        exit_once.unlink(missing_ok=True)
    assert running.provider(LLAMA_NATIVE, back)["stopped_by_user"] is False
    assert any(
        "ended with no stop job" in (e.get("ERROR") or "")
        for e in running.journal_events("unit.revival_scheduled", provider=LLAMA_NATIVE)
    )


def test_a_frozen_provider_is_thawed_by_a_new_daemon(recovery_stack: RunningStack) -> None:
    """Issue 10, scenario 5: a hang drill cut short by the daemon's death left the server
    SIGSTOPped for ever, and the new daemon called it `starting`."""
    running = recovery_stack
    document = settled(running, Path(os.readlink(running.stack.active_link)).name)
    pid = running.provider(LLAMA_NATIVE, document)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_daemon_back(running, kill_daemon(running))
        back = running.wait_for(
            lambda d: running.provider(LLAMA_NATIVE, d)["state"] == "ready", timeout_s=30
        )
    finally:
        os.kill(pid, signal.SIGCONT)  # whatever happened, never leave it frozen
    assert running.provider(LLAMA_NATIVE, back)["pid"] == pid
    assert psutil.Process(pid).status() != psutil.STATUS_STOPPED
    assert running.journal_events("unit.thawed", provider=LLAMA_NATIVE)


def test_a_provider_removed_while_the_daemon_was_down_is_stopped(
    recovery_stack: RunningStack,
) -> None:
    """Issue 10, scenario 7: its unit file was deleted, its process kept its port for ever."""
    running = recovery_stack
    settled(running, Path(os.readlink(running.stack.active_link)).name)
    config_dir = running.stack.config_dir
    originals = {name: (config_dir / name).read_text() for name in os.listdir(config_dir)}
    port = running.stack.spec.ports[LLAMA_PYTHON]
    running.manager.systemctl("stop", DAEMON_UNIT)
    try:
        settings = yaml.safe_load(originals["diversityd.yaml"])
        del settings["providers"][LLAMA_PYTHON]
        providers = yaml.safe_load(originals["providers.yaml"])
        del providers["providers"][LLAMA_PYTHON]
        mappings = yaml.safe_load(originals["model-mappings.yaml"])
        mappings.pop("exact_matches", None)
        mappings["fallback_chains"].pop("llama-cpp-default", None)
        for name, document in (
            ("diversityd.yaml", settings),
            ("providers.yaml", providers),
            ("model-mappings.yaml", mappings),
        ):
            (config_dir / name).write_text(yaml.safe_dump(document))
        running.manager.systemctl("start", DAEMON_UNIT, timeout=60)
        running.wait_for(lambda d: [p["name"] for p in d["providers"]] == [LLAMA_NATIVE], 30)
        running.wait_for(lambda _: not (running.manager.unit_dir / PYTHON_UNIT).exists(), 15)
        assert running.unit_property(PYTHON_UNIT, "ActiveState") in ("inactive", "")
        listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert not any(c.laddr.port == port for c in listening)
    finally:
        running.manager.systemctl("stop", DAEMON_UNIT)
        for name, text in originals.items():
            (config_dir / name).write_text(text)
        running.manager.systemctl("start", DAEMON_UNIT, timeout=60)
    running.wait_all_ready(timeout_s=90)


def test_the_daemon_comes_back_after_the_bus_is_lost_and_restarts_nothing(
    private_manager: PrivateManager,
    tmp_path: Path,
    llama_server_bin: Path,
    llama_cpp_python_interpreter: Path,
) -> None:
    """The user bus dies: the daemon, blind without it, exits; systemd restarts it once
    the bus is back (socket-activated), and it adopts what runs, restarting nothing.
    (The bus is restarted through systemd: after a SIGKILL of dbus-daemon, systemd 252
    itself stalls 90 s reconnecting to the bus it must activate, whatever diversityd
    does.)"""
    running = start_stack(private_manager, tmp_path / "stack")
    try:
        document = running.wait_all_ready(timeout_s=90)
        pids = pids_of(running, document)
        daemon = document["daemon"]["pid"]
        private_manager.systemctl("restart", "dbus.service")
        wait_daemon_back(running, daemon)
        after = running.wait_all_ready(timeout_s=60)
        assert pids_of(running, after) == pids
        assert running.journal_events("daemon.bus_lost")
    finally:
        private_manager.systemctl("stop", DAEMON_UNIT, check=False)


def test_a_hung_server_is_killed_after_its_grace_and_comes_back(
    recovery_stack: RunningStack,
) -> None:
    """Issue 11, scenario 1: requests in flight waited the gateway's whole timeout."""
    running = recovery_stack
    document = settled(running, Path(os.readlink(running.stack.active_link)).name)
    pid = running.provider(LLAMA_NATIVE, document)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        back = running.wait_for(
            lambda d: (
                running.provider(LLAMA_NATIVE, d)["pid"] not in (None, pid)
                and running.provider(LLAMA_NATIVE, d)["state"] == "ready"
            ),
            timeout_s=30,
        )
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGCONT)
    assert running.journal_events("provider.hung_killed", provider=LLAMA_NATIVE)
    assert running.provider(LLAMA_PYTHON, back)["pid"] == document["providers"][1]["pid"]


def test_a_long_generation_is_busy_not_hung(recovery_stack: RunningStack) -> None:
    """llama-cpp-python answers /v1/models only between generations: a server making
    progress is `busy`, keeps serving, and is never killed."""
    running = recovery_stack
    settled(running, Path(os.readlink(running.stack.active_link)).name)
    settings_file = running.stack.config_dir / "diversityd.yaml"
    original = settings_file.read_text()
    settings = yaml.safe_load(original)
    settings["providers"][LLAMA_PYTHON]["ctx"] = 2048
    try:
        settings_file.write_text(yaml.safe_dump(settings))
        assert running.ctl("reload").returncode == 0
        document = running.wait_for(
            lambda d: (
                "--n_ctx 2048" in (running.manager.unit_dir / PYTHON_UNIT).read_text()
                and running.provider(LLAMA_PYTHON, d)["state"] == "ready"
            ),
            timeout_s=60,
        )
        pid = running.provider(LLAMA_PYTHON, document)["pid"]
        base_url = running.stack.base_url(LLAMA_PYTHON)
        answers: list[dict[str, object]] = []
        generation = threading.Thread(
            target=lambda: answers.append(long_chat(base_url, "llama-cpp-default", 1500))
        )
        started = time.monotonic()
        generation.start()
        states: set[str] = set()
        while generation.is_alive():
            states.add(running.provider(LLAMA_PYTHON)["state"])
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        assert answers, "the generation did not finish"
        usage = answers[0]["usage"]
        assert isinstance(usage, dict)
        assert usage["completion_tokens"] == 1500
        assert elapsed > 3 * running.stack.spec.probe_timeout_s, elapsed  # probes timed out
        assert "busy" in states, states
        assert "hung" not in states, states
        assert running.provider(LLAMA_PYTHON)["pid"] == pid  # never killed
    finally:
        settings_file.write_text(original)
        running.ctl("reload")
        running.wait_all_ready(timeout_s=60)


def long_chat(base_url: str, model: str, tokens: int) -> dict[str, object]:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens,
            "temperature": 0,
        }
    ).encode()
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return dict(json.load(response))


def test_the_accepted_model_overwritten_in_place_holds_the_servers_until_whole(
    recovery_stack: RunningStack,
) -> None:
    """Issue 11, scenario 5: `cp new.gguf <the accepted file>` SIGBUSed both servers and
    systemd restarted them onto the half-written file, into their start limit."""
    running = recovery_stack
    serving = Path(os.readlink(running.stack.active_link)).name
    document = settled(running, serving)
    pids = pids_of(running, document)
    accepted = running.stack.models_dir / serving
    other = "tiny-a.gguf" if serving == "tiny-b.gguf" else "tiny-b.gguf"
    new_bytes = (running.stack.models_dir / other).read_bytes()
    failed_seen = False
    with accepted.open("r+b") as handle:  # what `cp` does: truncate, then write in chunks
        handle.truncate(0)
        for offset in range(0, len(new_bytes), 64 * 1024):
            handle.write(new_bytes[offset : offset + 64 * 1024])
            handle.flush()
            time.sleep(0.05)
            if offset % (640 * 1024) == 0:
                states = {p["state"] for p in running.status()["providers"]}
                failed_seen = failed_seen or "failed" in states
    assert running.journal_events("unit.held")
    back = running.wait_for(
        lambda d: all(p["state"] == "ready" for p in d["providers"]), timeout_s=60
    )
    assert not failed_seen  # never restarted onto the half-written file
    for entry in back["providers"]:
        assert entry["pid"] != pids[entry["name"]]  # started again on the whole file
        assert entry["error"] is None
    assert running.journal_events("unit.released")
    for name in (NATIVE_UNIT, PYTHON_UNIT):
        assert running.unit_property(name, "NRestarts") == "0"  # no crash loop
