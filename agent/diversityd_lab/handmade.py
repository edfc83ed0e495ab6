"""The setup diversityd replaces, as the seeds ran it: hand-made user units with
`Restart=on-failure` and nothing else watching them, and a static LiteLLM config.

The servers' command lines and environments are the ones diversityd renders for the same
configuration (`units.server_arguments`, no GPU), except that they name the active GGUF link
itself, as the seeds' units did (diversityd names the file it accepted). The gateway is the
same LiteLLM run the same way (uvicorn, warnings only, no access log) on a port of its own,
with one of two configs:

- `defaults_config`: the names and fallbacks diversityd renders (the chains of
  model-mappings.yaml, which the seeds' generator turned into `fallbacks:`), without any
  timeout, retry, allowed-fails or cooldown setting: LiteLLM's own defaults (the rest, its
  metrics callback and the master key by reference, as rendered: the same gateway);
- `tuned_config`: what `diversityctl render` prints for the configuration, timeouts and
  cooldowns included (what the config buys, without the supervision).
"""

from __future__ import annotations

import copy
import json
import secrets
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diversityd import parts
from diversityd.adapters.files import write_atomic
from diversityd.adapters.litellm import OFFLINE_ENV
from diversityd.catalog import build_catalog
from diversityd.config import load_config
from diversityd.gpuplan import GpuSettings
from diversityd.units import UnitContext, command_line, environment_line, server_arguments
from diversityd_lab.embedded import LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM, Stack
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import StackTimeoutError, run_ctl

# The seeds' unit names (their user's ~/.config/systemd/user).
UNIT_OF = {
    LLAMA_NATIVE: "llama-cpp-native.service",
    LLAMA_PYTHON: "llamacpp-python.service",
    OLLAMA: "ollama.service",
    VLLM: "vllm.service",
}
GATEWAY_UNIT = "litellm.service"
LLAMA_KINDS = ("llama-server", "llama-cpp-python")


def tuned_config(manager: PrivateManager, stack: Stack) -> dict[str, Any]:
    """What `diversityctl render` prints for the stack's configuration, every provider up."""
    result = run_ctl(manager, "render", "--config-dir", str(stack.config_dir), check=True)
    return dict(yaml.safe_load(result.stdout))


def defaults_config(tuned: dict[str, Any]) -> dict[str, Any]:
    """The same names and fallbacks with LiteLLM's defaults: no timeouts, no cooldowns, no
    retry or allowed-fails settings."""
    document = copy.deepcopy(tuned)
    for entry in document["model_list"]:
        entry.pop("model_info", None)
        for key in ("timeout", "stream_timeout"):
            entry["litellm_params"].pop(key, None)
    document["router_settings"] = {"fallbacks": tuned["router_settings"]["fallbacks"]}
    return document


def _context() -> UnitContext:
    return UnitContext(
        home=str(Path.home()),
        templates={},
        default_llama_server=str(parts.llama_server_binary()),
        default_llama_python=str(parts.llama_cpp_python_interpreter()),
        llama_lib_dir=str(parts.llama_bin_dir()),
        python=sys.executable,
    )


def server_units(stack: Stack) -> dict[str, str]:
    """Unit name -> text of one hand-made unit per server of the stack."""
    config, findings = load_config(stack.config_dir)
    if config is None:
        raise ValueError(f"the stack's configuration does not load: {findings}")
    catalog = build_catalog(config)
    context = _context()
    units: dict[str, str] = {}
    for name, owned in config.settings.owned.items():
        llama = owned.server in LLAMA_KINDS
        gpu = GpuSettings(name, n_gpu_layers=0 if llama else None, hide_gpu=llama)
        backend = catalog.backend_names_of(name)
        provider = config.providers[name]
        args, environment = server_arguments(
            owned, provider, backend[0] if backend else name, gpu, context
        )
        environment = {**environment, **owned.environment, "PYTHONUNBUFFERED": "1"}
        if owned.server == "ollama":
            host, port = provider.address
            environment["OLLAMA_HOST"] = f"{host}:{port}"
        units[UNIT_OF[name]] = hand_made_unit(name, args, environment)
    return units


