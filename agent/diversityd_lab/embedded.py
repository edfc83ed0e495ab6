"""The embedded default: a complete small stack the demo and the integration tests run.

Writes, under one root: a tiny GGUF behind an active symlink (`models/active/current.gguf`),
and a configuration directory owning llama-server and the llama-cpp-python server (the v1.7.1
shape: the latter has no `models:`, its name comes from `exact_matches`), optionally the
Ollama and vLLM stand-ins and the gateway. Ports are parameters, so tests run side by side.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diversityd import parts
from diversityd.adapters.files import write_atomic
from diversityd_lab.ggufwriter import Geometry, write_gguf
from diversityd_lab.standins.binaries import MODELS_ENV, write_executables

LLAMA_NATIVE = "llama_cpp_native"
LLAMA_PYTHON = "llama_cpp_python"
OLLAMA = "ollama"
VLLM = "vllm"
# A paid cloud's stand-in (the vLLM stand-in recording every request), last in two chains:
# nothing but a client's request whose every local server is down may ever reach it.
PAID = "paid_cloud"
PAID_MODEL = "paid-model"
PAID_KEY_ENV = "PAID_CLOUD_KEY"
PAID_KEY = "sk-lab-paid-cloud-key-0123456789"
# The name each llama server answers to (its --alias / --model_alias).
SERVED_NAMES = {LLAMA_NATIVE: "llama-cpp-native", LLAMA_PYTHON: "llama-cpp-default"}


@dataclass(frozen=True)
class StackSpec:
    ports: Mapping[str, int]  # provider name (and "gateway") -> port
    providers: tuple[str, ...] = (LLAMA_NATIVE, LLAMA_PYTHON)
    unit_dir: Path | None = None
    probe_interval_s: float = 0.5
    probe_timeout_s: float = 0.5
    llama_server: Path = field(default_factory=parts.llama_server_binary)
    llama_python: Path = field(default_factory=parts.llama_cpp_python_interpreter)
    llama_lib_dir: Path = field(default_factory=parts.llama_bin_dir)
    python: str = sys.executable  # runs the Ollama and vLLM stand-ins
    standin_executables: Mapping[str, Path] = field(default_factory=dict)
    extra_settings: Mapping[str, Any] = field(default_factory=dict)
    gateway_host: str | None = None  # the gateway's listen address (default: 127.0.0.1)


@dataclass(frozen=True)
class Stack:
    root: Path
    config_dir: Path
    models_dir: Path
    active_link: Path
    spec: StackSpec

    def base_url(self, provider: str) -> str:
        return f"http://127.0.0.1:{self.spec.ports[provider]}"

    @property
    def paid_record(self) -> Path:
        """Every request the paid cloud's stand-in got, one JSON line each."""
        return self.root / "paid-requests.jsonl"

    def paid_requests(self) -> list[dict[str, Any]]:
        if not self.paid_record.exists():
            return []
        return [json.loads(line) for line in self.paid_record.read_text().splitlines() if line]

    def paid_cloud_command(self) -> list[str]:
        """The paid cloud's stand-in (run by the test or benchmark, not by diversityd)."""
        return [
            self.spec.python, "-m", "diversityd_lab.standins.vllm",
            "--port", str(self.spec.ports[PAID]),
            "--served-model-name", PAID_MODEL,
            "--record", str(self.paid_record),
        ]  # fmt: skip

    def llama_endpoints(self) -> list[tuple[str, str]]:
        """(base URL, served name) of each llama server in the stack."""
        return [
            (self.base_url(name), alias)
            for name, alias in SERVED_NAMES.items()
            if name in self.spec.providers
        ]


