"""diversityd as a real user service owning real llama servers in a private systemd manager."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from diversityd.units import DAEMON_UNIT, MARKER
from diversityd_lab.stack import RunningStack, ctl_env

pytestmark = pytest.mark.integration

NATIVE = "llama_cpp_native"
PYTHON = "llama_cpp_python"


def test_owned_units_start_and_status_shows_them(running_stack: RunningStack) -> None:
    document = running_stack.status()
    assert document["daemon"]["running"] is True
    by_name = {p["name"]: p for p in document["providers"]}
    assert set(by_name) == {NATIVE, PYTHON}
    for name, entry in by_name.items():
        assert entry["owned"] is True
        assert entry["unit"] == f"diversityd-{name}.service"
        assert entry["state"] == "ready"
        assert entry["pid"]
        assert entry["pid"] > 1
        assert entry["since"]
        assert entry["probe"]["ok"] is True
        unit_file = running_stack.manager.unit_dir / entry["unit"]
        assert unit_file.read_text().startswith(MARKER)
        assert running_stack.unit_property(entry["unit"], "MainPID") == str(entry["pid"])
    # llama-cpp-python has no `models:` (v1.7.1): its name comes from exact_matches
    assert by_name[PYTHON]["models"] == ["llama-cpp-default"]
    assert by_name[NATIVE]["models"] == ["llama-cpp-native"]
    # and the alias is what the server really reports
    assert by_name[PYTHON]["probe"]["models"] == ["llama-cpp-default"]
    table = running_stack.ctl("status").stdout
    for column in ("PROVIDER", "UNIT", "STATE", "PID", "UPTIME", "PROBE", "MODELS", "GPU LAYERS"):
        assert column in table
    assert "daemon: running" in table


def test_rendered_units_pass_systemd_analyze_verify(running_stack: RunningStack) -> None:
    units = [
        running_stack.manager.unit_dir / f"diversityd-{name}.service" for name in (NATIVE, PYTHON)
    ]
    result = running_stack.manager.verify_units(
        *units, running_stack.manager.unit_dir / DAEMON_UNIT
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kill_9_of_a_provider_is_seen_and_shown(running_stack: RunningStack) -> None:
    running_stack.wait_all_ready()
    before = running_stack.provider(NATIVE)
    os.kill(before["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    # systemd's Restart= brings it back after RestartSec=1; until then status says down.
    seen = running_stack.wait_for(
        lambda d: running_stack.provider(NATIVE, d)["state"] in ("down", "starting"),
        timeout_s=5,
        poll_s=0.02,
    )
    entry = running_stack.provider(NATIVE, seen)
    assert entry["pid"] != before["pid"]
    reacted_after = entry["last_state_change_monotonic"] - killed_at
    assert reacted_after < 1.0, reacted_after  # the daemon heard of it from systemd, not a probe
    back = running_stack.wait_for(lambda d: running_stack.provider(NATIVE, d)["state"] == "ready")
    after = running_stack.provider(NATIVE, back)
    assert after["pid"] not in (None, before["pid"])
    assert after["restarts"] == before["restarts"] + 1
    events = running_stack.journal_events("provider.state", provider=NATIVE, state="down")
    assert events, "the state change is in the journal with PROVIDER= and STATE= fields"
    assert events[-1]["UNIT"] == f"diversityd-{NATIVE}.service"


def test_restart_one_provider_reports_its_time(running_stack: RunningStack) -> None:
    running_stack.wait_all_ready()
    before = running_stack.provider(PYTHON)["pid"]
    result = running_stack.ctl("restart", PYTHON, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    (entry,) = report["providers"]
    assert entry["provider"] == PYTHON
    assert entry["ok"] is True
    assert entry["elapsed_ms"] > 0
    assert running_stack.provider(PYTHON)["pid"] != before


def test_restart_all_goes_one_at_a_time(running_stack: RunningStack) -> None:
    running_stack.wait_all_ready()
    result = running_stack.ctl("restart")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ready after" in result.stdout
    restarting = running_stack.journal_events("unit.restarting")
    restarted = running_stack.journal_events("unit.restarted")
    last_two = sorted(restarting, key=lambda e: int(e["__REALTIME_TIMESTAMP"]))[-2:]
    first_done = [e for e in restarted if e["PROVIDER"] == last_two[0]["PROVIDER"]][-1]
    # the second restart began only after the first provider answered again
    assert int(last_two[1]["__REALTIME_TIMESTAMP"]) >= int(first_done["__REALTIME_TIMESTAMP"])


def test_restart_of_an_unknown_provider_fails(running_stack: RunningStack) -> None:
    result = running_stack.ctl("restart", "nope")
    assert result.returncode != 0
    assert "unknown provider" in result.stderr


def test_killing_the_daemon_does_not_start_anything_twice(running_stack: RunningStack) -> None:
    document = running_stack.wait_all_ready()
    pids = {p["name"]: p["pid"] for p in document["providers"]}
    restarts = {p["name"]: p["restarts"] for p in document["providers"]}
    daemon_pid = running_stack.daemon_pid()
    starts_before = len(running_stack.journal_events("unit.starting"))
    os.kill(daemon_pid, signal.SIGKILL)
    again = running_stack.wait_for(
        lambda d: d["daemon"].get("running") is True and d["daemon"]["pid"] != daemon_pid,
        timeout_s=30,
    )
    assert all(p["state"] == "ready" for p in running_stack.wait_all_ready()["providers"])
    assert {p["name"]: p["pid"] for p in again["providers"]} == pids
    assert {p["name"]: p["restarts"] for p in running_stack.status()["providers"]} == restarts
    assert len(running_stack.journal_events("unit.starting")) == starts_before


def test_hand_edited_unit_is_put_back_and_drop_ins_are_left_alone(
    running_stack: RunningStack,
) -> None:
    unit = f"diversityd-{NATIVE}.service"
    path = running_stack.manager.unit_dir / unit
    rendered = path.read_text()
    drop_in_dir = running_stack.manager.unit_dir / f"{unit}.d"
    drop_in_dir.mkdir(exist_ok=True)
    drop_in = drop_in_dir / "override.conf"
    drop_in.write_text("[Service]\nEnvironment=USER_OVERRIDE=1\n")
    path.write_text(rendered.replace("--parallel 2", "--parallel 7"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and path.read_text() != rendered:
        time.sleep(0.05)
    assert path.read_text() == rendered
    assert drop_in.read_text() == "[Service]\nEnvironment=USER_OVERRIDE=1\n"
    assert running_stack.journal_events("unit.restored", unit=unit)
    # systemd sees the user's drop-in merged into our unit
    running_stack.manager.systemctl("daemon-reload")
    assert "USER_OVERRIDE=1" in running_stack.unit_property(unit, "Environment")
    drop_in.unlink()
    drop_in_dir.rmdir()
    running_stack.manager.systemctl("daemon-reload")


def test_bad_reload_changes_nothing(running_stack: RunningStack) -> None:
    document = running_stack.wait_all_ready()
    pids = {p["name"]: p["pid"] for p in document["providers"]}
    mappings = running_stack.stack.config_dir / "model-mappings.yaml"
    good = mappings.read_text()
    unit_files = {
        p.name: p.read_text() for p in running_stack.manager.unit_dir.glob("diversityd-*.service")
    }
    cyclic = yaml.safe_load(good)
    cyclic["fallback_chains"]["llama-cpp-native"] = {"chain": ["llama-cpp-default"]}
    try:
        mappings.write_text(yaml.safe_dump(cyclic))
        result = running_stack.ctl("reload")
        assert result.returncode == 2, result.stdout + result.stderr
        assert "llama-cpp-default -> llama-cpp-native -> llama-cpp-default" in result.stderr or (
            "llama-cpp-native -> llama-cpp-default -> llama-cpp-native" in result.stderr
        )
        assert "keeps the previous" in result.stderr
    finally:
        mappings.write_text(good)
    after = running_stack.status()
    assert after["daemon"]["pid"] == document["daemon"]["pid"]
    assert {p["name"]: p["pid"] for p in after["providers"]} == pids
    assert after["daemon"]["last_reload"]["ok"] is False
    assert {
        p.name: p.read_text() for p in running_stack.manager.unit_dir.glob("diversityd-*.service")
    } == unit_files
    assert running_stack.journal_events("config.rejected")


def test_status_without_the_daemon_says_what_systemd_says(running_stack: RunningStack) -> None:
    running_stack.wait_all_ready()
    running_stack.manager.systemctl("stop", DAEMON_UNIT)
    try:
        result = running_stack.ctl("status", "--config-dir", str(running_stack.stack.config_dir))
        assert result.returncode == 0, result.stderr
        assert "daemon: DOWN" in result.stdout
        document = running_stack.status()
        assert document["daemon"]["running"] is False
        states = {p["name"]: p["state"] for p in document["providers"]}
        assert states == {NATIVE: "ready", PYTHON: "ready"}  # the providers outlive the daemon
        assert all(p["pid"] for p in document["providers"])
    finally:
        running_stack.manager.systemctl("start", DAEMON_UNIT, timeout=60)


def test_systemctl_reload_adopts_a_good_change_and_restarts_what_changed(
    running_stack: RunningStack,
) -> None:
    document = running_stack.wait_all_ready()
    pids = {p["name"]: p["pid"] for p in document["providers"]}
    settings_file = running_stack.stack.config_dir / "diversityd.yaml"
    original = settings_file.read_text()
    settings = yaml.safe_load(original)
    settings["providers"][NATIVE]["ctx"] = 512
    unit_file = running_stack.manager.unit_dir / f"diversityd-{NATIVE}.service"
    try:
        settings_file.write_text(yaml.safe_dump(settings))
        # ExecReload= runs `diversityctl reload` inside the unit
        running_stack.manager.systemctl("reload", DAEMON_UNIT, timeout=60)
        assert "--ctx-size 1024" in unit_file.read_text()  # 512 per slot x 2 slots
        after = running_stack.wait_for(
            lambda d: (
                running_stack.provider(NATIVE, d)["pid"] != pids[NATIVE]
                and running_stack.provider(NATIVE, d)["state"] == "ready"
            )
        )
        assert running_stack.provider(PYTHON, after)["pid"] == pids[PYTHON]  # unchanged: kept
        pid = running_stack.provider(NATIVE, after)["pid"]
        assert "1024" in Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        assert after["daemon"]["last_reload"]["ok"] is True
        assert after["daemon"]["last_reload"]["changed"] == [NATIVE]
    finally:
        settings_file.write_text(original)
        running_stack.ctl("reload")
        running_stack.wait_for(
            lambda d: (
                "--ctx-size 512" in unit_file.read_text()
                and all(p["state"] == "ready" for p in d["providers"])
            )
        )


def test_a_change_of_environment_alone_restarts_that_server(running_stack: RunningStack) -> None:
    """Issue 19: the environment lives in a 0600 file the unit names, so the unit's text
    did not change: nothing restarted and reload said no restart was needed."""
    document = running_stack.wait_all_ready()
    pids = {p["name"]: p["pid"] for p in document["providers"]}
    settings_file = running_stack.stack.config_dir / "diversityd.yaml"
    original = settings_file.read_text()
    settings = yaml.safe_load(original)
    settings["providers"][PYTHON]["environment"]["DIVERSITYD_MARK"] = "issue-19"
    unit_file = running_stack.manager.unit_dir / f"diversityd-{PYTHON}.service"
    unit_text = unit_file.read_text()
    try:
        settings_file.write_text(yaml.safe_dump(settings))
        result = running_stack.ctl("reload", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        assert unit_file.read_text() == unit_text  # the same unit: only its environment moved
        after = running_stack.wait_for(
            lambda d: (
                running_stack.provider(PYTHON, d)["pid"] != pids[PYTHON]
                and running_stack.provider(PYTHON, d)["state"] == "ready"
            )
        )
        assert running_stack.provider(NATIVE, after)["pid"] == pids[NATIVE]  # unchanged: kept
        pid = running_stack.provider(PYTHON, after)["pid"]
        assert "DIVERSITYD_MARK=issue-19" in environ_of(pid)
        assert after["daemon"]["last_reload"]["changed"] == [PYTHON]
    finally:
        settings_file.write_text(original)
        running_stack.ctl("reload")
        running_stack.wait_for(
            lambda d: (
                all(p["state"] == "ready" for p in d["providers"])
                and not any(
                    v.startswith("DIVERSITYD_MARK=")
                    for v in environ_of(running_stack.provider(PYTHON, d)["pid"])
                )
            )
        )


def environ_of(pid: int | None) -> list[str]:
    try:
        return Path(f"/proc/{pid}/environ").read_text().split("\0") if pid else ["(none)"]
    except OSError:
        return ["DIVERSITYD_MARK=(gone)"]  # not settled yet


def test_the_daemon_pings_its_watchdog(running_stack: RunningStack) -> None:
    assert running_stack.unit_property(DAEMON_UNIT, "WatchdogUSec") == "10s"
    first = int(running_stack.unit_property(DAEMON_UNIT, "WatchdogTimestampMonotonic"))
    time.sleep(4.0)  # pings come every third of WatchdogSec
    second = int(running_stack.unit_property(DAEMON_UNIT, "WatchdogTimestampMonotonic"))
    assert second > first > 0
    status = running_stack.unit_property(DAEMON_UNIT, "StatusText")
    assert "providers ready" in status  # STATUS= says how many answer


def test_a_second_daemon_touches_nothing(running_stack: RunningStack, tmp_path: Path) -> None:
    """Issue 20, point 4: a second `diversityd` on the same bus stopped and deleted the
    first one's units (its configuration owned none of them) and overwrote its state file
    before it found the bus name taken."""
    manager = running_stack.manager
    document = running_stack.wait_all_ready()
    pids = {p["name"]: p["pid"] for p in document["providers"]}
    daemon_pid = running_stack.daemon_pid()
    units = {p.name: p.read_bytes() for p in sorted(manager.unit_dir.glob("diversityd*"))}
    state_dir = Path(manager.env["XDG_STATE_HOME"]) / "diversityd"
    state_before = (state_dir / "daemon-state.json").read_bytes()
    other = tmp_path / "other-config"
    shutil.copytree(running_stack.stack.config_dir, other)
    settings = yaml.safe_load((other / "diversityd.yaml").read_text())
    settings["providers"] = {}  # owns nothing: it would retire every unit it finds
    settings["http"] = {"port": 0}
    (other / "diversityd.yaml").write_text(yaml.safe_dump(settings))
    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "diversityd.daemon", "--config-dir", str(other)],
        env=ctl_env(manager),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 2, second.stdout + second.stderr
    assert "another diversityd" in second.stdout + second.stderr
    assert f"pid {daemon_pid}" in second.stdout + second.stderr
    assert time.monotonic() - started < 15
    assert {p.name: p.read_bytes() for p in sorted(manager.unit_dir.glob("diversityd*"))} == units
    assert (state_dir / "daemon-state.json").read_bytes() == state_before
    after = running_stack.wait_all_ready()
    assert {p["name"]: p["pid"] for p in after["providers"]} == pids
    assert running_stack.daemon_pid() == daemon_pid
