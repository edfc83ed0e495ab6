"""The NVML adapter through the real nvidia-ml-py, loading the shim as libnvidia-ml.so.1.

Each check runs in a fresh process (LD_LIBRARY_PATH must be set before the library loads;
pynvml keeps the loaded library for the life of the process).
"""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from diversityd_lab.ggufwriter import Geometry, write_gguf
from tests.conftest import unavailable
from tests.nvmlshim.build import ShimBuildError, build_shim, shim_environment

pytestmark = pytest.mark.integration

MiB = 1 << 20

READ = """\
import json, sys
from dataclasses import asdict
from diversityd.adapters.nvml import NvmlError, read_gpus
try:
    snapshot = read_gpus()
except NvmlError as exc:
    print(json.dumps({"error": exc.name, "code": exc.code, "call": exc.call,
                      "message": str(exc)}))
else:
    print(json.dumps(asdict(snapshot)))
"""


@pytest.fixture(scope="module")
def shim() -> Path:
    try:
        return build_shim()
    except ShimBuildError as exc:
        unavailable(str(exc))


def read_in_process(shim_dir: Path, config: Path | None) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", READ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=shim_environment(shim_dir, config),
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_reads_memory_and_processes(shim: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "nvml.conf",
        """\
        device NVIDIA_GeForce_RTX_4090 total_mib=24564 used_mib=3000
        device NVIDIA_RTX_A6000 total_mib=49140 used_mib=0 uuid=GPU-a6000
        process 0 pid=4242 used_mib=2000
        process 0 pid=777 used_mib=na
        """,
    )
    snapshot = read_in_process(shim, config)
    assert snapshot["cpu_only_reason"] is None
    first, second = snapshot["gpus"]
    assert first["name"] == "NVIDIA GeForce RTX 4090"
    assert first["total_bytes"] == 24564 * MiB
    assert first["used_bytes"] == 3000 * MiB
    assert first["free_bytes"] == (24564 - 3000) * MiB
    assert first["processes"] == [
        {"pid": 4242, "used_bytes": 2000 * MiB},
        {"pid": 777, "used_bytes": None},  # NVML_VALUE_NOT_AVAILABLE
    ]
    assert second["uuid"] == "GPU-a6000"
    assert second["processes"] == []
    assert second["free_bytes"] == 49140 * MiB


def test_no_gpu_is_a_cpu_only_reading(shim: Path) -> None:
    snapshot = read_in_process(shim, None)  # the shim without a config sees no GPU
    assert snapshot["gpus"] == []
    assert "no GPU" in snapshot["cpu_only_reason"]


def test_no_library_is_a_cpu_only_reading(tmp_path: Path) -> None:
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this machine has a real libnvidia-ml: 'no library' cannot be shown here")
    empty = tmp_path / "empty"
    empty.mkdir()
    snapshot = read_in_process(empty, None)
    assert snapshot["gpus"] == []
    assert "libnvidia-ml.so.1 not found" in snapshot["cpu_only_reason"]


@pytest.mark.parametrize(
    ("call", "code", "name"),
    [
        ("init", 9, "NVML_ERROR_DRIVER_NOT_LOADED"),
        ("init", 18, "NVML_ERROR_LIB_RM_VERSION_MISMATCH"),
        ("count", 15, "NVML_ERROR_GPU_IS_LOST"),
        ("memory", 15, "NVML_ERROR_GPU_IS_LOST"),
        ("processes", 999, "NVML_ERROR_UNKNOWN"),
        ("handle", 4, "NVML_ERROR_NO_PERMISSION"),
    ],
)
def test_errors_keep_nvml_name_and_code(
    shim: Path, tmp_path: Path, call: str, code: int, name: str
) -> None:
    config = write_config(
        tmp_path / "nvml.conf",
        f"""\
        device Broken total_mib=8192 used_mib=100
        error {call} {code}
        """,
    )
    out = read_in_process(shim, config)
    assert out["error"] == name
    assert out["code"] == code
    assert name in out["message"]


def plan_env(shim: Path, config: Path) -> dict[str, str]:
    return shim_environment(shim, config)


def run_plan(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diversityd.cli.plan", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_plan_reads_free_memory_from_nvml(shim: Path, tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "tiny.gguf", Geometry())
    config = write_config(
        tmp_path / "nvml.conf",
        """\
        device NVIDIA_L4 total_mib=23034 used_mib=22300
        device NVIDIA_H100 total_mib=81559 used_mib=1000
        """,
    )
    env = plan_env(shim, config)
    squeezed = run_plan(env, "--gguf", str(model), "--ctx", "2048", "--json")
    assert squeezed.returncode == 0, squeezed.stderr
    out = json.loads(squeezed.stdout)
    assert out["free_source"] == "NVML"
    assert out["gpu_name"] == "NVIDIA L4"
    assert out["free_bytes"] == (23034 - 22300) * MiB
    assert out["n_gpu_layers"] == 0  # 734 MiB free: not even the CUDA context and margin
    roomy = json.loads(
        run_plan(env, "--gguf", str(model), "--ctx", "2048", "--gpu", "1", "--json").stdout
    )
    assert roomy["gpu"] == 1
    assert roomy["n_gpu_layers"] == 5


def test_plan_reports_nvml_errors(shim: Path, tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "tiny.gguf", Geometry())
    config = write_config(
        tmp_path / "nvml.conf",
        """\
        device Lost total_mib=8192 used_mib=0
        error memory 15
        """,
    )
    result = run_plan(plan_env(shim, config), "--gguf", str(model), "--ctx", "512")
    assert result.returncode == 1
    assert "NVML_ERROR_GPU_IS_LOST (15)" in result.stderr
    assert "Traceback" not in result.stderr


def test_budget_counts_unowned_processes(shim: Path, tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "tiny.gguf", Geometry())
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    (config_dir / "providers.yaml").write_text(
        "providers:\n  native:\n    type: llama_cpp\n    base_url: http://127.0.0.1:8080\n"
        "    models: [native-model]\n"
    )
    (config_dir / "model-mappings.yaml").write_text("fallback_chains: {}\n")
    (config_dir / "diversityd.yaml").write_text(
        f"providers:\n  native:\n    server: llama-server\n    model_path: {model}\n"
    )
    nvml = write_config(
        tmp_path / "nvml.conf",
        """\
        device NVIDIA_RTX_4090 total_mib=24564 used_mib=6000
        process 0 pid=999999 used_mib=5000
        """,
    )
    result = run_plan(plan_env(shim, nvml), "--config-dir", str(config_dir), "--json")
    assert result.returncode == 0, result.stderr
    (card,) = json.loads(result.stdout)["gpus"]
    assert card["name"] == "NVIDIA RTX 4090"
    assert card["others_bytes"] == 6000 * MiB  # pid 999999 is not ours: all used is others'
    assert card["budget_bytes"] == (24564 - 6000) * MiB - card["margin_bytes"]
    (native,) = card["servers"]
    assert native["n_gpu_layers"] == 5
