"""NVML and the GPU plan inside a systemd unit, as the daemon's servers will see them.

A oneshot unit of a private `systemd --user` manager loads the NVML shim (LD_LIBRARY_PATH and
NVMLSHIM_CONFIG in its Environment=), reads the GPUs with diversityd.adapters.nvml and plans
generated GGUFs with gpuplan.plan_gpus; it prints the result as JSON to its journal and writes
it to a file. The test plans the same configuration in-process from the numbers it gave the
shim: both must agree, and the plan must follow the shim's numbers.
"""

from __future__ import annotations

import json
import secrets
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from diversityd.cardplan import (
    GpuProcess,
    GpuReading,
    GpuSnapshot,
)
from diversityd.config import Config, parse_config
from diversityd.gguf import read_model
from diversityd.gpuplan import plan_gpus
from diversityd.units import command_line, environment_line
from diversityd.vram import (
    MiB,
    describe_model,
)
from diversityd_lab.ggufwriter import LLAMA_3_8B_SHAPE, Geometry, write_gguf
from diversityd_lab.privatemanager import PrivateManager
from tests.conftest import REPO_ROOT, unavailable
from tests.nvmlshim.build import ShimBuildError, build_shim

pytestmark = pytest.mark.integration

# Runs inside the unit: everything it needs comes in one job file (no quoting in ExecStart=).
PLAN_IN_UNIT = """\
import json, sys
from dataclasses import asdict
from diversityd.adapters.nvml import NvmlError, read_gpus
from diversityd.config import parse_config
from diversityd.gguf import read_model
from diversityd.gpuplan import plan_gpus
from diversityd.vram import describe_model

job = json.load(open(sys.argv[1]))
config, findings = parse_config(job["texts"], config_dir="/cfg", hostname="unit")
assert config is not None, findings
models = {}
for name, owned in config.settings.owned.items():
    try:
        models[name] = describe_model(read_model(owned.model_path))
    except Exception as exc:
        models[name] = str(exc)
try:
    snapshot = read_gpus()
except NvmlError as exc:
    result = {"error": exc.name, "code": exc.code, "message": str(exc)}
else:
    plan = plan_gpus(config, models, snapshot, job["owned_pids"])
    result = {
        "snapshot": asdict(snapshot),
        "cpu_only_reason": plan.cpu_only_reason,
        "settings": {name: asdict(s) for name, s in plan.settings.items()},
        "cards": [
            {"index": c.index, "others_bytes": c.others_bytes, "budget_bytes": c.budget_bytes}
            for c in plan.cards
        ],
    }
text = json.dumps(result)
print("gpuplan " + text, flush=True)
with open(job["out"], "w") as out:
    out.write(text)
"""


@pytest.fixture(scope="module")
def shim() -> Path:
    try:
        return build_shim()
    except ShimBuildError as exc:
        unavailable(str(exc))


@pytest.fixture(scope="module")
def python() -> Path:
    """The repository's interpreter (diversityd installed editable, nvidia-ml-py with it)."""
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return venv if venv.exists() else Path(sys.executable)


def owned_config(models: dict[str, Path]) -> dict[str, str]:
    """providers.yaml and diversityd.yaml with one llama-server per model, all on GPU 0."""
    providers = {
        name: {
            "type": "llama_cpp",
            "base_url": f"http://127.0.0.1:{8100 + i}",
            "models": [f"{name}-model"],
        }
        for i, name in enumerate(models)
    }
    owned = {
        name: {"server": "llama-server", "model_path": str(path), "ctx": 2048, "gpu": 0}
        for name, path in models.items()
    }
    return {
        "providers.yaml": json.dumps({"providers": providers}),
        "model-mappings.yaml": "fallback_chains: {}\n",
        "diversityd.yaml": json.dumps({"providers": owned}),
    }


