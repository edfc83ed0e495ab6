"""One running stack for the demo's checks, the tests and the benchmarks: diversityd as
`diversityd.service` in a systemd --user manager (a private one, usually), owning the
embedded stack, driven with the real `diversityctl`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from diversityd import parts
from diversityd.units import DAEMON_UNIT
from diversityd_lab.embedded import Stack, StackSpec, free_port, write_stack
from diversityd_lab.netns import enter_preexec
from diversityd_lab.privatemanager import PrivateManager

__all__ = [
    "LOCAL",
    "RunningStack",
    "StackTimeoutError",
    "UserManager",
    "ctl_env",
    "free_port",
    "mapped_models",
    "run_ctl",
    "start_stack",
    "temporary_stack",
]


class UserManager(Protocol):
    """Where the stack's units run: a PrivateManager, or (the demo) the host's own."""

    env: dict[str, str]
    unit_dir: Path
    netns: str | None  # the network namespace its units run in (None: the machine's own)

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]: ...


LOCAL = ("llama_cpp", "ollama", "vllm")  # probed; a cloud is not (it would cost)


class StackTimeoutError(AssertionError):
    """A condition on the stack's status was not met in time (a test failure)."""


def mapped_models(pid: int) -> set[str]:
    """The GGUF files a server process has mapped: what it really serves."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {Path(line.split()[-1]).name for line in maps.splitlines() if line.endswith(".gguf")}


def ctl_env(manager: UserManager) -> dict[str, str]:
    """The manager's world, plus where the parts really are (its XDG cache is private)."""
    return {
        **manager.env,
        "DIVERSITYD_CACHE_DIR": str(parts.cache_root()),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }


def run_ctl(
    manager: UserManager, *args: str, timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """The real diversityctl (this interpreter's), talking to the manager's bus, from the
    manager's network namespace (its probes and install's look at the ports are made there)."""
    return subprocess.run(
        [sys.executable, "-m", "diversityd.cli", *args],
        env=ctl_env(manager),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        preexec_fn=enter_preexec(manager.netns) if manager.netns else None,
    )


@dataclass
class RunningStack:
    manager: UserManager
    stack: Stack

    def ctl(
        self, *args: str, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """The real diversityctl, talking to this manager's bus."""
        return run_ctl(self.manager, *args, timeout=timeout, check=check)

    def status(self) -> dict[str, Any]:
        result = self.ctl("status", "--json", "--config-dir", str(self.stack.config_dir))
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    def provider(self, name: str, document: Mapping[str, Any] | None = None) -> dict[str, Any]:
        document = document or self.status()
        (entry,) = [p for p in document["providers"] if p["name"] == name]
        return dict(entry)

    def unit_property(self, unit: str, prop: str) -> str:
        result = self.manager.systemctl("show", "-p", prop, "--value", unit)
        return result.stdout.strip()

    def daemon_pid(self) -> int:
        return int(self.unit_property(DAEMON_UNIT, "MainPID"))

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout_s: float = 60,
        poll_s: float = 0.1,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        document: dict[str, Any] = {}
        while time.monotonic() < deadline:
            result = self.ctl("status", "--json", "--config-dir", str(self.stack.config_dir))
            if result.returncode == 0:
                document = json.loads(result.stdout)
                if predicate(document):
                    return document
            time.sleep(poll_s)
        summary = {
            "daemon": document.get("daemon"),
            "gateway": document.get("gateway"),
            "providers": {
                p["name"]: (p["state"], p["pid"], p["error"]) for p in document.get("providers", [])
            },
        }
        raise StackTimeoutError(
            f"condition not met in {timeout_s} s; last status: {json.dumps(summary)}"
        )

    def wait_all_ready(self, timeout_s: float = 60) -> dict[str, Any]:
        return self.wait_for(
            lambda d: (
                d["daemon"].get("running")
                and all(p["state"] == "ready" for p in d["providers"] if p["type"] in LOCAL)
            ),
            timeout_s,
        )

    def journal_events(self, event: str, **fields: str) -> list[dict[str, Any]]:
        if not isinstance(self.manager, PrivateManager):
            raise TypeError("journal events are read from a private manager's journal")
        matches = [f"EVENT={event}", *(f"{k.upper()}={v}" for k, v in fields.items())]
        return self.manager.journal(*matches, unit=DAEMON_UNIT)


def start_stack(manager: UserManager, root: Path, spec: StackSpec | None = None) -> RunningStack:
    """Write the stack and `diversityctl install --now` the daemon into the manager."""
    spec = spec or StackSpec(
        ports={"llama_cpp_native": free_port(), "llama_cpp_python": free_port()},
        unit_dir=manager.unit_dir,
    )
    stack = write_stack(root, spec)
    running = RunningStack(manager, stack)
    result = running.ctl("install", "--config-dir", str(stack.config_dir), "--now")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (manager.unit_dir / "default.target.wants" / DAEMON_UNIT).is_symlink()
    return running


@contextlib.contextmanager
def temporary_stack(
    prefix: str, make_spec: Callable[[PrivateManager], StackSpec] | None = None
) -> Iterator[RunningStack]:
    """A private manager running the embedded stack and diversityd, every provider ready;
    afterwards everything is stopped and the temporary folder removed."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    manager = PrivateManager(root / "pm")
    manager.start()
    try:
        spec = make_spec(manager) if make_spec is not None else None
        running = start_stack(manager, root / "stack", spec)
        running.wait_all_ready(timeout_s=120)
        yield running
        manager.systemctl("stop", DAEMON_UNIT, check=False)
    finally:
        manager.stop()
        shutil.rmtree(root, ignore_errors=True)