def write_tiny_models(models_dir: Path) -> tuple[Path, Path]:
    """Two tiny GGUFs (different seeds: re-pointing the link changes what is served) and
    the active symlink `active/current.gguf -> ../tiny-a.gguf`."""
    first = write_gguf(models_dir / "tiny-a.gguf", Geometry(name="tiny-a"), seed=1)
    second = write_gguf(models_dir / "tiny-b.gguf", Geometry(name="tiny-b"), seed=2)
    active = models_dir / "active"
    active.mkdir(parents=True, exist_ok=True)
    link = active / "current.gguf"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path("..") / first.name)
    return first, second


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def point_link(link: Path, target: str) -> None:
    """Re-point the active link as `ln -sfn` does: a new link renamed over the old one, so
    a reader sees the old target or the new, never none. `target` is relative to the link's
    folder (e.g. `../tiny-b.gguf`) or absolute."""
    temporary = link.with_name(f"{link.name}.new")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    os.replace(temporary, link)


def write_truncated_model(models_dir: Path, name: str = "truncated.gguf") -> Path:
    """Half of a good GGUF: the header promises tensors the file does not hold."""
    data = (models_dir / "tiny-b.gguf").read_bytes()
    path = models_dir / name
    path.write_bytes(data[: len(data) // 2])
    return path


def providers_document(spec: StackSpec) -> dict[str, Any]:
    providers: dict[str, Any] = {}
    if LLAMA_NATIVE in spec.providers:
        providers[LLAMA_NATIVE] = {
            "type": "llama_cpp",
            "base_url": f"http://127.0.0.1:{spec.ports[LLAMA_NATIVE]}",
            "status": "active",
            "models": [{"name": "llama-cpp-native", "description": "tiny GGUF, llama-server"}],
        }
    if LLAMA_PYTHON in spec.providers:
        # No `models:`: served from exact_matches, as in routing v1.7.1.
        providers[LLAMA_PYTHON] = {
            "type": "llama_cpp",
            "base_url": f"http://127.0.0.1:{spec.ports[LLAMA_PYTHON]}",
            "status": "active",
        }
    if OLLAMA in spec.providers:
        providers[OLLAMA] = {
            "type": "ollama",
            "base_url": f"http://127.0.0.1:{spec.ports[OLLAMA]}",
            "status": "active",
            "models": ["llama3.1:latest", "qwen2.5-coder:7b"],
        }
    if PAID in spec.providers:
        providers[PAID] = {
            "type": "openai_compatible",
            "base_url": f"http://127.0.0.1:{spec.ports[PAID]}/v1",
            "status": "active",
            "api_key_env": PAID_KEY_ENV,
            "models": [PAID_MODEL],
        }
    if VLLM in spec.providers:
        providers[VLLM] = {
            "type": "vllm",
            "base_url": f"http://127.0.0.1:{spec.ports[VLLM]}",
            "status": "active",
            "models": [{"name": "qwen-coder-vllm", "model": "Qwen/Qwen2.5-Coder-7B-Instruct-AWQ"}],
        }
    return {"providers": providers}


def mappings_document(spec: StackSpec) -> dict[str, Any]:
    have = set(spec.providers)
    exact: dict[str, Any] = {}
    chains: dict[str, Any] = {}
    if LLAMA_PYTHON in have:
        exact["llama-cpp-default"] = {"provider": LLAMA_PYTHON, "priority": "primary"}
        if LLAMA_NATIVE in have:
            chains["llama-cpp-default"] = {"chain": ["llama-cpp-native"]}
    if LLAMA_NATIVE in have:
        chains["llama-cpp-native"] = {"chain": ["qwen-coder-vllm"] if VLLM in have else []}
    if VLLM in have:
        chains["qwen-coder-vllm"] = {"chain": []}
    if PAID in have:
        for name in ("llama-cpp-native", "llama-cpp-default"):
            if name in chains:
                chains[name]["chain"].append(PAID_MODEL)
    if OLLAMA in have:
        chains["llama3.1:latest"] = {
            "chain": _present(have, ("llama-cpp-default", LLAMA_PYTHON), ("qwen-coder-vllm", VLLM))
        }
        chains["qwen2.5-coder:7b"] = {
            "chain": _present(have, ("qwen-coder-vllm", VLLM), ("llama-cpp-native", LLAMA_NATIVE))
        }
    document: dict[str, Any] = {}
    if exact:
        document["exact_matches"] = exact
    document["fallback_chains"] = chains
    return document


def _present(have: set[str], *candidates: tuple[str, str]) -> list[str]:
    """The model names whose provider is part of the stack, in order."""
    return [model for model, provider in candidates if provider in have]


def settings_document(spec: StackSpec, active_link: Path, state_dir: Path) -> dict[str, Any]:
    owned: dict[str, Any] = {}
    if LLAMA_NATIVE in spec.providers:
        owned[LLAMA_NATIVE] = {
            "server": "llama-server",
            "executable": str(spec.llama_server),
            "model_path": str(active_link),
            "ctx": 256,
            "parallel": 2,
            "threads": 1,
        }
    if LLAMA_PYTHON in spec.providers:
        owned[LLAMA_PYTHON] = {
            "server": "llama-cpp-python",
            "executable": str(spec.llama_python),
            "model_path": str(active_link),
            "ctx": 256,
            "parallel": 1,
            "threads": 1,
            "environment": {"LLAMA_CPP_LIB_PATH": str(spec.llama_lib_dir)},
        }
    if OLLAMA in spec.providers and OLLAMA in spec.standin_executables:
        owned[OLLAMA] = {
            "server": "ollama",
            "executable": str(spec.standin_executables[OLLAMA]),
            "environment": {MODELS_ENV: "llama3.1:latest,qwen2.5-coder:7b"},
        }
    if VLLM in spec.providers and VLLM in spec.standin_executables:
        owned[VLLM] = {
            "server": "vllm",
            "executable": str(spec.standin_executables[VLLM]),
            "model_path": "Qwen/Qwen2.5-Coder-7B-Instruct-AWQ",
            "ctx": 4096,
            "gpu_memory_utilization": 0.3,
        }
    document: dict[str, Any] = {
        "host": "demo-host",
        "gpus": 1,
        "probes": {"interval_s": spec.probe_interval_s, "timeout_s": spec.probe_timeout_s},
        # the daemon's own endpoint (metrics, the answers for names nothing serves)
        "http": {"port": spec.ports.get("http") or free_port()},
        "providers": owned,
    }
    if spec.unit_dir is not None:
        document["unit_dir"] = str(spec.unit_dir)
    if "gateway" in spec.ports:
        document["state_dir"] = str(state_dir)
        document["gateway"] = {
            **({"host": spec.gateway_host} if spec.gateway_host else {}),
            "port": spec.ports["gateway"],
            # Tiny local models answer in milliseconds: a hung one is given up on sooner.
            "timeouts": {"llama_cpp": {"timeout_s": 15, "stream_timeout_s": 5, "cooldown_s": 5}},
        }
        if PAID in spec.providers:
            document["gateway"]["environment_files"] = [str(state_dir.parent / "paid.env")]
    else:
        document["gateway"] = {"owned": False}
    document.update(spec.extra_settings)
    return document


def write_stack(root: Path, spec: StackSpec) -> Stack:
    if {OLLAMA, VLLM} & set(spec.providers) and not spec.standin_executables:
        spec = dataclasses.replace(
            spec, standin_executables=write_executables(root / "bin", spec.python)
        )
    models_dir = root / "models"
    write_tiny_models(models_dir)
    active_link = models_dir / "active" / "current.gguf"
    config_dir = root / "config"
    if PAID in spec.providers:
        write_atomic(root / "paid.env", f"{PAID_KEY_ENV}={PAID_KEY}\n", mode=0o600)
    for name, document in (
        ("providers.yaml", providers_document(spec)),
        ("model-mappings.yaml", mappings_document(spec)),
        ("diversityd.yaml", settings_document(spec, active_link, root / "state")),
    ):
        write_atomic(config_dir / name, yaml.safe_dump(document, sort_keys=False), mode=0o600)
    return Stack(root, config_dir, models_dir, active_link, spec)
