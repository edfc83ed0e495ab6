"""The three arms of bench/failover.py behind one face, each in a private systemd --user
manager of its own with the same servers on ports of its own:

- `litellm_alone`: the servers and LiteLLM as hand-made units (`Restart=on-failure`), a
  static config with the fallbacks and LiteLLM's defaults (handmade.defaults_config);
- `litellm_tuned`: the same with the config `diversityctl render` prints (timeouts,
  cooldowns);
- `diversityd`: the embedded stack owned by diversityd, the gateway its blue/green one.

An arm says where its gateway is, which unit runs a provider, how the user re-points the
GGUF link (diversityd follows the link; the seeds restarted their servers by hand), and
when it is steady again after a fault.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from diversityd import config as product_config
from diversityd.adapters.litellm import read_master_key
from diversityd.units import DAEMON_UNIT, unit_name
from diversityd_lab.embedded import (
    LLAMA_NATIVE,
    LLAMA_PYTHON,
    OLLAMA,
    VLLM,
    Stack,
    StackSpec,
    point_link,
    write_stack,
)
from diversityd_lab.handmade import HandmadeStack, start_handmade
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.procstat import find_pids
from diversityd_lab.stack import RunningStack, StackTimeoutError, free_port, start_stack

PROVIDERS = (LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM)
ARM_NAMES = ("litellm_alone", "litellm_tuned", "diversityd")
MODELS = ("tiny-a.gguf", "tiny-b.gguf")


def hung_grace_known() -> bool:
    """Whether this diversityd reads `supervision.hung_grace_s` (kills a hung server)."""
    return "hung_grace_s" in getattr(product_config, "_SUPERVISION_KEYS", ())


class Arm:
    name: str
    manager: PrivateManager
    stack: Stack
    gateway_url: str
    key: str
    kills_hung: bool = False  # whether the arm itself kills a hung server

    def unit(self, provider: str) -> str:
        raise NotImplementedError

    def repoint(self, target: str) -> None:
        raise NotImplementedError

    def steady(self) -> bool:
        raise NotImplementedError

    def gateway_process(self, command_line: str) -> bool:
        """Whether a process (by its command line) is one of this arm's gateway instances."""
        raise NotImplementedError

    def reloads(self) -> int:
        return 0

    def repair_routing(self) -> str:
        """Make the gateway route as its configuration says again; says what it did."""
        return ""

    def reload_events(self) -> list[tuple[float, float]]:
        """Gateway reloads: (the new instance started, it served: READY=1 and the switch),
        CLOCK_MONOTONIC seconds."""
        return []

    def main_pid(self, provider: str) -> int:
        result = self.manager.systemctl("show", "-p", "MainPID", "--value", self.unit(provider))
        return int(result.stdout.strip() or "0")

    def other_model(self) -> str:
        """The tiny model the active link does not point at."""
        current = Path(os.readlink(self.stack.active_link)).name
        return MODELS[1] if current == MODELS[0] else MODELS[0]

    def wait_steady(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.steady():
                return
            time.sleep(1)
        raise StackTimeoutError(f"{self.name}: not steady in {timeout_s} s")

    def forgive(self) -> None:
        """Each fault counts against a unit's start limit; a benchmark is not a crash loop."""
        units = [self.unit(p) for p in PROVIDERS]
        self.manager.systemctl("reset-failed", *units, check=False)


class HandmadeArm(Arm):
    def __init__(self, name: str, handmade: HandmadeStack) -> None:
        self.name, self.handmade = name, handmade
        self.manager, self.stack = handmade.manager, handmade.stack
        self.gateway_url, self.key = handmade.gateway_url, handmade.key

    def unit(self, provider: str) -> str:
        return self.handmade.unit(provider)

    def repoint(self, target: str) -> None:
        """As the seeds did: the link moved, then each llama server restarted by hand."""
        point_link(self.stack.active_link, f"../{target}")
        for provider in (LLAMA_NATIVE, LLAMA_PYTHON):
            self.manager.systemctl("restart", self.unit(provider))

    def steady(self) -> bool:
        return self.handmade.serving()

    def gateway_process(self, command_line: str) -> bool:
        return "litellm.proxy.proxy_server:app" in command_line and (
            f"--port {self.handmade.gateway_port}" in command_line
        )


class DiversitydArm(Arm):
    def __init__(self, running: RunningStack, *, kills_hung: bool) -> None:
        self.name, self.running = "diversityd", running
        assert isinstance(running.manager, PrivateManager)
        self.manager, self.stack = running.manager, running.stack
        self.gateway_url = f"http://127.0.0.1:{running.stack.spec.ports['gateway']}"
        self.key = ""
        self.kills_hung = kills_hung

    def unit(self, provider: str) -> str:
        return unit_name(provider)

    def repoint(self, target: str) -> None:
        point_link(self.stack.active_link, f"../{target}")

    def status(self) -> dict[str, Any]:
        return self.running.status()

    def steady(self) -> bool:
        """Every provider ready, no job running, the gateway ready and in sync, and one
        gateway instance alive (none starting, none draining)."""
        document = self.status()
        gateway = document["gateway"]
        return bool(
            document["daemon"].get("running")
            and not document["daemon"].get("jobs_running")
            and all(p["state"] == "ready" for p in document["providers"])
            and gateway.get("state") == "ready"
            and gateway.get("in_sync")
            and len(find_pids(self.gateway_process)) == 1
        )

    def reloads(self) -> int:
        return int(self.status()["gateway"].get("reloads") or 0)

    def repair_routing(self) -> str:
        """A gateway instance serving another config than the daemon says: restarted (a
        proxy reads its config file, which the daemon keeps current, at start)."""
        unit = str(self.status()["gateway"]["unit"])
        self.manager.systemctl("restart", unit, timeout=240)
        return f"restarted {unit}"

    def reload_events(self) -> list[tuple[float, float]]:
        def when(entry: Mapping[str, Any]) -> float:
            return int(entry["__MONOTONIC_TIMESTAMP"]) / 1e6

        starts = sorted(when(e) for e in self.running.journal_events("gateway.reloading"))
        ends = sorted(
            when(e)
            for event in ("gateway.reloaded", "gateway.reload_failed")
            for e in self.running.journal_events(event)
        )
        pairs = []
        for start in starts:
            end = next((t for t in ends if t >= start), None)
            if end is not None:
                pairs.append((start, end))
        return pairs

    def gateway_process(self, command_line: str) -> bool:
        state = str(self.stack.root / "state")
        return "gatewaylauncher.py" in command_line and state in command_line


def _spec(manager: PrivateManager, extra: Mapping[str, Any]) -> StackSpec:
    return StackSpec(
        ports={**{name: free_port() for name in PROVIDERS}, "gateway": free_port()},
        providers=PROVIDERS,
        unit_dir=manager.unit_dir,
        extra_settings=extra,
    )


@contextlib.contextmanager
def open_arms(
    names: Sequence[str], hung_grace_s: float, log: Callable[[str], None]
) -> Iterator[dict[str, Arm]]:
    """The arms set up side by side (each its own private manager); torn down after."""
    root = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    managers: list[PrivateManager] = []
    try:
        arms: dict[str, Arm] = {}
        handmade: dict[str, HandmadeStack] = {}
        for name in names:
            manager = PrivateManager(root / f"{name}-pm")
            manager.start()
            managers.append(manager)
            if name == "diversityd":
                kills_hung = hung_grace_known()
                extra = {"supervision": {"hung_grace_s": hung_grace_s}} if kills_hung else {}
                running = start_stack(manager, root / name, _spec(manager, extra))
                arms[name] = DiversitydArm(running, kills_hung=kills_hung)
            else:
                spec = _spec(manager, {})
                stack = write_stack(root / name, spec)
                handmade[name] = start_handmade(
                    manager, stack, spec.ports["gateway"], tuned=name == "litellm_tuned"
                )
                arms[name] = HandmadeArm(name, handmade[name])
            log(f"{name}: started")
        for arm in arms.values():
            arm.wait_steady(timeout_s=300)
            if isinstance(arm, DiversitydArm):
                arm.key = read_master_key(Path(arm.status()["gateway"]["key_file"]))
            log(f"{arm.name}: steady")
        yield arms
        for manager in managers:
            manager.systemctl("stop", DAEMON_UNIT, check=False)
    finally:
        for manager in reversed(managers):
            manager.stop()
        shutil.rmtree(root, ignore_errors=True)
