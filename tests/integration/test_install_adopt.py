"""Install over hand-made units, and back (the seeds' migration).

A scratch home (a private `systemd --user`) runs the user's own units as the seeds describe
them: llama-server (`llama-cpp-native.service`, a fixed `--n-gpu-layers`), the
llama-cpp-python server (`llamacpp-python.service`, a token in its Environment=) and LiteLLM
(`litellm.service`, its master key in Environment=), enabled and running on free ports.
`install --dry-run` names each and writes nothing; `install --adopt --now` takes them over
on the same ports; `uninstall` gives them back byte for byte, enabled, running, on their
ports, and leaves no `diversityd*` unit.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from diversityd import parts
from diversityd.adapters.discovery import listening_holders
from diversityd.adapters.litellm import OFFLINE_ENV
from diversityd_lab.embedded import (
    LLAMA_NATIVE,
    LLAMA_PYTHON,
    SERVED_NAMES,
    StackSpec,
    mappings_document,
    providers_document,
    write_tiny_models,
)
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import free_port, run_ctl
from tests.conftest import unavailable

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MASTER_KEY = "sk-handmade-0123456789abcdefghijklmn"
HF_TOKEN = "hf_HandMadeToken0123456789abcdefghij"
HAND_MADE = ("llama-cpp-native.service", "llamacpp-python.service", "litellm.service")


def write_hand_made_units(
    manager: PrivateManager, root: Path, ports: dict[str, int], litellm_python: Path
) -> Path:
    """The user's own units and LiteLLM config; returns the config dir (providers.yaml,
    model-mappings.yaml and a diversityd.yaml of their own, without `providers:`)."""
    library_dir = parts.llama_bin_dir()
    if not (library_dir / "libllama.so").exists():
        unavailable(f"{library_dir}/libllama.so missing: run packaging/build-llama-server.sh")
    write_tiny_models(root / "models")
    link = root / "models" / "active" / "current.gguf"
    litellm_bin = litellm_python.parent / "litellm"
    litellm_config = root / "routing" / "litellm.yaml"
    litellm_config.parent.mkdir(parents=True)
    litellm_config.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": name,
                        "litellm_params": {
                            "model": f"openai/{name}",
                            "api_base": f"http://127.0.0.1:{ports[provider]}/v1",
                            "api_key": "none",
                        },
                    }
                    for provider, name in SERVED_NAMES.items()
                ],
                "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
            }
        )
    )
    offline = " ".join(f"{name}={value}" for name, value in OFFLINE_ENV.items())
    units = {
        "llama-cpp-native.service": f"""\
[Unit]
Description=llama.cpp native server (hand-made)

[Service]
ExecStart={parts.llama_server_binary()} \\
    --model {link} \\
    --alias {SERVED_NAMES[LLAMA_NATIVE]} \\
    --host 127.0.0.1 \\
    --port {ports[LLAMA_NATIVE]} \\
    --ctx-size 512 \\
    --n-gpu-layers 40 \\
    --threads 1 \\
    --parallel 2
Restart=always

[Install]
WantedBy=default.target
""",
        "llamacpp-python.service": f"""\
[Unit]
Description=llama-cpp-python server (hand-made)

[Service]
Environment=PYTHONUNBUFFERED=1 LLAMA_CPP_LIB_PATH={library_dir} MTMD_CPP_LIB={library_dir}
Environment="HF_TOKEN={HF_TOKEN}"
ExecStart={parts.llama_cpp_python_interpreter()} -m llama_cpp.server \\
    --model {link} --model_alias {SERVED_NAMES[LLAMA_PYTHON]} \\
    --host 127.0.0.1 --port {ports[LLAMA_PYTHON]} --n_ctx 256 --n_threads 1 --n_gpu_layers 40
Restart=on-failure

[Install]
WantedBy=default.target
""",
        "litellm.service": f"""\
[Unit]
Description=LiteLLM gateway (hand-made)

