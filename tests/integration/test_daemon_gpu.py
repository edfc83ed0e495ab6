"""The daemon sizes --n-gpu-layers from NVML (through the shim library) and re-plans."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from diversityd_lab.embedded import LLAMA_NATIVE, LLAMA_PYTHON
from diversityd_lab.privatemanager import PrivateManager
from diversityd_lab.stack import start_stack
from tests.nvmlshim.build import build_shim

pytestmark = pytest.mark.integration

NATIVE_UNIT = f"diversityd-{LLAMA_NATIVE}.service"


def test_layers_follow_the_card_and_nvml_errors_keep_the_plan(
    private_manager: PrivateManager,
    tmp_path: Path,
    llama_server_bin: Path,
    llama_cpp_python_interpreter: Path,
) -> None:
    shim_dir = build_shim()
    shim_config = tmp_path / "nvml.conf"
    shim_config.write_text("device Test_GPU total_mib=16384 used_mib=512\n")
    drop_in = private_manager.unit_dir / "diversityd.service.d" / "nvml.conf"
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text(
        "[Service]\n"
        f'Environment="LD_LIBRARY_PATH={shim_dir}"\n'
        f'Environment="NVMLSHIM_CONFIG={shim_config}"\n'
    )
    running = start_stack(private_manager, tmp_path / "stack")
    try:
        document = running.wait_for(
            lambda d: (
                all(p["state"] == "ready" for p in d["providers"])
                and d["gpus"]["cards"]
                and all(p["n_gpu_layers"] == 5 for p in d["providers"])
            ),
            timeout_s=90,
        )
        # a tiny 4-block model on a 16 GiB card: full offload (block_count + 1)
        card = document["gpus"]["cards"][0]
        assert card["total_mib"] == 16384
        assert card["planned_mib"] > 0
        for name in (LLAMA_NATIVE, LLAMA_PYTHON):
            entry = running.provider(name, document)
            assert entry["vram_mib"] is not None
            assert entry["vram_mib"] > 0
        unit_text = (private_manager.unit_dir / NATIVE_UNIT).read_text()
        assert "--n-gpu-layers 5" in unit_text
        assert 'Environment="CUDA_VISIBLE_DEVICES=0"' in unit_text
        pid = running.provider(LLAMA_NATIVE, document)["pid"]

        # Others take the card: the plan shrinks at once (hysteresis only slows growth),
        # the units are rewritten and restarted one at a time.
        shim_config.write_text("device Test_GPU total_mib=16384 used_mib=16200\n")
        shrunk = running.wait_for(
            lambda d: (
                running.provider(LLAMA_NATIVE, d)["n_gpu_layers"] == 0
                and running.provider(LLAMA_NATIVE, d)["state"] == "ready"
                and running.provider(LLAMA_NATIVE, d)["pid"] != pid
            ),
            timeout_s=60,
        )
        unit_text = (private_manager.unit_dir / NATIVE_UNIT).read_text()
        assert "--n-gpu-layers 0" in unit_text
        assert 'Environment="CUDA_VISIBLE_DEVICES="' in unit_text  # the GPU is hidden
        assert running.journal_events("gpu.planned", provider=LLAMA_NATIVE)
        pid = running.provider(LLAMA_NATIVE, shrunk)["pid"]

        # The GPU is lost: the last good plan stays and the error is shown by its name.
        shim_config.write_text("device Test_GPU total_mib=16384 used_mib=512\nerror memory 15\n")
        lost = running.wait_for(lambda d: "GPU_IS_LOST" in (d["gpus"]["error"] or ""), timeout_s=60)
        assert running.provider(LLAMA_NATIVE, lost)["pid"] == pid
        assert running.provider(LLAMA_NATIVE, lost)["n_gpu_layers"] == 0
        assert running.journal_events("gpu.nvml_failed")
    finally:
        private_manager.systemctl("stop", "diversityd.service", check=False)


def test_nvml_failing_at_start_or_hanging_changes_nothing_it_should_not(
    private_manager: PrivateManager,
    tmp_path: Path,
    llama_server_bin: Path,
    llama_cpp_python_interpreter: Path,
) -> None:
    """Issue 10, scenario 6: an NVML error at start moved GPU servers to the CPU for good,
    and a hung NVML call blocked every unit change."""
    shim_dir = build_shim()
    shim_config = tmp_path / "nvml.conf"
    card = "device Test_GPU total_mib=16384 used_mib=512\n"
    shim_config.write_text(card)
    drop_in = private_manager.unit_dir / "diversityd.service.d" / "nvml.conf"
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text(
        "[Service]\n"
        f'Environment="LD_LIBRARY_PATH={shim_dir}"\n'
        f'Environment="NVMLSHIM_CONFIG={shim_config}"\n'
    )
    running = start_stack(private_manager, tmp_path / "stack")
    native = lambda d: running.provider(LLAMA_NATIVE, d)  # noqa: E731
    try:
        document = running.wait_for(
            lambda d: all(p["state"] == "ready" and p["n_gpu_layers"] == 5 for p in d["providers"]),
            timeout_s=90,
        )
        pid = native(document)["pid"]
        # The driver fails as the daemon restarts: the units keep the last plan's layers.
        shim_config.write_text(card + "error init 9\n")
        private_manager.systemctl("restart", "diversityd.service", timeout=60)
        failing = running.wait_for(lambda d: "DRIVER_NOT_LOADED" in (d["gpus"]["error"] or ""))
        time.sleep(2)
        assert native(running.status())["pid"] == pid
        assert native(failing)["n_gpu_layers"] == 5
        assert "--n-gpu-layers 5" in (private_manager.unit_dir / NATIVE_UNIT).read_text()
        # The driver answers again: a plan is made again (nothing changed: nothing rolls).
        shim_config.write_text(card)
        running.wait_for(lambda d: d["gpus"]["error"] is None and d["gpus"]["cards"], 60)
        assert native(running.status())["pid"] == pid
        # NVML hangs (a GPU off the bus): a configuration change still reaches the units.
        shim_config.write_text(card + "hang 600\n")
        running.wait_for(lambda d: "answer" in (d["gpus"]["error"] or ""), timeout_s=60)
        settings_file = running.stack.config_dir / "diversityd.yaml"
        settings = yaml.safe_load(settings_file.read_text())
        settings["providers"][LLAMA_NATIVE]["ctx"] = 512
        settings_file.write_text(yaml.safe_dump(settings))
        started = time.monotonic()
        assert running.ctl("reload").returncode == 0
        rolled = running.wait_for(
            lambda d: native(d)["pid"] != pid and native(d)["state"] == "ready", timeout_s=60
        )
        assert time.monotonic() - started < 45
        assert native(rolled)["n_gpu_layers"] == 5  # the plan in force
        assert "--ctx-size 1024" in (private_manager.unit_dir / NATIVE_UNIT).read_text()
    finally:
        shim_config.write_text(card)
        private_manager.systemctl("stop", "diversityd.service", check=False)
