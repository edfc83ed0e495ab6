"""Adoption and uninstall as systemd sees units (issue 20, point 6), on a real user manager
with the Ollama and vLLM stand-ins (fast), in the error cases the review found:

- a unit file that is a symlink (a dotfile linked in), with `@-` and `\\x20` in ExecStart;
- two hand-made units on one port: the running one is adopted, the other left alone;
- a timer that starts an adopted unit, and a target that `Wants=` it: after adoption
  nothing starts the old unit again (it is masked, the timer stopped);
- a unit of the user's that merely has a diversityd name: never stopped;
- a state_dir of its own, then a diversityd.yaml broken after install: uninstall still
  finds its manifest;

and after `uninstall`, every file is back byte for byte (the symlink as the symlink),
every unit enabled and running as before, on its port.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from diversityd.adapters.discovery import listening_holders
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import free_port, run_ctl
from diversityd_lab.standins.binaries import MODELS_ENV, write_executables

pytestmark = pytest.mark.integration

HAND_MADE = ("vllm.service", "ollama.service", "ollama-old.service", "vllm.timer", "llm.target")


def tree(*roots: Path) -> dict[str, object]:
    seen: dict[str, object] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                seen[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                seen[str(path)] = (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
            elif path.is_dir():
                seen[str(path)] = "dir"
    return seen


def state(manager: PrivateManager, unit: str) -> tuple[str, str]:
    enabled = manager.systemctl("is-enabled", unit, check=False).stdout.strip()
    active = manager.systemctl("is-active", unit, check=False).stdout.strip()
    return enabled, active


def holders(port: int) -> set[str | None]:
    return {h.unit for h in listening_holders([port]).get(port, [])}


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout_s} s")


def serves(port: int, name: str) -> bool:
    response = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
    return response.status_code == 200 and name in response.text


def ctl(manager: PrivateManager, *args: str) -> str:
    result = run_ctl(manager, *args, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def write_world(manager: PrivateManager, root: Path, ports: dict[str, int]) -> Path:
    """The user's units, dotfile and configuration; returns the configuration folder."""
    standins = write_executables(root / "bin", sys.executable)
    dotfiles = root / "dotfiles"
    dotfiles.mkdir()
    (dotfiles / "vllm.service").write_text(
        "[Unit]\nDescription=vLLM, a dotfile linked in\n\n[Service]\n"
        f"ExecStart=@-{standins['vllm']} vllm serve /srv/models/my\\x20model "
        f"--port {ports['vllm']} --served-model-name coder\n"
        "Restart=on-failure\n\n[Install]\nWantedBy=default.target\n"
    )
    (manager.unit_dir / "vllm.service").symlink_to(dotfiles / "vllm.service")
    (manager.unit_dir / "vllm.timer").write_text(
        "[Timer]\nOnUnitActiveSec=1h\nUnit=vllm.service\n\n[Install]\nWantedBy=timers.target\n"
    )
    for name, description in (("ollama.service", "now"), ("ollama-old.service", "before")):
        (manager.unit_dir / name).write_text(
            f"[Unit]\nDescription=Ollama ({description})\n\n[Service]\n"
            f'Environment="OLLAMA_HOST=127.0.0.1:{ports["ollama"]}" '
            f'"{MODELS_ENV}=llama3.1:latest"\n'
            f"ExecStart={standins['ollama']} serve\n\n[Install]\nWantedBy=default.target\n"
        )
    (manager.unit_dir / "llm.target").write_text(
        "[Unit]\nWants=vllm.service ollama.service\n\n[Install]\nWantedBy=default.target\n"
    )
    # the user's own, with a diversityd name: not diversityd's to stop
    (manager.unit_dir / "diversityd-notes.service").write_text(
        "[Service]\nExecStart=/bin/sleep infinity\n"
    )
    config_dir = root / "config"
    config_dir.mkdir()
    providers = {
        "providers": {
            "vllm": {"type": "vllm", "base_url": f"http://127.0.0.1:{ports['vllm']}",
                     "models": ["coder"]},
            "ollama": {"type": "ollama", "base_url": f"http://127.0.0.1:{ports['ollama']}",
                       "models": ["llama3.1:latest"]},
        }
    }  # fmt: skip
    (config_dir / "providers.yaml").write_text(yaml.safe_dump(providers))
    (config_dir / "model-mappings.yaml").write_text(
        yaml.safe_dump(
            {
                "exact_matches": {
                    "coder": {"provider": "vllm"},
                    "llama3.1:latest": {"provider": "ollama"},
                },
                "fallback_chains": {},
            }
        )
    )
    (config_dir / "diversityd.yaml").write_text(
        f"# mine\nstate_dir: {root / 'my-state'}\ngateway: {{owned: false}}\n"
        "http: {port: 0}\nprobes: {interval_s: 0.5, timeout_s: 0.5}\n"
    )
    return config_dir