[Service]
WorkingDirectory={litellm_config.parent}
Environment=PYTHONUNBUFFERED=1 {offline}
Environment="LITELLM_MASTER_KEY={MASTER_KEY}"
ExecStart={litellm_bin} --config litellm.yaml --port {ports["gateway"]}
Restart=on-failure

[Install]
WantedBy=default.target
""",
    }
    for name, text in units.items():
        (manager.unit_dir / name).write_text(text)
    config_dir = root / "config"
    config_dir.mkdir()
    spec = StackSpec(ports=ports)
    (config_dir / "providers.yaml").write_text(yaml.safe_dump(providers_document(spec)))
    (config_dir / "model-mappings.yaml").write_text(yaml.safe_dump(mappings_document(spec)))
    (config_dir / "diversityd.yaml").write_text(
        "# mine\nhost: scratch\nprobes: {interval_s: 0.5, timeout_s: 0.5}\n"
    )
    return config_dir


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail(f"{what}: not within {timeout_s} s")


def serves(port: int, name: str) -> bool:
    response = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
    return response.status_code == 200 and name in response.text


def gateway_answers(port: int) -> bool:
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    response = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers, timeout=5)
    return response.status_code == 200 and SERVED_NAMES[LLAMA_NATIVE] in response.text


def wait_serving(ports: dict[str, int], timeout_s: float) -> None:
    for provider, name in SERVED_NAMES.items():
        wait_until(lambda p=ports[provider], n=name: serves(p, n), timeout_s, f"{name} serving")
    wait_until(lambda: gateway_answers(ports["gateway"]), timeout_s, "the gateway answering")


def tree(*roots: Path) -> dict[str, object]:
    """Every file (bytes, mode) and symlink (target) under the roots."""
    seen: dict[str, object] = {}
    for root in roots:
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                seen[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                seen[str(path)] = (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
            elif path.is_dir():
                seen[str(path)] = "dir"
    return seen


def unit_state(manager: PrivateManager, unit: str) -> tuple[str, str]:
    enabled = manager.systemctl("is-enabled", unit, check=False).stdout.strip()
    active = manager.systemctl("is-active", unit, check=False).stdout.strip()
    return enabled, active


def holders(port: int) -> set[str | None]:
    return {h.unit for h in listening_holders([port]).get(port, [])}


def ctl(manager: PrivateManager, *args: str, timeout: float = 300) -> str:
    result = run_ctl(manager, *args, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_adopt_hand_made_units_and_give_them_back(
    private_manager: PrivateManager,
    tmp_path: Path,
    llama_server_bin: Path,
    llama_cpp_python_interpreter: Path,
    litellm_python: Path,
) -> None:
    manager = private_manager
    ports = {LLAMA_NATIVE: free_port(), LLAMA_PYTHON: free_port(), "gateway": free_port()}
    config_dir = write_hand_made_units(manager, tmp_path, ports, litellm_python)
    manager.systemctl("daemon-reload")
    manager.systemctl("enable", "--now", *HAND_MADE)
    wait_serving(ports, 120)
    state_dir = manager.root / "state"
    before = tree(manager.unit_dir, config_dir, state_dir)
    originals = {name: (manager.unit_dir / name).read_bytes() for name in HAND_MADE}

    # The dry run names each unit and what becomes of it, and writes nothing.
    dry = ctl(manager, "install", "--dry-run", "--config-dir", str(config_dir))
    for name in HAND_MADE:
        assert name in dry
    assert "--n-gpu-layers 40" in dry
    assert "n_gpu_layers: auto" in dry
    assert "diversityd-llama_cpp_native.service" in dry
    assert "diversityd-gateway.socket" in dry
    assert "HF_TOKEN" in dry  # its name, in the list of secrets
    for secret in (HF_TOKEN, MASTER_KEY):
        assert secret not in dry
    assert tree(manager.unit_dir, config_dir, state_dir) == before

    # Adopted: diversityd's units serve on the same ports; the old ones are stopped.
    ctl(manager, "install", "--adopt", "--now", "--config-dir", str(config_dir), timeout=600)
    for name in HAND_MADE:
        # masked: no other unit's Wants=, no socket or timer starts it again (issue 20)
        assert unit_state(manager, name) == ("masked", "inactive")
    assert holders(ports[LLAMA_NATIVE]) >= {"diversityd-llama_cpp_native.service"}
    assert holders(ports[LLAMA_PYTHON]) >= {"diversityd-llama_cpp_python.service"}
    wait_serving(ports, 180)  # the gateway: the same key, the models of providers.yaml
    settings_text = (config_dir / "diversityd.yaml").read_text()
    settings = yaml.safe_load(settings_text)
    assert settings["host"] == "scratch"  # theirs, kept
    assert settings["providers"][LLAMA_NATIVE]["n_gpu_layers"] == "auto"
    assert settings["gateway"]["port"] == ports["gateway"]
    for secret in (HF_TOKEN, MASTER_KEY):
        assert secret not in settings_text
        for unit_file in manager.unit_dir.rglob("diversityd*"):
            if unit_file.is_file():
                assert secret not in unit_file.read_text()
    key_file = Path(settings["gateway"]["master_key_file"])
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    env_file = config_dir / "env" / "llamacpp-python.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert HF_TOKEN in env_file.read_text()

    # Clients keep the key they had, and find it with `diversityctl env`.
    exports = ctl(manager, "env", "--show-key", "--config-dir", str(config_dir))
    assert f"export OPENAI_BASE_URL=http://127.0.0.1:{ports['gateway']}/v1" in exports
    assert f"export OPENAI_API_KEY={MASTER_KEY}" in exports

    # Idempotent: a second install changes nothing it wrote.
    again = ctl(manager, "install", "--config-dir", str(config_dir))
    assert "diversityd.service (unchanged)" in again

    # After an upgrade that changed the daemon's template, install re-renders its unit and
    # restarts the running daemon on it (the servers keep serving).
    daemon_unit = manager.unit_dir / "diversityd.service"
    rendered = daemon_unit.read_bytes()
    daemon_unit.write_bytes(rendered.replace(b"WatchdogSec=10", b"WatchdogSec=20"))
    manager.systemctl("daemon-reload")
    pid = manager.systemctl("show", "-p", "MainPID", "--value", "diversityd.service").stdout
    upgraded = ctl(manager, "install", "--config-dir", str(config_dir))
    assert "diversityd.service (changed); diversityd.service restarted" in upgraded
    assert daemon_unit.read_bytes() == rendered
    assert manager.systemctl("show", "-p", "MainPID", "--value", "diversityd.service").stdout != pid
    wait_serving(ports, 60)

    # Given back: the same files, enabled, running, on their ports; no diversityd unit.
    install_dir = state_dir / "diversityd" / "install"  # beside the running daemon's state
    adopted = tree(manager.unit_dir, config_dir, install_dir)
    dry = ctl(manager, "uninstall", "--dry-run", "--config-dir", str(config_dir))
    for name in HAND_MADE:
        assert f"{name}: gone; put back from the backup, unmasked; enabled, active again" in dry
    assert tree(manager.unit_dir, config_dir, install_dir) == adopted
    ctl(manager, "uninstall", "--config-dir", str(config_dir), timeout=600)
    for name in HAND_MADE:
        assert (manager.unit_dir / name).read_bytes() == originals[name]
        assert unit_state(manager, name) == ("enabled", "active")
    wait_serving(ports, 120)
    assert holders(ports[LLAMA_NATIVE]) == {"llama-cpp-native.service"}
    assert holders(ports[LLAMA_PYTHON]) == {"llamacpp-python.service"}
    assert "litellm.service" in holders(ports["gateway"])
    assert not list(manager.unit_dir.rglob("diversityd*"))
    loaded = manager.systemctl("list-units", "--all", "--plain", "--no-legend", "diversityd*")
    assert loaded.stdout.strip() == ""
    assert tree(manager.unit_dir, config_dir) == {
        path: value for path, value in before.items() if not path.startswith(str(state_dir))
    }
