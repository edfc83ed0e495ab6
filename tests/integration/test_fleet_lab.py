"""Two hosts on one machine (issue 21): the facts the fleet lab rests on, the lab's own
clean-up, and every fault it makes, each observed from outside the host it hits and undone
by the lab's own call.

The expensive part (two whole stacks, each with its LiteLLM gateway) is ONE module-scoped
fleet; the tests that need only namespaces or managers make cheap ones of their own.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from diversityd.clock import OFFSET_ENV
from diversityd.units import DAEMON_UNIT
from diversityd_lab import netns
from diversityd_lab.fleet import (
    FLEET_PREFIX,
    Fleet,
    FleetError,
    FleetSpec,
    leftovers,
    missing_capabilities,
    sweep_stale,
)
from diversityd_lab.freezer import is_frozen, set_frozen, unified_hierarchy
from diversityd_lab.privatemanager import is_alive, tracking_hierarchies
from tests.conftest import unavailable

pytestmark = pytest.mark.integration

HOSTS = ("h0", "h1")


@pytest.fixture(scope="module")
def fleet_capable(private_manager_host: str | None) -> None:
    """The machine can run fleets (root, ip, Redis, cgroup2); crashed runs' leftovers gone."""
    missing = missing_capabilities()
    if private_manager_host is not None:
        missing.append(f"a private systemd --user manager: {private_manager_host}")
    if missing:
        unavailable("the fleet lab needs " + "; ".join(missing))
    sweep_stale()


@pytest.fixture(scope="module")
def fleet(
    fleet_capable: None,
    llama_server_bin: Path,
    llama_cpp_python_interpreter: Path,
    litellm_python: Path,
) -> Iterator[Fleet]:
    """Two hosts, each a whole stack serving, and a Redis; h1's clock runs 2.5 s ahead."""
    fleet = Fleet(FleetSpec(hosts=2, clock_offsets_s={"h1": 2.5}))
    fleet.start()  # stops what it began when it fails
    try:
        yield fleet
    finally:
        fleet.stop()
        assert fleet.leftovers() == []


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def namespace_inode(name: str) -> int:
    return os.stat(netns.NETNS_DIR / name).st_ino


@contextlib.contextmanager
def scratch_namespace(*, with_lo: bool = True) -> Iterator[str]:
    """A namespace named as a fleet's (so a crashed run's is swept), deleted afterwards."""
    name = f"{FLEET_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-scratch"
    if with_lo:
        netns.add_namespace(name)
    else:
        netns.run_ip("netns", "add", name)
    try:
        yield name
    finally:
        netns.delete_namespace(name)


# ----------------------------------------------------------------------------- the facts


def test_ip_netns_exec_hides_the_cgroup_mounts_and_setns_does_not(fleet_capable: None) -> None:
    hierarchies = {path.name for path in tracking_hierarchies()}
    with scratch_namespace() as name:
        hidden = netns.run_ip("netns", "exec", name, "ls", "/sys/fs/cgroup").stdout.split()
        seen = netns.run_in(name, ["ls", "/sys/fs/cgroup"]).stdout.split()
    # `ip netns exec` remounts /sys in a mount namespace of its own: no cgroup mounts there.
    assert not hierarchies & set(hidden), hidden
    assert hierarchies <= set(seen) or "cgroup.controllers" in seen, seen


def test_lo_starts_down_in_a_new_namespace(fleet_capable: None) -> None:
    loopback = (
        "import socket\n"
        "server = socket.create_server(('127.0.0.1', 0))\n"
        "socket.create_connection(server.getsockname(), timeout=2).close()\n"
    )
    with scratch_namespace(with_lo=False) as name:
        assert netns.link_state(name, "lo") == "DOWN"
        down = netns.run_in(name, [sys.executable, "-I", "-c", loopback])
        assert down.returncode != 0
        assert "unreachable" in down.stderr or "Cannot assign" in down.stderr, down.stderr
        netns.set_link_up(name, "lo", up=True)  # what add_namespace does
        up = netns.run_in(name, [sys.executable, "-I", "-c", loopback])
        assert up.returncode == 0, up.stderr