def run_in_unit(
    manager: PrivateManager,
    shim_dir: Path,
    python: Path,
    texts: dict[str, str],
    *,
    nvml: str | None,
    owned_pids: dict[str, int] | None = None,
) -> tuple[dict[str, Any], str]:
    """Start the oneshot unit; return what it wrote and its unit name."""
    token = secrets.token_hex(4)
    work = manager.root / f"job-{token}"
    work.mkdir()
    script = work / "plan.py"
    script.write_text(PLAN_IN_UNIT)
    out = work / "out.json"
    job = work / "job.json"
    job.write_text(json.dumps({"texts": texts, "owned_pids": owned_pids or {}, "out": str(out)}))
    environment = [environment_line("LD_LIBRARY_PATH", str(shim_dir))]
    if nvml is not None:
        config = work / "nvml.conf"
        config.write_text(textwrap.dedent(nvml))
        environment.append(environment_line("NVMLSHIM_CONFIG", str(config)))
    unit = f"nvmlplan-{token}.service"
    path = manager.unit_dir / unit
    path.write_text(
        "[Unit]\nDescription=NVML and the GPU plan inside a unit\n\n[Service]\nType=oneshot\n"
        + "\n".join(environment)
        + f"\nExecStart={command_line([str(python), str(script), str(job)])}\n"
    )
    verified = manager.verify_units(path)
    assert verified.returncode == 0, verified.stderr
    manager.systemctl("daemon-reload")
    started = manager.systemctl("start", unit, check=False, timeout=60)
    if started.returncode != 0:
        lines = [e.get("MESSAGE") for e in manager.journal(unit=unit)]
        pytest.fail(f"{unit} failed: {started.stderr}\n" + "\n".join(map(str, lines)))
    return json.loads(out.read_text()), unit


def expected_settings(
    texts: dict[str, str], snapshot: GpuSnapshot, owned_pids: dict[str, int] | None = None
) -> dict[str, Any]:
    """The same plan made here, from the numbers given to the shim."""
    config: Config | None
    config, findings = parse_config(texts, config_dir="/cfg", hostname="test")
    assert config is not None, findings
    models = {
        name: describe_model(read_model(owned.model_path or ""))
        for name, owned in config.settings.owned.items()
    }
    plan = plan_gpus(config, models, snapshot, owned_pids or {})
    # through JSON, as the unit's answer came: tuples become lists
    return json.loads(json.dumps({n: asdict(s) for n, s in plan.settings.items()}))  # type: ignore[no-any-return]


def one_card(total_mib: int, used_mib: int, processes: tuple[GpuProcess, ...] = ()) -> GpuSnapshot:
    total, used = total_mib * MiB, used_mib * MiB
    return GpuSnapshot((GpuReading(0, "shim", "GPU-0", total, total - used, used, processes),))


