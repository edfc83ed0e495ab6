"""Rendered units against a real systemd: `systemd-analyze verify`, awkward paths, stand-ins."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from diversityd.adapters.files import write_atomic
from diversityd.adapters.unitfiles import machine_context
from diversityd.config import parse_config
from diversityd.gpuplan import GpuSettings
from diversityd.units import render_provider_unit
from diversityd_lab.embedded import LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM, StackSpec
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import free_port, start_stack

pytestmark = pytest.mark.integration

AWKWARD = "dir with space 100% $HOME"


def placeholder(path: Path) -> Path:
    write_atomic(path, "#!/bin/sh\nexit 0\n", mode=0o755)
    return path


def test_units_for_the_real_ollama_and_vllm_binaries_verify(
    private_manager: PrivateManager, tmp_path: Path
) -> None:
    """The units shipped for the real binaries, checked against placeholders at the
    configured paths (neither binary can be installed here)."""
    ollama_bin = placeholder(tmp_path / AWKWARD / "ollama")
    vllm_bin = placeholder(tmp_path / "opt" / "vllm")
    providers = (
        "providers:\n"
        "  ollama: {type: ollama, base_url: 'http://127.0.0.1:11434', models: [llama3.1:latest]}\n"
        "  vllm: {type: vllm, base_url: 'http://127.0.0.1:8001', models: [qwen-coder-vllm]}\n"
    )
    settings = (
        "providers:\n"
        f"  ollama: {{server: ollama, executable: '{ollama_bin}'}}\n"
        f"  vllm: {{server: vllm, executable: '{vllm_bin}', model_path: Qwen/Qwen2.5-7B,"
        " gpu_memory_utilization: 0.4}\n"
    )
    config, findings = parse_config(
        {
            "providers.yaml": providers,
            "model-mappings.yaml": "fallback_chains: {}\n",
            "diversityd.yaml": settings,
        },
        config_dir=str(tmp_path),
        hostname="box",
    )
    assert config is not None, findings
    paths = []
    for name, owned in config.settings.owned.items():
        unit = render_provider_unit(
            config,
            owned,
            [config.providers[name].models[0].name],
            GpuSettings(name, n_gpu_layers=None, hide_gpu=False, server=owned.server, gpu=0),
            machine_context(sys.executable),
        )
        path = private_manager.unit_dir / unit.name
        write_atomic(path, unit.text)
        paths.append(path)
    result = private_manager.verify_units(*paths)
    assert result.returncode == 0, result.stdout + result.stderr
    # systemd reads the awkward path back literally
    private_manager.systemctl("daemon-reload")
    shown = private_manager.systemctl("show", "-p", "ExecStart", "diversityd-ollama.service")
    assert str(ollama_bin) in shown.stdout
    # and the check is not vacuous: a missing executable fails it
    ollama_bin.unlink()
    assert private_manager.verify_units(paths[0]).returncode != 0


def test_llama_server_runs_a_model_under_an_awkward_path_and_the_stand_ins_run_as_units(
    private_manager: PrivateManager,
    tmp_path: Path,
    llama_server_bin: Path,
    llama_cpp_python_interpreter: Path,
) -> None:
    root = tmp_path / AWKWARD
    spec = StackSpec(
        ports={name: free_port() for name in (LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM)},
        providers=(LLAMA_NATIVE, LLAMA_PYTHON, OLLAMA, VLLM),
        unit_dir=private_manager.unit_dir,
    )
    running = start_stack(private_manager, root, spec)
    try:
        document = running.wait_all_ready(timeout_s=90)
        states = {p["name"]: (p["state"], p["owned"]) for p in document["providers"]}
        assert states == dict.fromkeys(spec.providers, ("ready", True))
        # llama-server really opened the model under the awkward path: the unit names the
        # file the active link led to when diversityd accepted it
        native = running.provider(LLAMA_NATIVE, document)
        assert native["model_file"]["path"] == str(running.stack.active_link)
        target = native["model_file"]["target"]
        assert target == str(running.stack.models_dir / "tiny-a.gguf")
        cmdline = Path(f"/proc/{native['pid']}/cmdline").read_bytes().split(b"\0")
        assert target.encode() in cmdline
        # the stand-ins answer as the real servers would, on the configured ports
        with urllib.request.urlopen(f"{running.stack.base_url(OLLAMA)}/api/tags", timeout=5) as r:
            tags = json.load(r)
        assert {m["name"] for m in tags["models"]} == {"llama3.1:latest", "qwen2.5-coder:7b"}
        with urllib.request.urlopen(f"{running.stack.base_url(VLLM)}/v1/models", timeout=5) as r:
            models = json.load(r)
        # it answers to the name the gateway asks for: the entry's `model:`
        assert [m["id"] for m in models["data"]] == ["Qwen/Qwen2.5-Coder-7B-Instruct-AWQ"]
    finally:
        private_manager.systemctl("stop", "diversityd.service", check=False)
        time.sleep(0.1)


def test_a_hand_made_unit_on_a_providers_port_is_reported_not_touched(
    private_manager: PrivateManager,
    tmp_path: Path,
    llama_server_bin: Path,
    llama_cpp_python_interpreter: Path,
) -> None:
    """The seeds' own `llama-cpp-native.service` still holding :8080 when diversityd arrives."""
    port = free_port()
    foreign = private_manager.unit_dir / "llama-cpp-native.service"
    write_atomic(
        foreign,
        f"[Service]\nExecStart=/usr/bin/python3 -m http.server --bind 127.0.0.1 {port}\n",
    )
    private_manager.systemctl("daemon-reload")
    private_manager.systemctl("start", "llama-cpp-native.service")
    foreign_pid = private_manager.systemctl(
        "show", "-p", "MainPID", "--value", "llama-cpp-native.service"
    ).stdout.strip()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait until it listens
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    spec = StackSpec(
        ports={LLAMA_NATIVE: port, LLAMA_PYTHON: free_port()},
        unit_dir=private_manager.unit_dir,
        extra_settings={"supervision": {"revive_initial_s": 1, "revive_max_s": 2}},
    )
    running = start_stack(private_manager, tmp_path / "stack", spec)
    try:
        document = running.wait_for(
            lambda d: (
                running.provider(LLAMA_PYTHON, d)["state"] == "ready"
                and "llama-cpp-native.service" in (running.provider(LLAMA_NATIVE, d)["error"] or "")
            )
        )
        native = running.provider(LLAMA_NATIVE, document)
        assert native["state"] == "stopped"  # ours was not started over theirs
        assert running.journal_events("unit.port_conflict", provider=LLAMA_NATIVE)
        assert "daemon: running" in running.ctl("status").stdout
        assert foreign.read_text().startswith("[Service]")  # untouched
        now = private_manager.systemctl(
            "show", "-p", "MainPID", "--value", "llama-cpp-native.service"
        )
        assert now.stdout.strip() == foreign_pid
        # stopped by no one, yet not revived either (issue 20): its port is someone's
        time.sleep(4)
        assert running.provider(LLAMA_NATIVE)["state"] == "stopped"
        assert not running.journal_events("unit.reviving", provider=LLAMA_NATIVE)
    finally:
        private_manager.systemctl("stop", "diversityd.service", check=False)
