"""N hosts and a Redis on one machine, each in a network namespace of its own, and the faults
that hosts really have: a freeze, a cut link, Redis out of reach, a daemon killed, Redis
killed, a reboot.

A host is a namespace with its own private `systemd --user` manager (privatemanager.py,
entered with setns), and, with `stacks`, the embedded stack inside it: the real llama
servers, the Ollama and vLLM stand-ins on their usual ports, the LiteLLM gateway on
0.0.0.0:4000 (so peers reach it on their link) and diversityd. The Redis runs in a
namespace of its own; the links are in topology.py. `stop()` (also after a failed `start()`)
removes every namespace, link, process, cgroup and folder the fleet made; `sweep_stale()`
does the same for a crashed run's leftovers.

Every fault is undone by the lab's own call: freeze/thaw, cut_link/mend_link,
cut_redis/mend_redis, kill_daemon (systemd restarts it), kill_redis/start_redis, and
halt/boot (reboot: both).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from diversityd.clock import OFFSET_ENV
from diversityd.errors import DiversitydError
from diversityd.units import DAEMON_UNIT
from diversityd_lab import netns, privatemanager
from diversityd_lab.embedded import LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM, StackSpec
from diversityd_lab.freezer import set_frozen, unified_hierarchy
from diversityd_lab.privatemanager import SYSTEMD_BINARY, TEMP_DIR, PrivateManager
from diversityd_lab.redislab import REDIS_CLI, REDIS_PORT, REDIS_SERVER, RedisServer, ping
from diversityd_lab.stack import RunningStack, start_stack
from diversityd_lab.topology import REDIS, Topology, plan_topology

FLEET_PREFIX = "dvlab"
PROVIDERS = (LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM)
# Every host is a machine of its own: the servers' usual ports, the same on every host.
HOST_PORTS = {
    LLAMA_NATIVE: 8080,
    LLAMA_PYTHON: 8000,
    OLLAMA: 11434,
    VLLM: 8001,
    "gateway": 4000,
    "http": 9478,
}

# One HTTP GET from inside a namespace: the status, or the error's name and words.
FETCH_SCRIPT = """\
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as answer:
        print(answer.status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(1)
"""


class FleetError(DiversitydError):
    """The fleet could not be started, changed or stopped."""

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (fix: {self.hint})" if self.hint else text


@dataclass(frozen=True)
class FleetSpec:
    hosts: int = 2
    stacks: bool = True  # False: each host only its manager (cheap: the lab's own tests)
    providers: tuple[str, ...] = PROVIDERS
    clock_offsets_s: Mapping[str, float] = field(default_factory=dict)  # host -> skew
    ready_timeout_s: float = 300.0
    # the fleet itself (diversityd.yaml's `fleet:`): Redis, the shared key, each host's
    # gateway as its peers reach it; False: the hosts know nothing of each other
    fleet: bool = False
    fleet_settings: Mapping[str, Any] = field(default_factory=dict)  # more of `fleet:`
    extra_settings: Mapping[str, Any] = field(default_factory=dict)  # more of diversityd.yaml


@dataclass
class Host:
    name: str
    netns: str
    root: Path
    manager: PrivateManager | None = None
    running: RunningStack | None = None
    frozen: bool = False


@dataclass(frozen=True)
class Reach:
    """What one request from inside a namespace found."""

    ok: bool
    detail: str  # the HTTP status, or the error ("TimeoutError timed out", ...)
    elapsed_s: float


def missing_capabilities() -> list[str]:
    """What this machine lacks to run a fleet, each with how to get it (empty: nothing)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, veth links, cgroups)")
    if shutil.which("ip") is None:
        missing.append("`ip` (apt-get install iproute2)")
    for binary in (REDIS_SERVER, REDIS_CLI):
        if not binary.exists():
            missing.append(f"{binary} (packaging/install-system-deps.sh)")
    if not SYSTEMD_BINARY.exists():
        missing.append(f"{SYSTEMD_BINARY} (apt-get install systemd)")
    if unified_hierarchy() is None:
        missing.append("a cgroup2 (unified) hierarchy: the freezer lives there")
    return missing