GEOMETRIES = {
    "llama-f32": Geometry(),
    "qwen2-tied-q8": Geometry(
        arch="qwen2", n_embd=256, n_head=8, n_head_kv=2, tied_embeddings=True, file_type="Q8_0"
    ),
    "gemma2-swa": Geometry(arch="gemma2", n_layer=6, file_type="F16"),
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_eight_free_gib_offload_a_small_model_fully(
    private_manager: PrivateManager, shim: Path, python: Path, tmp_path: Path, geometry: str
) -> None:
    model = write_gguf(tmp_path / f"{geometry}.gguf", GEOMETRIES[geometry])
    texts = owned_config({"native": model})
    got, _ = run_in_unit(
        private_manager, shim, python, texts, nvml="device NVIDIA_L4 total_mib=8192 used_mib=0\n"
    )
    (reading,) = got["snapshot"]["gpus"]
    assert (reading["name"], reading["free_bytes"]) == ("NVIDIA L4", 8192 * MiB)
    native = got["settings"]["native"]
    assert native["n_gpu_layers"] == GEOMETRIES[geometry].n_layer + 1
    assert native["hide_gpu"] is False
    assert native["gpu"] == 0
    assert 0 < native["vram_bytes"] <= got["cards"][0]["budget_bytes"]
    assert got["settings"] == expected_settings(texts, one_card(8192, 0))


def test_three_hundred_free_mib_leave_small_models_on_the_cpu(
    private_manager: PrivateManager, shim: Path, python: Path, tmp_path: Path
) -> None:
    models = {
        name: write_gguf(tmp_path / f"{name}.gguf", geometry)
        for name, geometry in GEOMETRIES.items()
    }
    texts = owned_config(models)
    nvml = "device NVIDIA_GeForce_RTX_4090 total_mib=24564 used_mib=24264\n"
    got, _ = run_in_unit(private_manager, shim, python, texts, nvml=nvml)
    for name in models:
        found = got["settings"][name]
        assert (found["n_gpu_layers"], found["hide_gpu"], found["vram_bytes"]) == (0, True, 0)
    assert got["settings"] == expected_settings(texts, one_card(24564, 24264))


def test_a_big_model_is_offloaded_in_part(
    private_manager: PrivateManager, shim: Path, python: Path, tmp_path: Path
) -> None:
    geometry = LLAMA_3_8B_SHAPE
    texts = owned_config({"native": write_gguf(tmp_path / "8b.gguf", geometry)})
    nvml = "device NVIDIA_RTX_A2000 total_mib=6144 used_mib=3144\n"  # 3000 MiB free
    got, _ = run_in_unit(private_manager, shim, python, texts, nvml=nvml)
    native = got["settings"]["native"]
    assert 0 < native["n_gpu_layers"] < 33
    assert not native["hide_gpu"]
    (planned,) = got["cards"]
    assert planned["budget_bytes"] == (3000 - 512) * MiB  # free minus the default margin
    assert native["vram_bytes"] <= planned["budget_bytes"]
    assert got["settings"] == expected_settings(texts, one_card(6144, 3144))


def test_our_own_process_is_not_counted_as_others(
    private_manager: PrivateManager, shim: Path, python: Path, tmp_path: Path
) -> None:
    texts = owned_config({"native": write_gguf(tmp_path / "tiny.gguf", Geometry())})
    nvml = """\
    device NVIDIA_RTX_4090 total_mib=24564 used_mib=8000
    process 0 pid=4242 used_mib=6000
    process 0 pid=777 used_mib=1000
    """
    got, _ = run_in_unit(
        private_manager, shim, python, texts, nvml=nvml, owned_pids={"native": 4242}
    )
    (planned,) = got["cards"]
    assert planned["others_bytes"] == 2000 * MiB  # 8000 used, 6000 of them ours
    processes = (GpuProcess(4242, 6000 * MiB), GpuProcess(777, 1000 * MiB))
    expected = expected_settings(texts, one_card(24564, 8000, processes), {"native": 4242})
    assert got["settings"] == expected


def test_an_nvml_error_is_reported_with_its_name(
    private_manager: PrivateManager, shim: Path, python: Path, tmp_path: Path
) -> None:
    texts = owned_config({"native": write_gguf(tmp_path / "tiny.gguf", Geometry())})
    nvml = "device Lost total_mib=8192 used_mib=0\nerror memory 15\n"
    got, unit = run_in_unit(private_manager, shim, python, texts, nvml=nvml)
    assert (got["error"], got["code"]) == ("NVML_ERROR_GPU_IS_LOST", 15)
    assert "nvmlDeviceGetMemoryInfo" in got["message"]
    deadline = time.monotonic() + 5  # journald may file the unit's stdout a little later
    while True:
        lines = [str(e.get("MESSAGE")) for e in private_manager.journal(unit=unit)]
        if any("NVML_ERROR_GPU_IS_LOST" in line for line in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert any(line.startswith("gpuplan ") and "GPU_IS_LOST" in line for line in lines), lines


def test_no_gpu_in_the_unit_is_a_cpu_only_plan(
    private_manager: PrivateManager, shim: Path, python: Path, tmp_path: Path
) -> None:
    texts = owned_config({"native": write_gguf(tmp_path / "tiny.gguf", Geometry())})
    got, _ = run_in_unit(private_manager, shim, python, texts, nvml=None)  # shim: no GPU
    assert "no GPU" in got["cpu_only_reason"]
    native = got["settings"]["native"]
    assert (native["n_gpu_layers"], native["hide_gpu"]) == (0, True)
    assert got["cards"] == []