def hand_made_unit(what: str, args: list[str], environment: dict[str, str]) -> str:
    """A unit as the seeds wrote theirs: the command line, its environment, Restart=."""
    lines = [
        "[Unit]",
        f"Description={what} (hand-made, as in the seeds)",
        "",
        "[Service]",
        f"ExecStart={command_line(args)}",
        *(environment_line(k, v) for k, v in sorted(environment.items())),
        "Restart=on-failure",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]
    return "\n".join(lines) + "\n"


def gateway_unit(config_file: Path, port: int, key: str) -> str:
    uvicorn = parts.litellm_venv() / "bin" / "uvicorn"
    args = [
        str(uvicorn), "litellm.proxy.proxy_server:app",
        "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    environment = {**OFFLINE_ENV, "CONFIG_FILE_PATH": str(config_file), "LITELLM_MASTER_KEY": key}
    return hand_made_unit("LiteLLM proxy", args, environment)


def answers(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - loopback
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


@dataclass
class HandmadeStack:
    """The stack's servers and a LiteLLM as hand-made units of one private manager."""

    manager: PrivateManager
    stack: Stack
    gateway_port: int
    key: str
    config_file: Path

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def units(self) -> list[str]:
        return [UNIT_OF[name] for name in self.stack.spec.providers] + [GATEWAY_UNIT]

    def unit(self, provider: str) -> str:
        return UNIT_OF[provider]

    def main_pid(self, unit: str) -> int:
        result = self.manager.systemctl("show", "-p", "MainPID", "--value", unit)
        return int(result.stdout.strip() or "0")

    def serving(self) -> bool:
        """Every server answers `/v1/models` (Ollama `/api/tags`) and the gateway its
        liveliness check."""
        urls = [
            f"{self.stack.base_url(name)}/api/tags"
            if name == OLLAMA
            else f"{self.stack.base_url(name)}/v1/models"
            for name in self.stack.spec.providers
        ]
        urls.append(f"{self.gateway_url}/health/liveliness")
        return all(answers(url) for url in urls)

    def wait_serving(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.serving():
                return
            time.sleep(0.5)
        states = {
            unit: self.manager.systemctl("is-active", unit, check=False).stdout.strip()
            for unit in self.units
        }
        raise StackTimeoutError(f"hand-made stack not serving in {timeout_s} s: {states}")


def start_handmade(
    manager: PrivateManager, stack: Stack, gateway_port: int, *, tuned: bool
) -> HandmadeStack:
    """Write the units and the gateway config (tuned: `diversityctl render`'s, else the
    defaults), start them all (as the user's `systemctl --user enable --now` would)."""
    rendered = tuned_config(manager, stack)
    document = rendered if tuned else defaults_config(rendered)
    config_file = stack.root / "litellm.yaml"
    write_atomic(config_file, yaml.safe_dump(document, sort_keys=False), mode=0o600)
    key = f"sk-{secrets.token_hex(16)}"
    texts = server_units(stack)
    texts[GATEWAY_UNIT] = gateway_unit(config_file, gateway_port, key)
    for name, text in texts.items():
        write_atomic(manager.unit_dir / name, text, mode=0o600)  # holds the master key
    manager.systemctl("daemon-reload")
    running = HandmadeStack(manager, stack, gateway_port, key, config_file)
    manager.systemctl("start", *running.units)
    return running


def describe(document: dict[str, Any]) -> str:
    """A gateway config's timing settings in one line (for the benchmark's notes)."""
    router = {k: v for k, v in document.get("router_settings", {}).items() if k != "fallbacks"}
    timeouts = {
        entry["model_name"]: {
            k: entry["litellm_params"][k]
            for k in ("timeout", "stream_timeout")
            if k in entry["litellm_params"]
        }
        | dict(entry.get("model_info") or {})
        for entry in document["model_list"]
    }
    return json.dumps({"router_settings": router, "per_model": timeouts}, sort_keys=True)
