"""The private systemd --user manager the other integration tests and the demo stand on."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus

from diversityd_lab.privatemanager import (
    PrivateManager,
    PrivateManagerError,
    all_hierarchies,
    host_has_user_manager,
    is_alive,
    list_cgroup_pids,
    sweep_stale,
    tracking_hierarchies,
    wait_gone,
)
from tests.conftest import unavailable

pytestmark = pytest.mark.integration

PYTHON = "/usr/bin/python3"

# Sends one native-protocol entry with a custom field, prints a line, then stays up: journald
# reads _SYSTEMD_CGROUP (hence _SYSTEMD_UNIT) from /proc of the sender, so it must not exit.
STRUCTURED_LOGGER = """\
import socket, sys, time
token = sys.argv[1]
entry = f"MESSAGE=structured {token}\\nPROVIDER=ollama\\nTEST_TOKEN={token}\\nPRIORITY=6\\n"
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
    sock.sendto(entry.encode(), "/run/systemd/journal/socket")
print(f"stdout {token}", flush=True)
time.sleep(300)
"""


def write_unit(manager: PrivateManager, name: str, service: str, *, reload: bool = True) -> Path:
    path = manager.unit_dir / name
    path.write_text(f"[Unit]\nDescription=test unit {name}\n\n[Service]\n{service}")
    if reload:
        manager.systemctl("daemon-reload")
    return path


def unit_property(manager: PrivateManager, unit: str | None, name: str) -> str:
    """A property of `unit`, or of the manager itself when `unit` is None."""
    where = [unit] if unit else []
    return manager.systemctl("show", f"--property={name}", "--value", *where).stdout.strip()


def cgroup_of(pid: int) -> str:
    """The process's path in the hierarchy journald and systemd track (v2 or name=systemd)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    by_controller = {line.split(":", 2)[1]: line.split(":", 2)[2] for line in lines}
    return by_controller.get("name=systemd") or by_controller[""]


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        time.sleep(0.02)


def test_manager_starts_and_answers(private_manager: PrivateManager) -> None:
    manager = private_manager
    state = manager.systemctl("is-system-running", check=False).stdout.strip()
    assert state == "running", manager.systemctl("list-jobs", check=False).stdout
    assert unit_property(manager, None, "DefaultTimeoutStopUSec") == "5s"
    unit_path = unit_property(manager, None, "UnitPath")
    assert str(manager.unit_dir) in unit_path.split()
    assert "/etc/systemd/user" not in unit_path
    assert cgroup_of(manager.manager_pid) == f"{manager.cgroup_path}/init.scope"
    runtime = Path(manager.env["XDG_RUNTIME_DIR"])
    assert runtime.stat().st_mode & 0o777 == 0o700
    assert manager.bus_address == f"unix:path={runtime / 'bus'}"
    assert (runtime / "systemd" / "private").is_socket()


def test_unit_starts_and_stops(private_manager: PrivateManager) -> None:
    manager = private_manager
    write_unit(manager, "sleeper.service", "Type=exec\nExecStart=/bin/sleep infinity\n")
    manager.systemctl("start", "sleeper.service")
    assert manager.systemctl("is-active", "sleeper.service").stdout.strip() == "active"
    pid = int(unit_property(manager, "sleeper.service", "MainPID"))
    assert cgroup_of(pid) == f"{manager.cgroup_path}/app.slice/sleeper.service"

    manager.systemctl("stop", "sleeper.service")
    inactive = manager.systemctl("is-active", "sleeper.service", check=False)
    assert inactive.stdout.strip() == "inactive"
    assert wait_gone(pid, 2.0)


