"""The daemon sizes --n-gpu-layers from NVML (through the shim library) and re-plans."""

from __future__ import annotations

from pathlib import Path

import pytest

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