def sweep_stale(prefix: str = FLEET_PREFIX) -> list[str]:
    """Removes what crashed fleets left: their namespaces (and so links and the processes in
    them), their managers' cgroups, their folders. Live fleets' things are left alone."""
    removed = netns.sweep_stale_namespaces(prefix)
    removed += privatemanager.sweep_stale(prefix)
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)-[0-9a-f]+\.fleet")
    for path in sorted(TEMP_DIR.iterdir()):
        found = pattern.fullmatch(path.name)
        if found and path.is_dir() and not privatemanager.is_alive(int(found.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def _all_serving(document: dict[str, Any]) -> bool:
    gateway = document.get("gateway") or {}
    return bool(
        document["daemon"].get("running")
        and all(p["state"] == "ready" for p in document["providers"])
        and gateway.get("state") == "ready"
        and gateway.get("in_sync")
    )


class Fleet:
    """N hosts and a Redis. `start()` returns with every host's stack serving; `stop()` is
    idempotent. Call both from one thread that lives as long as the fleet (the managers and
    Redis get SIGTERM when the thread that forked them ends)."""

    def __init__(self, spec: FleetSpec | None = None, *, prefix: str = FLEET_PREFIX) -> None:
        self.spec = spec or FleetSpec()
        self.prefix = prefix
        self.unique = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.root = TEMP_DIR / f"{self.unique}.fleet"  # short: socket paths live under it
        self.topology: Topology = plan_topology(self.spec.hosts)
        self.hosts = {
            name: Host(name, self.netns(name), self.root / name) for name in self.topology.hosts
        }
        self.redis = RedisServer(self.root / REDIS, self.netns(REDIS))
        self.timings: dict[str, float] = {}  # start's steps, in seconds
        self._cgroups: list[str] = []  # every manager's slice, this boot's and earlier ones
        self._netns_inodes: list[int] = []
        self._started = False
        self._stopped = False

    def netns(self, node: str) -> str:
        return f"{self.unique}-{node}"

    # -- lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._started:
            raise FleetError("a Fleet starts once", hint="make a new one")
        self._started = True
        try:
            self.root.mkdir(mode=0o700)
            self._timed("network", self._make_network)
            self._timed("redis", self.redis.start)
            for host in self.hosts.values():
                self._timed(f"{host.name}.manager", partial(self._start_manager, host))
            if self.spec.stacks:
                for host in self.hosts.values():
                    self._timed(f"{host.name}.install", partial(self._install, host))
                for host in self.hosts.values():
                    self._timed(f"{host.name}.serving", partial(self._wait_serving, host))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stops every host and Redis; removes the namespaces (so the links) and the root."""
        if self._stopped:
            return
        self._stopped = True
        problems: list[str] = []
        for host in self.hosts.values():
            try:
                self._halt(host, stop_daemon_first=True)
            except (DiversitydError, OSError) as exc:
                problems.append(f"{host.name}: {exc}")
        self.redis.kill()
        for node in self.topology.nodes:
            try:
                netns.delete_namespace(self.netns(node))
            except DiversitydError as exc:
                problems.append(str(exc))
        shutil.rmtree(self.root, ignore_errors=True)
        if problems:
            raise FleetError(
                "the fleet stopped, but not cleanly: " + "; ".join(problems),
                hint="fleet.sweep_stale() retries once this process is gone",
            )

    def _timed(self, step: str, action: Callable[[], None]) -> None:
        began = time.monotonic()
        action()
        self.timings[step] = round(time.monotonic() - began, 2)

    def _make_network(self) -> None:
        for node in self.topology.nodes:
            netns.add_namespace(self.netns(node))
            self._netns_inodes.append((netns.NETNS_DIR / self.netns(node)).stat().st_ino)
        for link in self.topology.links:
            netns.add_link(
                (self.netns(link.first.node), link.first.ifname, link.first.address),
                (self.netns(link.second.node), link.second.ifname, link.second.address),
            )

    def _start_manager(self, host: Host) -> None:
        runtime = host.root / "pm" / "xdg"
        if runtime.exists():  # a reboot: the last manager's sockets are stale
            shutil.rmtree(runtime)
        manager = PrivateManager(host.root / "pm", name=self.prefix, netns=host.netns)
        offset = self.spec.clock_offsets_s.get(host.name)
        if offset is not None:  # every unit's environment, this boot and the next
            drop_in = manager.config_home / "systemd" / "user.conf.d" / "clock.conf"
            drop_in.parent.mkdir(parents=True, exist_ok=True)
            drop_in.write_text(f"[Manager]\nDefaultEnvironment={OFFSET_ENV}={offset!r}\n")
        host.manager = manager
        self._cgroups.append(manager.cgroup_name)
        manager.start()

    def _install(self, host: Host) -> None:
        manager = self._manager(host.name)
        settings: dict[str, Any] = {"host": host.name, **self.spec.extra_settings}
        if self.spec.fleet:
            settings["fleet"] = self.fleet_settings(host)
        spec = StackSpec(
            ports=HOST_PORTS,
            providers=self.spec.providers,
            unit_dir=manager.unit_dir,
            gateway_host="0.0.0.0",  # noqa: S104  peers reach it on their link addresses
            extra_settings=settings,
        )
        host.running = start_stack(manager, host.root / "stack", spec)

    @property
    def fleet_key_file(self) -> Path:
        """The fleet's shared key (one file here; a real fleet copies it to every host)."""
        return self.root / "fleet.key"

    def fleet_settings(self, host: Host) -> dict[str, Any]:
        """`fleet:` for one host: its Redis link, and its gateway as the others reach it
        (two hosts: each reaches the other on their one link)."""
        if not self.fleet_key_file.exists():
            self.fleet_key_file.write_text(f"{secrets.token_urlsafe(32)}\n")
            self.fleet_key_file.chmod(0o600)
        others = [name for name in self.hosts if name != host.name]
        seen_from = others[0] if others else host.name
        return {
            "redis_url": f"redis://{self.redis_address(host.name)}:{REDIS_PORT}/0",
            "key_file": str(self.fleet_key_file),
            "advertise_url": self.gateway_url(host.name, seen_from=seen_from),
            "name": host.name,
            **self.spec.fleet_settings,
        }

    def _wait_serving(self, host: Host) -> None:
        running = self.running(host.name)
        running.wait_for(_all_serving, timeout_s=self.spec.ready_timeout_s, poll_s=0.5)

    def _halt(self, host: Host, *, stop_daemon_first: bool = False) -> None:
        manager, host.manager = host.manager, None
        if manager is None:
            return
        if host.frozen:  # a frozen manager cannot hear SIGTERM
            self._set_frozen(host, manager, frozen=False)
        if stop_daemon_first and host.running is not None:
            manager.systemctl("stop", DAEMON_UNIT, check=False)
        manager.stop()

    # -- where things are

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise FleetError(f"no host {name!r}; hosts: {', '.join(self.hosts)}") from None

    def _manager(self, name: str) -> PrivateManager:
        manager = self.host(name).manager
        if manager is None:
            raise FleetError(f"host {name} is down", hint=f"fleet.boot({name!r})")
        return manager

    def running(self, name: str) -> RunningStack:
        running = self.host(name).running
        if running is None:
            raise FleetError(f"host {name} runs no stack", hint="FleetSpec(stacks=True)")
        return running

    def address(self, node: str, *, seen_from: str) -> str:
        return self.topology.address(node, seen_from=seen_from)

    def gateway_url(self, name: str, *, seen_from: str | None = None) -> str:
        """The gateway of host `name`: on loopback inside it, or on its link to `seen_from`."""
        if seen_from is None or seen_from == name:
            where = "127.0.0.1"
        else:
            where = self.address(name, seen_from=seen_from)
        return f"http://{where}:{HOST_PORTS['gateway']}"

    def redis_address(self, host: str) -> str:
        """Where `host` reaches Redis: Redis's end of their link."""
        return self.address(REDIS, seen_from=host)

    def host_cgroup(self, name: str) -> Path:
        """The host's whole subtree (manager and units) in the unified hierarchy."""
        unified = unified_hierarchy()
        if unified is None:
            raise FleetError("no cgroup2 (unified) hierarchy: a host cannot be frozen")
        return unified / self._manager(name).cgroup_name

    # -- looking from inside a host

    def run_in(
        self, node: str, args: list[str], timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """`args` run inside `node`'s namespace (a CompletedProcess; a timeout: status 124)."""
        return netns.run_in(self.netns(node), args, timeout=timeout)

    def fetch(self, seen_from: str, url: str, timeout_s: float = 3.0) -> Reach:
        """One GET of `url` from inside `seen_from`."""
        began = time.monotonic()
        result = self.run_in(
            seen_from,
            [sys.executable, "-I", "-c", FETCH_SCRIPT, url, str(timeout_s)],
            timeout=timeout_s + 30,
        )
        detail = (result.stdout.strip() or result.stderr.strip())[-300:]
        return Reach(result.returncode == 0, detail, round(time.monotonic() - began, 2))

    def redis_ping(self, host: str) -> str:
        """`redis-cli PING` from inside `host`: "PONG", or what went wrong."""
        return ping(self.netns(host), self.redis_address(host), REDIS_PORT)

    def ctl(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The real diversityctl, run inside the host, against its manager."""
        return self.running(name).ctl(*args, timeout=timeout)

    # -- faults, each undone by its partner

    def freeze(self, name: str) -> None:
        """Freezes the host whole: its manager, bus, daemon, servers and gateway."""
        host = self.host(name)
        self._set_frozen(host, self._manager(name), frozen=True)

    def thaw(self, name: str) -> None:
        host = self.host(name)
        self._set_frozen(host, self._manager(name), frozen=False)

    def _set_frozen(self, host: Host, manager: PrivateManager, *, frozen: bool) -> None:
        unified = unified_hierarchy()
        if unified is None:
            raise FleetError("no cgroup2 (unified) hierarchy: a host cannot be frozen")
        set_frozen(unified / manager.cgroup_name, frozen)
        host.frozen = frozen

    def cut_link(self, a: str, b: str) -> None:
        """Takes both ends of the a-b link down: each side's connects fail at once."""
        self._set_link(a, b, up=False)

    def mend_link(self, a: str, b: str) -> None:
        self._set_link(a, b, up=True)

    def cut_redis(self, host: str) -> None:
        self._set_link(host, REDIS, up=False)

    def mend_redis(self, host: str) -> None:
        self._set_link(host, REDIS, up=True)

    def link_state(self, a: str, b: str) -> str:
        """The state of `a`'s end of the a-b link (UP, DOWN, ...)."""
        end = self.topology.link(a, b).end(a)
        return netns.link_state(self.netns(a), end.ifname)

    def _set_link(self, a: str, b: str, *, up: bool) -> None:
        link = self.topology.link(a, b)
        for end in (link.first, link.second):
            netns.set_link_up(self.netns(end.node), end.ifname, up)
        if up:
            for end in (link.first, link.second):
                netns.wait_link_state(self.netns(end.node), end.ifname, "UP")

    def kill_daemon(self, name: str) -> int:
        """SIGKILLs the host's diversityd; systemd restarts it. Returns the PID killed."""
        pid = self.running(name).daemon_pid()
        if pid <= 0:
            raise FleetError(f"diversityd is not running on {name}")
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill_redis(self) -> None:
        self.redis.kill()

    def start_redis(self) -> None:
        self.redis.start()

    def halt(self, name: str) -> None:
        """Stops the host's whole manager and everything under it, as a shutdown does."""
        self._halt(self.host(name))

    def boot(self, name: str) -> None:
        """A fresh manager on the host's folders: default.target starts diversityd, which
        starts the stack; returns when it serves again."""
        host = self.host(name)
        if host.manager is not None:
            raise FleetError(f"host {name} is up", hint=f"fleet.halt({name!r}) first")
        self._start_manager(host)
        manager = self._manager(name)
        if host.running is not None:
            host.running = RunningStack(manager, host.running.stack)
            self._wait_serving(host)

    def reboot(self, name: str) -> None:
        self.halt(name)
        self.boot(name)

    def leftovers(self) -> list[str]:
        """What the fleet still has on this machine (empty once stopped cleanly)."""
        return leftovers(self.unique, cgroups=self._cgroups, netns_inodes=self._netns_inodes)

    def processes(self) -> dict[str, list[int]]:
        """The PIDs running in each of the fleet's namespaces."""
        return {
            node: netns.namespace_pids(self.netns(node))
            for node in self.topology.nodes
            if self.netns(node) in netns.list_namespaces()
        }


def leftovers(
    unique: str, *, cgroups: Iterable[str] = (), netns_inodes: Iterable[int] = ()
) -> list[str]:
    """What a fleet still has on this machine: namespaces and folders named after `unique`,
    the cgroups named in `cgroups` (its managers' slices), processes in a namespace of
    `netns_inodes` or naming `unique`. Empty once it stopped cleanly."""
    mark = unique + "-"
    found = [f"netns {name}" for name in netns.list_namespaces() if name.startswith(mark)]
    slices = set(cgroups)
    for hierarchy in privatemanager.all_hierarchies():
        with contextlib.suppress(OSError):
            found += [
                str(path)
                for path in hierarchy.iterdir()
                if path.name.startswith(mark) or path.name in slices
            ]
    with contextlib.suppress(OSError):
        found += [str(path) for path in TEMP_DIR.iterdir() if path.name.startswith(unique)]
    inodes = set(netns_inodes)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes()
            if unique.encode() in cmdline or (proc / "ns" / "net").stat().st_ino in inodes:
                found.append(f"pid {proc.name}: {cmdline[:120]!r}")
    return found