def test_an_abstract_socket_stays_in_its_namespace_and_a_path_socket_does_not(
    fleet_capable: None, tmp_path: Path
) -> None:
    """Why the manager's NOTIFY_SOCKET is a path: READY=1 sent from a host's namespace to an
    abstract socket bound in the machine's own never arrives."""
    sender = (
        "import socket, sys\n"
        "address = sys.argv[1].replace('@', '\\0', 1)\n"
        "with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:\n"
        "    sock.sendto(b'READY=1', address)\n"
    )
    abstract_name = f"@dvlab-test-{secrets.token_hex(4)}"
    path = tmp_path / "notify"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_path,
        scratch_namespace() as name,
    ):
        abstract.bind("\0" + abstract_name[1:])
        by_path.bind(str(path))
        by_path.settimeout(5)
        lost = netns.run_in(name, [sys.executable, "-I", "-c", sender, abstract_name])
        assert lost.returncode != 0
        assert "ConnectionRefusedError" in lost.stderr, lost.stderr
        sent = netns.run_in(name, [sys.executable, "-I", "-c", sender, str(path)])
        assert sent.returncode == 0, sent.stderr
        assert by_path.recv(64) == b"READY=1"


def test_the_unified_freezer_works_in_hybrid_mode(fleet_capable: None, tmp_path: Path) -> None:
    unified = unified_hierarchy()
    assert unified is not None
    cgroup = unified / f"{FLEET_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}.slice"
    ticks = tmp_path / "ticks"
    script = (
        "import sys, time\n"
        "with open(sys.argv[1], 'a') as out:\n"
        "    while True:\n"
        "        out.write('.'); out.flush(); time.sleep(0.01)\n"
    )
    ticker = subprocess.Popen([sys.executable, "-I", "-c", script, str(ticks)])
    cgroup.mkdir()
    try:
        (cgroup / "cgroup.procs").write_text(str(ticker.pid))
        wait_until(lambda: ticks.exists() and ticks.stat().st_size > 0, 10, "the first tick")
        set_frozen(cgroup, True)
        assert (cgroup / "cgroup.freeze").read_text().strip() == "1"
        assert is_frozen(cgroup)
        size = ticks.stat().st_size
        time.sleep(0.5)
        assert ticks.stat().st_size == size, "a frozen process went on writing"
        set_frozen(cgroup, False)
        wait_until(lambda: ticks.stat().st_size > size, 5, "ticks after the thaw")
    finally:
        with contextlib.suppress(OSError):
            (cgroup / "cgroup.freeze").write_text("0")
        ticker.kill()
        ticker.wait()
        wait_until(lambda: not (cgroup / "cgroup.procs").read_text().split(), 5, "an empty cgroup")
        cgroup.rmdir()


# ----------------------------------------------------------------------------- clean-up


def test_managers_run_in_their_namespaces_and_leave_nothing(fleet_capable: None) -> None:
    with Fleet(FleetSpec(hosts=2, stacks=False)) as fleet:
        for name in HOSTS:
            host = fleet.host(name)
            assert host.manager is not None
            pid = host.manager.manager_pid
            # READY=1 came through the path socket, from inside the namespace
            assert netns_inode(pid) == namespace_inode(host.netns)
            assert netns_inode(pid) != netns_inode(os.getpid())
            # its bus is a path socket: reached from the machine's namespace too (diversityctl
            # still runs inside the host: its probes and install's port look are made there)
            assert host.manager.systemctl("is-system-running").stdout.strip() == "running"
            # The manager joins no v1 freezer: a v1 freeze there would be the machine's root
            cgroups = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            assert any(line.endswith(":freezer:/") for line in cgroups), cgroups
            assert fleet.link_state(name, "redis") == "UP"
        assert fleet.link_state("h0", "h1") == "UP"
        assert fleet.processes()["redis"]
        assert fleet.leftovers()
    assert fleet.leftovers() == []