def test_verify_units_passes_a_good_unit_and_fails_misspelt_keys(
    shared_private_manager: PrivateManager,
) -> None:
    manager = shared_private_manager
    good = write_unit(
        manager, "verify-good.service", "Type=exec\nExecStart=/bin/sleep 1\n", reload=False
    )
    result = manager.verify_units(good)
    assert result.returncode == 0, result.stderr

    # systemd 252 itself only warns here (rc 0); strict mode (the default) makes it rc 1.
    misspelt = write_unit(
        manager, "verify-restrat.service", "ExecStart=/bin/sleep 1\nRestrat=always\n", reload=False
    )
    result = manager.verify_units(misspelt)
    assert result.returncode == 1
    assert "Unknown key 'Restrat'" in result.stderr
    assert manager.verify_units(misspelt, strict=False).returncode == 0

    # A misspelt ExecStart= leaves the service without a command: systemd's own rc 1.
    no_exec = write_unit(
        manager, "verify-execstrat.service", "ExecStrat=/bin/sleep 1\n", reload=False
    )
    result = manager.verify_units(no_exec, strict=False)
    assert result.returncode == 1
    assert "Unknown key 'ExecStrat'" in result.stderr


def test_unit_stdout_is_in_its_journal(shared_private_manager: PrivateManager) -> None:
    manager = shared_private_manager
    token = secrets.token_hex(4)
    script = manager.root / "logger.py"
    script.write_text(STRUCTURED_LOGGER)
    unit = f"stdout-{token}.service"
    write_unit(manager, unit, f"Type=exec\nExecStart={PYTHON} {script} {token}\n")
    manager.systemctl("start", unit)
    try:
        entries = manager.journal(f"MESSAGE=stdout {token}", unit=unit, wait_s=5)
        assert [entry["MESSAGE"] for entry in entries] == [f"stdout {token}"]
        assert entries[0]["_SYSTEMD_UNIT"] == unit
        assert entries[0]["_TRANSPORT"] == "stdout"
        about_unit = [entry["MESSAGE"] for entry in manager.journal(unit=unit)]
        assert f"Started {unit} - test unit {unit}." in about_unit
    finally:
        manager.systemctl("stop", unit)


def test_structured_entry_is_found_by_its_field(shared_private_manager: PrivateManager) -> None:
    manager = shared_private_manager
    token = secrets.token_hex(4)
    script = manager.root / "logger.py"
    script.write_text(STRUCTURED_LOGGER)
    unit = f"structured-{token}.service"
    write_unit(manager, unit, f"Type=exec\nExecStart={PYTHON} {script} {token}\n")
    cursor_before = manager.journal()[-1]["__CURSOR"]
    manager.systemctl("start", unit)
    try:
        entries = manager.journal("PROVIDER=ollama", f"TEST_TOKEN={token}", wait_s=5)
        assert len(entries) == 1
        entry = entries[0]
        assert entry["MESSAGE"] == f"structured {token}"
        assert entry["_SYSTEMD_UNIT"] == unit
        assert entry["_TRANSPORT"] == "journal"
        assert entry["_SYSTEMD_CGROUP"] == f"{manager.cgroup_path}/app.slice/{unit}"
        since = manager.journal("PROVIDER=ollama", since_cursor=cursor_before)
        assert [found["TEST_TOKEN"] for found in since] == [token]
        assert manager.journal("PROVIDER=ollama", since_cursor=entry["__CURSOR"]) == []
    finally:
        manager.systemctl("stop", unit)


async def query_systemd_bus(address: str) -> tuple[str, list[str], str]:
    bus = await MessageBus(bus_address=address).connect()
    try:
        path = "/org/freedesktop/systemd1"
        introspection = await bus.introspect("org.freedesktop.systemd1", path)
        proxy = bus.get_proxy_object("org.freedesktop.systemd1", path, introspection)
        systemd = proxy.get_interface("org.freedesktop.systemd1.Manager")
        dbus_unit = await systemd.call_get_unit("dbus.service")
        units = await systemd.call_list_units()
        version = await systemd.get_version()
    finally:
        bus.disconnect()
        await bus.wait_for_disconnect()
    return dbus_unit, [unit[0] for unit in units], version


