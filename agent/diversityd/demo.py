"""The demo: the whole stack on the embedded default, then a drill, then a clean teardown.

    python -m diversityd.demo            # up, status, a chat, a failover drill, down
    python -m diversityd.demo --stay     # stays up, detached; says how to reach and stop it
    python -m diversityd.demo --stop DIR # stops a demo left up with --stay

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
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diversityd import parts
from diversityd.adapters.gatewayclient import ask, new_client
from diversityd.adapters.litellm import read_master_key
from diversityd.embedded import (
    LLAMA_NATIVE,
    LLAMA_PYTHON,
    OLLAMA,
    VLLM,
    Stack,
    StackSpec,
    write_stack,
)
from diversityd.privatemanager import (
    PrivateManager,
    PrivateManagerError,
    PrivateManagerUnavailable,
    host_has_user_manager,
)
from diversityd.units import DAEMON_UNIT, GATEWAY_SOCKET, gateway_instance

PROVIDERS = (LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM)
KEEPER_FILE = "keeper.json"  # a --stay demo's manager: pid and environment


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class World:
    """Where the demo's units run: a private manager, or the host's own user manager."""

    def __init__(self, env: dict[str, str], unit_dir: Path, stop: Callable[[], None]) -> None:
        self.env = env
        self.unit_dir = unit_dir
        self._stop = stop

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "diversityd.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if check and result.returncode != 0:
            raise SystemExit(
                f"diversityctl {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def systemctl(self, *args: str) -> None:
        subprocess.run(
            ["systemctl", "--user", *args], env=self.env, capture_output=True, check=False
        )

    def stop(self) -> None:
        self._stop()


def client_env(base: dict[str, str]) -> dict[str, str]:
    # The parts stay where packaging/ put them, whatever the world's XDG folders say.
    return {**base, "DIVERSITYD_CACHE_DIR": str(parts.cache_root())}


def private_world(root: Path) -> World:
    manager = PrivateManager(root / "pm", name="diversityd-demo")
    manager.start()
    return World(client_env(manager.env), manager.unit_dir, manager.stop)


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

    return World(client_env(dict(os.environ)), unit_dir, remove_units)


def open_world(root: Path) -> World:
    try:
        return private_world(root)
    except PrivateManagerUnavailable as exc:
        if host_has_user_manager():
            print(f"(no private manager here: {exc}; using this user's own manager)")
            return host_world()
        raise SystemExit(f"cannot run a systemd user manager here: {exc}") from None


def wait_for(
    world: World,
    config_dir: Path,
    what: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout_s: float,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    document: dict[str, Any] = {}
    while time.monotonic() < deadline:
        result = world.ctl("status", "--json", "--config-dir", str(config_dir), check=False)
        if result.returncode == 0:
            document = json.loads(result.stdout)
            if predicate(document):
                return document
        time.sleep(0.5)
    raise SystemExit(
        f"timed out waiting for {what}; last status:\n{json.dumps(document, indent=2)}"
    )


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
    wait_for(
        world,
        stack.config_dir,
        "every provider and the gateway",
        lambda d: (
            all(p["state"] == "ready" for p in d["providers"])
            and d["gateway"].get("state") == "ready"
            and d["gateway"].get("in_sync")
        ),
        timeout_s=300,
    )
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
    info = {"pid": os.getpid(), "env": client_env(manager.env), "unit_dir": str(manager.unit_dir)}
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
        [sys.executable, "-m", "diversityd.demo", "--keeper", str(root)],
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
        prog="python -m diversityd.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--stay", action="store_true", help="leave the stack up, detached")
    parser.add_argument("--stop", metavar="DIR", type=Path, help="stop a demo left up")
    parser.add_argument("--keeper", metavar="DIR", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.keeper:
        keeper_main(args.keeper)
        return
    if args.stop:
        stop_detached(args.stop)
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
            f"stop it: {sys.executable} -m diversityd.demo --stop {root}"
        )
        return
    tear_down(world, root / "stack")
    shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if drill.returncode == 0 else 1)


if __name__ == "__main__":
    main()