def test_adopt_and_give_back_as_systemd_sees_units(
    private_manager: PrivateManager, tmp_path: Path
) -> None:
    manager = private_manager
    ports = {"vllm": free_port(), "ollama": free_port()}
    config_dir = write_world(manager, tmp_path, ports)
    manager.systemctl("daemon-reload")
    manager.systemctl("enable", "--now", "vllm.service", "ollama.service", "vllm.timer")
    manager.systemctl("enable", "--now", "llm.target")
    manager.systemctl("start", "diversityd-notes.service")
    wait_until(lambda: serves(ports["vllm"], "coder"), 60, "vllm.service serving")
    wait_until(lambda: serves(ports["ollama"], "llama3.1"), 60, "ollama.service serving")
    roots = (manager.unit_dir, tmp_path / "dotfiles", config_dir)
    before = tree(*roots)
    states = {unit: state(manager, unit) for unit in HAND_MADE}
    assert states["ollama-old.service"] == ("disabled", "inactive")

    # as systemd reads them: the program without `@-`, the model with its space
    dry = ctl(manager, "install", "--dry-run", "--config-dir", str(config_dir))
    assert f"runs {tmp_path / 'bin' / 'vllm'} (as the user manager parsed it)" in dry
    assert "model /srv/models/my model" in dry
    assert "started by vllm.timer too" in dry
    assert "ollama-old.service: left alone: ollama.service (running) serves" in dry
    assert tree(*roots) == before

    ctl(manager, "install", "--adopt", "--now", "--config-dir", str(config_dir))
    assert holders(ports["vllm"]) >= {"diversityd-vllm.service"}
    assert holders(ports["ollama"]) >= {"diversityd-ollama.service"}
    for unit in ("vllm.service", "ollama.service"):
        assert state(manager, unit) == ("masked", "inactive")
    assert state(manager, "vllm.timer") == ("disabled", "inactive")
    assert state(manager, "ollama-old.service") == ("disabled", "inactive")
    # another unit's Wants= starts nothing of the old: it is masked
    manager.systemctl("restart", "llm.target", check=False)
    time.sleep(1)
    assert state(manager, "vllm.service")[1] == "inactive"
    assert holders(ports["vllm"]) == {"diversityd-vllm.service"}
    wait_until(lambda: serves(ports["vllm"], "coder"), 60, "diversityd's vllm serving")

    # the configuration breaks after install; its state_dir of its own is unreadable now
    (config_dir / "diversityd.yaml").write_text("state_dir: [broken\n")
    gone = ctl(manager, "uninstall", "--config-dir", str(config_dir), "--wait", "60")

    assert "uninstalled" in gone
    assert state(manager, "diversityd-notes.service")[1] == "active"  # never stopped
    for unit, was in states.items():
        assert state(manager, unit) == was, unit
    wait_until(lambda: serves(ports["vllm"], "coder"), 60, "vllm.service serving again")
    wait_until(lambda: serves(ports["ollama"], "llama3.1"), 60, "ollama.service serving again")
    assert holders(ports["vllm"]) == {"vllm.service"}
    assert holders(ports["ollama"]) == {"ollama.service"}
    after = tree(*roots)
    settings = str(config_dir / "diversityd.yaml")
    assert after.pop(settings) != before.pop(settings)  # yours since install: kept
    assert after == before  # byte for byte, the symlink a symlink
    loaded = manager.systemctl("list-units", "--all", "--plain", "--no-legend", "diversityd-*")
    assert [line.split()[0] for line in loaded.stdout.splitlines()] == ["diversityd-notes.service"]