def test_bus_answers_for_systemd1(shared_private_manager: PrivateManager) -> None:
    dbus_unit, units, version = asyncio.run(query_systemd_bus(shared_private_manager.bus_address))
    assert dbus_unit == "/org/freedesktop/systemd1/unit/dbus_2eservice"
    assert {"dbus.service", "dbus.socket", "default.target"} <= set(units)
    assert version.split()[0].split(".")[0].isdigit()


def test_host_user_manager_is_told_by_its_private_socket(
    shared_private_manager: PrivateManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", shared_private_manager.env["XDG_RUNTIME_DIR"])
    assert host_has_user_manager()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert not host_has_user_manager()


def test_manager_without_journald(private_manager_host: str | None) -> None:
    if private_manager_host is not None:
        unavailable(private_manager_host)
    with PrivateManager.temporary(journald=False) as manager:
        assert manager.systemctl("is-system-running").stdout.strip() == "running"
        with pytest.raises(PrivateManagerError, match="without journald"):
            manager.journal()
    assert not manager.root.exists()


def test_a_long_root_gets_a_short_runtime_dir(
    private_manager_host: str | None, tmp_path: Path
) -> None:
    if private_manager_host is not None:
        unavailable(private_manager_host)
    root = tmp_path / ("long-" * 16)
    with PrivateManager(root) as manager:
        runtime = Path(manager.env["XDG_RUNTIME_DIR"])
        assert len(str(runtime / "systemd" / "private")) < 108  # sun_path
        assert (root / "xdg").resolve() == runtime
        assert manager.systemctl("is-system-running").stdout.strip() == "running"
    assert not runtime.exists()
    assert (root / "config").is_dir()  # the caller's root stays


def test_stop_leaves_no_process_and_no_cgroup(private_manager: PrivateManager) -> None:
    manager = private_manager
    # KillMode=process leaves the backgrounded sleep behind: stop() must SIGKILL it.
    write_unit(
        manager,
        "straggler.service",
        "Type=exec\nKillMode=process\n"
        "ExecStart=/bin/sh -c \"(trap '' TERM; exec sleep 300) & exec sleep 301\"\n",
    )
    manager.systemctl("start", "straggler.service")
    tops = [hierarchy / manager.cgroup_name for hierarchy in tracking_hierarchies()]
    wait_for(lambda: len(list_cgroup_pids(tops[0] / "manager.slice/app.slice")) == 2)
    pids = set().union(*(list_cgroup_pids(top) for top in tops))
    assert manager.manager_pid in pids

    started = time.monotonic()
    manager.stop()
    elapsed = time.monotonic() - started
    assert [pid for pid in pids if is_alive(pid)] == []
    assert [path for path in all_hierarchies() if (path / manager.cgroup_name).exists()] == []
    assert elapsed < 3, f"stop() took {elapsed:.2f} s"
    manager.stop()  # idempotent


def test_two_managers_at_once_do_not_disturb_each_other(
    private_manager: PrivateManager, tmp_path: Path
) -> None:
    first = private_manager
    with PrivateManager(tmp_path / "second") as second:
        assert second.env["XDG_RUNTIME_DIR"] != first.env["XDG_RUNTIME_DIR"]
        assert second.cgroup_name != first.cgroup_name
        pids = {}
        for manager in (first, second):
            write_unit(manager, "twin.service", "Type=exec\nExecStart=/bin/sleep infinity\n")
            manager.systemctl("start", "twin.service")
            pids[manager.cgroup_name] = int(unit_property(manager, "twin.service", "MainPID"))
            assert cgroup_of(pids[manager.cgroup_name]).startswith(manager.cgroup_path)
        assert len(set(pids.values())) == 2

        second.systemctl("stop", "twin.service")
        assert first.systemctl("is-active", "twin.service").stdout.strip() == "active"
    assert first.systemctl("is-system-running").stdout.strip() == "running"
    assert first.systemctl("is-active", "twin.service", "dbus.service").stdout.split() == [
        "active",
        "active",
    ]
    assert int(unit_property(first, "twin.service", "MainPID")) == pids[first.cgroup_name]
    assert not is_alive(pids[second.cgroup_name])


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_sweep_stale_removes_a_planted_stale_slice(private_manager_host: str | None) -> None:
    if private_manager_host is not None:
        unavailable(private_manager_host)
    prefix = f"diversityd-sweep-{secrets.token_hex(3)}"
    stale = f"{prefix}-{dead_pid()}-abc123"
    live = f"{prefix}-{os.getpid()}-def456"
    hierarchies = tracking_hierarchies()
    for hierarchy in hierarchies:
        (hierarchy / f"{stale}.slice/manager.slice/app.slice").mkdir(parents=True)
        (hierarchy / f"{live}.slice/manager.slice").mkdir(parents=True)
    stale_root = Path(f"/tmp/{stale}.root")
    (stale_root / "xdg").mkdir(parents=True)
    straggler = subprocess.Popen(["sleep", "300"])
    try:
        for hierarchy in hierarchies:
            procs = hierarchy / f"{stale}.slice/manager.slice/app.slice/cgroup.procs"
            procs.write_text(str(straggler.pid))

        removed = sweep_stale(prefix)

        assert straggler.wait(timeout=5) == -signal.SIGKILL
        for hierarchy in hierarchies:
            assert not (hierarchy / f"{stale}.slice").exists()
            assert (hierarchy / f"{live}.slice").exists()  # its owner (we) still runs
            assert any(line.startswith(str(hierarchy / f"{stale}.slice")) for line in removed)
        assert not stale_root.exists()
        assert str(stale_root) in removed
    finally:
        straggler.kill()
        straggler.wait()
        for hierarchy in hierarchies:
            for folder in (f"{live}.slice/manager.slice", f"{live}.slice"):
                if (hierarchy / folder).exists():
                    (hierarchy / folder).rmdir()


CRASHING_RUNNER = """\
import json, sys, time
from diversityd_lab.privatemanager import PrivateManager
manager = PrivateManager.temporary(name=sys.argv[1])
manager.start()
(manager.unit_dir / "worker.service").write_text(
    "[Service]\\nType=exec\\nExecStart=/bin/sleep infinity\\n"
)
manager.systemctl("daemon-reload")
manager.systemctl("start", "worker.service")
worker = int(manager.systemctl("show", "-P", "MainPID", "worker.service").stdout)
print(json.dumps({"manager": manager.manager_pid, "worker": worker,
                  "cgroup": manager.cgroup_name, "root": str(manager.root)}), flush=True)
time.sleep(300)
"""


def test_a_killed_runner_takes_its_manager_down_and_sweep_cleans_up(
    private_manager_host: str | None,
) -> None:
    if private_manager_host is not None:
        unavailable(private_manager_host)
    prefix = f"diversityd-crash-{secrets.token_hex(3)}"
    runner = subprocess.Popen(
        [sys.executable, "-c", CRASHING_RUNNER, prefix],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert runner.stdout is not None
        line = runner.stdout.readline()
        assert line, runner.communicate(timeout=10)[1]
        started = json.loads(line)
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=5)
        # PR_SET_PDEATHSIG: the manager gets SIGTERM, stops its units and exits.
        assert wait_gone(started["manager"], 5.0)
        assert wait_gone(started["worker"], 5.0)
        tops = [hierarchy / started["cgroup"] for hierarchy in all_hierarchies()]
        assert any(top.exists() for top in tops)  # the empty slices a crash leaves behind
        assert all(list_cgroup_pids(top) == set() for top in tops)

        removed = sweep_stale(prefix)

        assert not any(top.exists() for top in tops)
        assert not Path(started["root"]).exists()
        assert started["root"] in removed
    finally:
        runner.kill()
        runner.communicate()
