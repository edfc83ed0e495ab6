"""Running diversityd for real: as `diversityd.service` in a private systemd --user manager,
owning real llama servers, driven with the real `diversityctl`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from diversityd import parts
from diversityd.adapters.unitfiles import load_templates
from diversityd.embedded import Stack, StackSpec, write_stack
from diversityd.privatemanager import PrivateManager
from diversityd.units import DAEMON_UNIT, UnitContext
from tests.conftest import free_port


def daemon_unit_context() -> UnitContext:
    return UnitContext(
        home=str(Path.home()),
        templates=load_templates(),
        default_llama_server=str(parts.llama_server_binary()),
        default_llama_python=str(parts.llama_cpp_python_interpreter()),
        llama_lib_dir=str(parts.llama_bin_dir()),
        python=sys.executable,
    )


@dataclass
class RunningStack:
    manager: PrivateManager
    stack: Stack

    def ctl(
        self, *args: str, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """The real diversityctl, talking to this manager's bus."""
        return subprocess.run(
            [sys.executable, "-m", "diversityd.cli", *args],
            env=ctl_env(self.manager),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

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
        pytest.fail(f"condition not met in {timeout_s} s; last status: {json.dumps(summary)}")

    def wait_all_ready(self, timeout_s: float = 60) -> dict[str, Any]:
        return self.wait_for(
            lambda d: (
                d["daemon"].get("running") and all(p["state"] == "ready" for p in d["providers"])
            ),
            timeout_s,
        )

    def journal_events(self, event: str, **fields: str) -> list[dict[str, Any]]:
        matches = [f"EVENT={event}", *(f"{k.upper()}={v}" for k, v in fields.items())]
        return self.manager.journal(*matches, unit=DAEMON_UNIT)


def ctl_env(manager: PrivateManager) -> dict[str, str]:
    """The manager's world, plus where the parts really are (its XDG cache is private)."""
    return {
        **manager.env,
        "DIVERSITYD_CACHE_DIR": str(parts.cache_root()),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }


def start_stack(manager: PrivateManager, root: Path, spec: StackSpec | None = None) -> RunningStack:
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


@pytest.fixture(scope="module")
def running_stack(
    shared_private_manager: PrivateManager,
    tmp_path_factory: pytest.TempPathFactory,
    llama_server_bin: Path,
    llama_cpp_python_interpreter: Path,
) -> Iterator[RunningStack]:
    running = start_stack(shared_private_manager, tmp_path_factory.mktemp("stack"))
    try:
        running.wait_all_ready(timeout_s=90)
        yield running
    finally:
        shared_private_manager.systemctl("stop", DAEMON_UNIT, check=False)