def test_an_error_while_the_fleet_is_up_leaves_nothing(fleet_capable: None) -> None:
    fleet = Fleet(FleetSpec(stacks=False))

    def fail_half_way() -> None:
        with fleet:
            fleet.freeze("h1")  # even a frozen host is taken down
            raise RuntimeError("a test failing half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        fail_half_way()
    assert fleet.leftovers() == []


def test_a_start_that_fails_half_way_leaves_nothing(
    fleet_capable: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_start = Fleet._start_manager

    def second_fails(self: Fleet, host: object) -> None:
        if getattr(host, "name", None) == "h1":
            raise FleetError("h1 fails on purpose")
        real_start(self, host)  # type: ignore[arg-type]

    monkeypatch.setattr(Fleet, "_start_manager", second_fails)
    fleet = Fleet(FleetSpec(stacks=False))
    with pytest.raises(FleetError, match="on purpose"):
        fleet.start()
    assert fleet.timings.keys() >= {"network", "redis", "h0.manager"}  # it was half-way
    assert fleet.leftovers() == []


def test_the_stale_sweep_removes_a_dead_runs_namespaces_links_and_processes(
    fleet_capable: None,
) -> None:
    dead = subprocess.Popen(["true"])  # its PID names the "crashed" run
    dead.wait()
    unique = f"{FLEET_PREFIX}-{dead.pid}-{secrets.token_hex(3)}"
    names = (f"{unique}-h0", f"{unique}-redis")
    folder = Path(f"/tmp/{unique}.fleet")
    orphan = None
    try:
        for name in names:
            netns.add_namespace(name)
        inodes = [namespace_inode(name) for name in names]
        netns.add_link((names[0], "to-redis", "10.201.0.1"), (names[1], "to-h0", "10.201.0.2"))
        orphan = subprocess.Popen(
            ["sleep", "300"],
            start_new_session=True,
            preexec_fn=netns.enter_preexec(names[1]),  # noqa: PLW1509  setns before exec
        )
        folder.mkdir()
        assert is_alive(dead.pid) is False
        removed = sweep_stale()
        assert {f"netns {name}" for name in names} <= set(removed)
        assert str(folder) in removed
        orphan.wait(5)  # SIGKILLed by the sweep
        assert orphan.returncode == -signal.SIGKILL
        assert leftovers(unique, netns_inodes=inodes) == []
    finally:
        for name in names:
            netns.delete_namespace(name)
        if orphan is not None and orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        if folder.exists():
            folder.rmdir()


# ----------------------------------------------------------------------------- the fleet


def test_each_host_runs_its_whole_stack_in_its_own_namespace(fleet: Fleet) -> None:
    for name in HOSTS:
        running = fleet.running(name)
        document = running.status()
        inode = namespace_inode(fleet.host(name).netns)
        pids = [running.daemon_pid(), *(p["pid"] for p in document["providers"])]
        pids.append(document["gateway"]["pid"])
        assert all(netns_inode(pid) == inode for pid in pids), (name, pids)
        peer = next(other for other in HOSTS if other != name)
        seen = fleet.fetch(peer, fleet.gateway_url(name, seen_from=peer) + "/health/liveliness")
        assert seen.ok, seen
        assert seen.detail == "200"
        assert fleet.redis_ping(name) == "PONG"
    # each host's clock offset reaches its units' environment, for clock.now() to read
    environ = {
        name: Path(f"/proc/{fleet.running(name).daemon_pid()}/environ").read_bytes().split(b"\0")
        for name in HOSTS
    }
    assert f"{OFFSET_ENV}=2.5".encode() in environ["h1"]
    assert not any(entry.startswith(OFFSET_ENV.encode()) for entry in environ["h0"])


def test_a_frozen_host_times_out_for_its_peer_until_thawed(fleet: Fleet) -> None:
    url = fleet.gateway_url("h0", seen_from="h1") + "/health/liveliness"
    cgroup = fleet.host_cgroup("h0")
    fleet.freeze("h0")
    try:
        assert (cgroup / "cgroup.freeze").read_text().strip() == "1"
        assert is_frozen(cgroup)
        # the kernel still accepts on the socket systemd holds; nobody answers
        seen = fleet.fetch("h1", url, timeout_s=3)
        assert not seen.ok
        assert "timed out" in seen.detail, seen
        assert seen.elapsed_s >= 3
        own = fleet.fetch("h1", fleet.gateway_url("h1") + "/health/liveliness")
        assert own.ok, own  # the other host is not touched
    finally:
        fleet.thaw("h0")
    assert (cgroup / "cgroup.freeze").read_text().strip() == "0"
    assert fleet.fetch("h1", url, timeout_s=10).ok
    fleet.running("h0").wait_for(lambda d: d["daemon"].get("running"), timeout_s=30)


def test_a_cut_link_refuses_connects_until_mended(fleet: Fleet) -> None:
    url = fleet.gateway_url("h0", seen_from="h1") + "/health/liveliness"
    fleet.cut_link("h0", "h1")
    try:
        assert fleet.link_state("h0", "h1") == "DOWN"
        assert fleet.link_state("h1", "h0") == "DOWN"
        seen = fleet.fetch("h1", url, timeout_s=3)
        assert not seen.ok
        assert "unreachable" in seen.detail, seen
        back = fleet.fetch("h0", fleet.gateway_url("h1", seen_from="h0"), timeout_s=3)
        assert not back.ok, back
        assert fleet.redis_ping("h0") == "PONG"  # only that link is cut
    finally:
        fleet.mend_link("h0", "h1")
    assert fleet.link_state("h0", "h1") == "UP"
    seen = fleet.fetch("h1", url, timeout_s=10)
    assert seen.ok, seen


def test_redis_cut_off_from_one_host_still_answers_the_other(fleet: Fleet) -> None:
    fleet.cut_redis("h0")
    try:
        assert fleet.link_state("h0", "redis") == "DOWN"
        answer = fleet.redis_ping("h0")
        assert answer != "PONG"
        assert "unreachable" in answer, answer
        assert fleet.redis_ping("h1") == "PONG"
    finally:
        fleet.mend_redis("h0")
    assert fleet.redis_ping("h0") == "PONG"


def test_a_killed_daemon_is_restarted_by_systemd(fleet: Fleet) -> None:
    running = fleet.running("h0")
    killed = fleet.kill_daemon("h0")
    wait_until(lambda: not is_alive(killed), 5, "the daemon to die")

    def restarted() -> bool:
        pid = running.daemon_pid()
        return pid not in (0, killed) and running.unit_property(DAEMON_UNIT, "ActiveState") in (
            "active",
            "activating",
        )

    wait_until(restarted, 30, "systemd to restart diversityd")
    assert int(running.unit_property(DAEMON_UNIT, "NRestarts")) >= 1
    document = running.wait_for(lambda d: bool(d["daemon"].get("running")), timeout_s=60)
    assert document["daemon"]["pid"] != killed
    seen = fleet.fetch("h1", fleet.gateway_url("h0", seen_from="h1") + "/health/liveliness")
    assert seen.ok, seen  # the servers and the gateway served on through it


def test_a_killed_redis_refuses_every_host_until_started_again(fleet: Fleet) -> None:
    pid = fleet.redis.pid
    assert pid is not None
    fleet.kill_redis()
    try:
        assert not is_alive(pid)
        for name in HOSTS:
            answer = fleet.redis_ping(name)
            assert "Connection refused" in answer, answer
    finally:
        fleet.start_redis()
    assert fleet.redis.pid not in (None, pid)
    assert all(fleet.redis_ping(name) == "PONG" for name in HOSTS)


def test_a_rebooted_host_is_down_for_its_peer_then_serves_again(fleet: Fleet) -> None:
    url = fleet.gateway_url("h0", seen_from="h1") + "/health/liveliness"
    old_manager = fleet.host("h0").manager
    assert old_manager is not None
    old_daemon = fleet.running("h0").daemon_pid()
    fleet.halt("h0")
    try:
        assert not is_alive(old_manager.manager_pid)
        assert not is_alive(old_daemon)
        assert fleet.processes()["h0"] == []  # nothing of the host runs any more
        seen = fleet.fetch("h1", url)
        assert not seen.ok
        assert "Connection refused" in seen.detail, seen
        assert fleet.fetch("h1", fleet.gateway_url("h1") + "/health/liveliness").ok
    finally:
        if fleet.host("h0").manager is None:
            fleet.boot("h0")  # returns when the stack serves again
    assert fleet.running("h0").daemon_pid() != old_daemon
    seen = fleet.fetch("h1", url)
    assert seen.ok, seen
