"""The demo with several hosts: `python -m diversityd_lab.demo --hosts 2 [--stay]`.

Brings up N hosts (each a network namespace with its own manager, servers, gateway and
diversityd) and a Redis in a namespace of its own (diversityd_lab.fleet), prints how to
reach each, has a look from inside each host, and tears everything down. It runs no fleet
logic: the hosts do not know of each other yet. With `--stay` a detached keeper owns the
fleet until `--stop DIR`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from diversityd import parts
from diversityd_lab.fleet import Fleet, FleetError, FleetSpec, missing_capabilities
from diversityd_lab.netns import NETNS_DIR
from diversityd_lab.privatemanager import PrivateManagerError
from diversityd_lab.redislab import REDIS_CLI, REDIS_PORT

FLEET_FILE = "fleet.json"  # a --stay fleet's keeper: its pid and how to reach each host
START_TIMEOUT_S = 900


def describe(fleet: Fleet) -> dict[str, Any]:
    """How to reach each host and the Redis, as plain data (the keeper writes it down)."""
    hosts = {}
    for name, host in fleet.hosts.items():
        running = fleet.running(name)
        assert host.manager is not None
        env = {
            key: value
            for key, value in host.manager.env.items()
            if key.startswith(("DBUS", "XDG_RUNTIME"))
        }
        env["DIVERSITYD_CACHE_DIR"] = str(parts.cache_root())
        status = [
            "nsenter", f"--net={NETNS_DIR / host.netns}", "env",
            *(f"{key}={value}" for key, value in env.items()),
            sys.executable, "-m", "diversityd.cli", "status",
            "--config-dir", str(running.stack.config_dir),
        ]  # fmt: skip
        hosts[name] = {
            "netns": host.netns,
            "gateway_inside": fleet.gateway_url(name),
            "gateway_from": {
                peer: fleet.gateway_url(name, seen_from=peer)
                for peer in fleet.hosts
                if peer != name
            },
            "key_file": str(running.stack.root / "state" / "master.key"),
            "status_command": shlex.join(status),
            "redis": f"{fleet.redis_address(name)}:{REDIS_PORT}",
        }
    return {"redis_netns": fleet.netns("redis"), "hosts": hosts}


def print_reach(info: dict[str, Any]) -> None:
    for name, host in info["hosts"].items():
        print(f"\n== host {name} (network namespace {host['netns']})")
        print(f"  gateway: {host['gateway_inside']} inside {name}")
        for peer, url in host["gateway_from"].items():
            print(f"           {url} from {peer}")
        print(f"  master key: {host['key_file']}")
        print(f"  diversityctl status:\n    {host['status_command']}")
        address, port = host["redis"].rsplit(":", 1)
        ping = f"nsenter --net={NETNS_DIR / host['netns']} {REDIS_CLI} -h {address} -p {port} PING"
        print(f"  redis: {host['redis']} from {name}\n    {ping}")
    print(f"\n== redis in network namespace {info['redis_netns']}, one address per host link")


def have_a_look(fleet: Fleet) -> None:
    """From inside each host: its status, Redis, and every peer's gateway."""
    for name in fleet.hosts:
        print(f"\n== from inside {name}: diversityctl status")
        print(fleet.ctl(name, "status").stdout.rstrip())
        print(f"redis PING from {name}: {fleet.redis_ping(name)}")
        for peer in fleet.hosts:
            if peer != name:
                url = fleet.gateway_url(peer, seen_from=name) + "/health/liveliness"
                print(f"{name} -> {peer}'s gateway {url}: {fleet.fetch(name, url).detail}")


def run_demo(hosts: int) -> None:
    missing = missing_capabilities()
    if missing:
        raise SystemExit("the demo with several hosts needs " + "; ".join(missing))
    fleet = Fleet(FleetSpec(hosts=hosts))
    print(f"== bringing up {hosts} hosts and a Redis (each host: its whole stack)", flush=True)
    try:
        with fleet:
            print(f"up in {sum(fleet.timings.values()):.1f} s: {fleet.timings}")
            print_reach(describe(fleet))
            have_a_look(fleet)
            print("\n== tearing down")
    except (FleetError, PrivateManagerError) as exc:
        raise SystemExit(f"the fleet did not come up: {exc}") from None
    print("removed every namespace, link, manager and process of", fleet.unique)


# -- --stay: a detached keeper owns the fleet ------------------------------------------


def keeper_main(root: Path, hosts: int) -> None:
    """Run detached: own the fleet until SIGTERM, then stop it."""
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with Fleet(FleetSpec(hosts=hosts)) as fleet:
        info = {"pid": os.getpid(), "timings": fleet.timings, **describe(fleet)}
        (root / FLEET_FILE).write_text(json.dumps(info))
        while not stopping:
            signal.pause()
    (root / FLEET_FILE).unlink(missing_ok=True)


def stay(root: Path, hosts: int) -> None:
    missing = missing_capabilities()
    if missing:
        raise SystemExit("the demo with several hosts needs " + "; ".join(missing))
    log = root / "keeper.log"
    keeper = subprocess.Popen(
        [sys.executable, "-m", "diversityd_lab.demo", "--keeper", str(root), "--hosts", str(hosts)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    print(f"== bringing up {hosts} hosts and a Redis, detached (log: {log})", flush=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (root / FLEET_FILE).exists():
        if keeper.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the fleet did not come up; see {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    info = json.loads((root / FLEET_FILE).read_text())
    print_reach(info)
    print(f"\nstop it: {sys.executable} -m diversityd_lab.demo --stop {root}")


def stop_detached(root: Path) -> None:
    info_file = root / FLEET_FILE
    info = json.loads(info_file.read_text())
    os.kill(int(info["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + 60
    while info_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if info_file.exists():
        raise SystemExit(f"the fleet's keeper (pid {info['pid']}) did not stop; see its log")
    shutil.rmtree(root, ignore_errors=True)
    print("fleet stopped: every namespace, link, manager and process removed")
