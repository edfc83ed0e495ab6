"""The demo: the whole stack on the embedded default, then a drill, then a clean teardown.

    python -m diversityd_lab.demo            # up, status, a chat, a failover drill, down
    python -m diversityd_lab.demo --stay     # stays up, detached; says how to reach and stop it
    python -m diversityd_lab.demo --stop DIR # stops a demo left up with --stay
    python -m diversityd_lab.demo --hosts 2  # two hosts and a Redis, each host in a network
                                             # namespace of its own (fleetdemo.py); --stay too

It needs no GPU, no Ollama and no user session: a private `systemd --user` manager (with
its bus and a journald) runs the real llama-server, the real llama-cpp-python server on a
tiny GGUF behind `models/active/current.gguf`, the Ollama and vLLM stand-ins, the real
LiteLLM gateway and diversityd itself. On a machine that already runs a user manager for
this user, that one is used instead (units go to ~/.config/systemd/user, removed after).
Ports are picked free, so nothing clashes with servers already running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from diversityd.adapters.gatewayclient import ask, new_client
from diversityd.adapters.litellm import read_master_key
from diversityd.units import DAEMON_UNIT, GATEWAY_SOCKET, gateway_instance
from diversityd_lab import fleetdemo
from diversityd_lab.embedded import (
    LLAMA_NATIVE,
    LLAMA_PYTHON,
    OLLAMA,
    VLLM,
    Stack,
    StackSpec,
    write_stack,
)
from diversityd_lab.privatemanager import (
    PrivateManager,
    PrivateManagerError,
    PrivateManagerUnavailable,
    host_has_user_manager,
)
from diversityd_lab.stack import RunningStack, StackTimeoutError, free_port, run_ctl

PROVIDERS = (LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM)
KEEPER_FILE = "keeper.json"  # a --stay demo's manager: pid and environment


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class World:
    """Where the demo's units run: a private manager, or the host's own user manager."""

    def __init__(self, env: dict[str, str], unit_dir: Path, stop: Callable[[], None]) -> None:
        self.env = env
        self.unit_dir = unit_dir
        self.netns: str | None = None
        self._stop = stop

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = run_ctl(self, *args, timeout=900)
        if check and result.returncode != 0:
            raise SystemExit(
                f"diversityctl {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def systemctl(
        self, *args: str, check: bool = False, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemctl", "--user", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def stop(self) -> None:
        self._stop()


def private_world(root: Path) -> World:
    manager = PrivateManager(root / "pm", name="diversityd-demo")
    manager.start()
    return World(manager.env, manager.unit_dir, manager.stop)


def host_world() -> World:
    unit_dir = (
        Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user"
    )
    if (unit_dir / DAEMON_UNIT).exists():
        raise SystemExit(
            f"{unit_dir / DAEMON_UNIT} exists: diversityd is installed for real here, and "
            "the demo would replace it. Run the demo as root (it then uses a private manager) "
            "or on another machine."
        )

    def remove_units() -> None:
        for path in unit_dir.glob("diversityd*"):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        subprocess.run(["systemctl", "--user", "daemon-reload"], check=False)

    return World(dict(os.environ), unit_dir, remove_units)


def open_world(root: Path) -> World:
    try:
        return private_world(root)
    except PrivateManagerUnavailable as exc:
        if host_has_user_manager():
            print(f"(no private manager here: {exc}; using this user's own manager)")
            return host_world()
        raise SystemExit(f"cannot run a systemd user manager here: {exc}") from None


def bring_up(world: World, root: Path) -> Stack:
    spec = StackSpec(
        ports={**{name: free_port() for name in PROVIDERS}, "gateway": free_port()},
        providers=PROVIDERS,
        unit_dir=world.unit_dir,
    )
    stack = write_stack(root / "stack", spec)
    say(f"configuration in {stack.config_dir}")
    print(world.ctl("validate", "--config-dir", str(stack.config_dir), check=False).stdout)
    say("installing and starting diversityd (it starts the providers, then the gateway)")
    print(world.ctl("install", "--config-dir", str(stack.config_dir), "--now").stdout.strip())
    try:
        RunningStack(world, stack).wait_for(
            lambda d: (
                all(p["state"] == "ready" for p in d["providers"])
                and d["gateway"].get("state") == "ready"
                and d["gateway"].get("in_sync")
            ),
            timeout_s=300,
            poll_s=0.5,
        )
    except StackTimeoutError as exc:
        raise SystemExit(f"timed out waiting for every provider and the gateway: {exc}") from None
    return stack


def chat(world: World) -> None:
    status = json.loads(world.ctl("status", "--json").stdout)
    gateway = status["gateway"]
    key = read_master_key(Path(gateway["key_file"]))

    async def go() -> None:
        async with new_client(60) as client:
            for model, stream in (("llama3.1:latest", False), ("llama-cpp-default", True)):
                answer = await ask(client, gateway["url"], key, model, stream=stream)
                kind = "streamed" if stream else "plain"
                verdict = "ok" if answer.ok else f"FAILED: {answer.error}"
                print(
                    f"{model} ({kind}): {verdict} in {answer.latency_ms:.0f} ms, "
                    f"answered by {answer.api_base}"
                )

    asyncio.run(go())


def tear_down(world: World, stack_root: Path) -> None:
    say("tearing down")
    for unit in (DAEMON_UNIT, gateway_instance("blue"), gateway_instance("green"), GATEWAY_SOCKET):
        world.systemctl("stop", unit)
    for provider in PROVIDERS:
        world.systemctl("stop", f"diversityd-{provider}.service")
    world.stop()
    shutil.rmtree(stack_root, ignore_errors=True)
    print("stopped every unit and the manager; removed", stack_root)


# -- --stay: a detached keeper owns the manager -------------------------------------------


def keeper_main(root: Path) -> None:
    """Run detached: own the private manager until SIGTERM, then stop it."""
    manager = PrivateManager(root / "pm", name="diversityd-demo")
    manager.start()
    info = {"pid": os.getpid(), "env": manager.env, "unit_dir": str(manager.unit_dir)}
    (root / KEEPER_FILE).write_text(json.dumps(info))
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        signal.pause()
    manager.stop()
    (root / KEEPER_FILE).unlink(missing_ok=True)


def detached_world(root: Path) -> World:
    subprocess.Popen(
        [sys.executable, "-m", "diversityd_lab.demo", "--keeper", str(root)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=(root / "keeper.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not (root / KEEPER_FILE).exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"the demo's manager did not start; see {root / 'keeper.log'}")
        time.sleep(0.1)
    info = json.loads((root / KEEPER_FILE).read_text())
    return World(info["env"], Path(info["unit_dir"]), lambda: None)


def stop_detached(root: Path) -> None:
    info_file = root / KEEPER_FILE
    if not info_file.exists():
        raise SystemExit(f"no demo running under {root}")
    info = json.loads(info_file.read_text())
    world = World(info["env"], Path(info["unit_dir"]), lambda: None)
    tear_down(world, root / "stack")
    os.kill(int(info["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + 30
    while info_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    shutil.rmtree(root, ignore_errors=True)
    print("demo stopped")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m diversityd_lab.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--stay", action="store_true", help="leave the stack up, detached")
    parser.add_argument("--stop", metavar="DIR", type=Path, help="stop a demo left up")
    parser.add_argument(
        "--hosts", metavar="N", type=int, help="N hosts and a Redis, each in a network namespace"
    )
    parser.add_argument("--keeper", metavar="DIR", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hosts is not None and args.hosts < 1:
        parser.error("--hosts takes a number of hosts, 1 or more")
    if args.keeper:
        if args.hosts:
            fleetdemo.keeper_main(args.keeper, args.hosts)
        else:
            keeper_main(args.keeper)
        return
    if args.stop:
        if (args.stop / fleetdemo.FLEET_FILE).exists():
            fleetdemo.stop_detached(args.stop)
        else:
            stop_detached(args.stop)
        return
    if args.hosts:
        if args.stay:
            fleetdemo.stay(Path(tempfile.mkdtemp(prefix="diversityd-demo-")), args.hosts)
        else:
            fleetdemo.run_demo(args.hosts)
        return
    root = Path(tempfile.mkdtemp(prefix="diversityd-demo-"))
    try:
        world = detached_world(root) if args.stay else open_world(root)
    except PrivateManagerError as exc:
        raise SystemExit(f"cannot start a private systemd --user manager: {exc}") from None
    try:
        bring_up(world, root)
        say("diversityctl status")
        print(world.ctl("status").stdout)
        say("a chat through the gateway")
        chat(world)
        say("diversityctl failover-test llama_cpp_python --mode stop")
        drill = world.ctl("failover-test", LLAMA_PYTHON, "--mode", "stop", check=False)
        print(drill.stderr, drill.stdout, sep="")
        say("diversityctl status after the drill")
        print(world.ctl("status").stdout)
    except BaseException:
        if not args.stay:
            tear_down(world, root / "stack")
        raise
    if args.stay:
        say("the stack stays up")
        print(
            "reach it with this environment:\n"
            + "".join(
                f"  export {k}={v}\n"
                for k, v in world.env.items()
                if k.startswith(("DBUS", "XDG_RUNTIME"))
            )
            + f"  {sys.executable} -m diversityd.cli status\n"
            f"gateway: {json.loads(world.ctl('status', '--json').stdout)['gateway']['url']}\n"
            f"stop it: {sys.executable} -m diversityd_lab.demo --stop {root}"
        )
        return
    tear_down(world, root / "stack")
    shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if drill.returncode == 0 else 1)


if __name__ == "__main__":
    main()
