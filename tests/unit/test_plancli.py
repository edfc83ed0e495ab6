"""`diversityctl plan`: the JSON contract, the table, exit codes, speed, the card's budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from diversityd.cli.plan import plan
from diversityd.gguf import read_gguf
from diversityd_lab.ggufwriter import LLAMA_3_8B_SHAPE, Geometry, write_gguf

MiB = 1 << 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("plan") / "tiny.gguf", Geometry())


@pytest.fixture(scope="module")
def sparse_8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    geometry = LLAMA_3_8B_SHAPE
    return write_gguf(tmp_path_factory.mktemp("plan8b") / "llama-8b.gguf", geometry)


def run_plan(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(plan, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diversityd.cli.plan", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_json_contract(tiny: Path) -> None:
    out = run_plan("--gguf", str(tiny), "--ctx", "1000", "--parallel", "3", "--free-mib", "9000")
    for key in ("block_count", "n_gpu_layers", "weights_bytes", "kv_bytes", "gpu_bytes"):
        assert isinstance(out[key], int), key
    assert out["block_count"] == 4
    assert out["n_gpu_layers"] == 5  # block_count + 1: full offload
    assert out["full_offload"]
    assert out["free_bytes"] == 9000 * MiB
    assert out["weights_bytes"] == read_gguf(tiny).tensor_bytes
    assert out["weights_bytes"] == sum(row["weights_bytes"] for row in out["layers"])
    # -c 3000 -np 3: 3 streams of pad256(3072 / 3) = 1024 cells; 4 layers, 2 kv heads of 32
    assert out["ctx_total"] == 3000
    assert (out["kv_streams"], out["kv_cells_per_stream"]) == (3, 1024)
    assert out["kv_bytes"] == 3 * 1024 * 4 * 2 * 32 * 2 * 2
    assert out["args"] == ["-c", "3000", "-np", "3", "-ngl", "5"]
    assert out["gpu_bytes"] == (
        out["weights_gpu_bytes"] + out["kv_gpu_bytes"] + out["compute_bytes"] + out["reserve_bytes"]
    )
    assert out["gpu_bytes"] <= out["free_bytes"] - out["margin_bytes"]
    assert [row["device"] for row in out["layers"]] == ["CPU"] + ["GPU"] * 5


def test_more_free_memory_more_layers(sparse_8b: Path) -> None:
    counts = []
    for free_mib in (0, 600, 1200, 2000, 3000, 4000, 5000, 6000, 7000, 80000):
        out = run_plan("--gguf", str(sparse_8b), "--ctx", "8192", "--free-mib", str(free_mib))
        assert out["gpu_bytes"] <= max(0, out["free_bytes"] - out["margin_bytes"])
        counts.append(out["n_gpu_layers"])
    assert counts == sorted(counts)
    assert counts[0] == 0
    assert counts[-1] == 33
    assert len(set(counts)) >= 6  # partial offloads in between


def test_placement_option(sparse_8b: Path) -> None:
    args = ["--gguf", str(sparse_8b), "--ctx", "4096", "--free-mib", "3000"]
    first = run_plan(*args)
    legacy = run_plan(*args, "--placement", "legacy")
    assert first["output_on_gpu"]
    assert not legacy["output_on_gpu"]
    assert legacy["placement"] == "legacy"
    assert legacy["gpu_blocks"] == legacy["n_gpu_layers"]
    assert first["gpu_blocks"] == first["n_gpu_layers"] - 1


def test_user_layer_count_is_checked(sparse_8b: Path) -> None:
    args = ["--gguf", str(sparse_8b), "--ctx", "8192", "--free-mib", "3000"]
    out = run_plan(*args, "--n-gpu-layers", "-1")
    assert out["n_gpu_layers"] == 33
    assert out["user_set"]
    assert not out["fits"]
    assert any("would fit" in w for w in out["warnings"])


def test_kv_cache_type_option(tiny: Path) -> None:
    args = ["--gguf", str(tiny), "--ctx", "2048", "--free-mib", "9000"]
    f16 = run_plan(*args)
    q8 = run_plan(*args, "--cache-type", "q8_0")
    assert q8["kv_bytes"] * 64 == f16["kv_bytes"] * 34
    assert q8["args"][-4:] == ["-ctk", "q8_0", "-ctv", "q8_0"]


def test_table(tiny: Path) -> None:
    result = CliRunner().invoke(
        plan, ["--gguf", str(tiny), "--ctx", "512", "--parallel", "2", "--free-mib", "4096"]
    )
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "-ngl 5 of 5 (full offload)" in text
    assert "KV cache" in text
    assert "CUDA context" in text
    assert "-c 1024 -np 2 -ngl 5" in text


def test_not_a_gguf_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_text("this is not a model\n" * 10)
    result = run_module("--gguf", str(bad), "--ctx", "1024", "--free-mib", "1000")
    assert result.returncode == 2
    assert "not a GGUF file" in result.stderr
    assert str(bad) in result.stderr
    assert "Traceback" not in result.stderr
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(write_gguf(tmp_path / "whole.gguf", Geometry()).read_bytes()[:5000])
    result = run_module("--gguf", str(truncated), "--ctx", "1024", "--free-mib", "1000")
    assert result.returncode == 2
    assert "truncated" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors(tiny: Path) -> None:
    result = run_module("--gguf", str(tiny), "--free-mib", "1000")
    assert result.returncode == 2
    assert "--ctx" in result.stderr
    result = run_module("--ctx", "1024", "--free-mib", "1000")
    assert result.returncode == 2


def test_plan_answers_in_under_a_second(sparse_8b: Path) -> None:
    assert sparse_8b.stat().st_size > 4 << 30
    args = ["--gguf", str(sparse_8b), "--ctx", "8192", "--parallel", "4", "--free-mib", "12000"]
    run_module(*args)  # warm the page cache like a second invocation would
    started = time.perf_counter()
    result = run_module(*args, "--json")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["n_vocab"] == 128256
    assert out["n_gpu_layers"] == 33
    assert elapsed < 1.0, f"plan took {elapsed:.2f} s"


# ---------------------------------------------------------------------------------------
# The card's budget from the configuration


def write_config(root: Path, model_a: Path, model_b: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "providers.yaml").write_text(
        textwrap.dedent(
            """\
            providers:
              native:
                type: llama_cpp
                base_url: http://127.0.0.1:8080
                models: [native-model]
              python:
                type: llama_cpp
                base_url: http://127.0.0.1:8000
                models: [python-model]
                configuration:
                  n_gpu_layers: -1
              vllm:
                type: vllm
                base_url: http://127.0.0.1:8001
                models: [vllm-model]
              cpu:
                type: llama_cpp
                base_url: http://127.0.0.1:8090
                models: [cpu-model]
            """
        )
    )
    (root / "model-mappings.yaml").write_text("fallback_chains: {}\n")
    (root / "diversityd.yaml").write_text(
        textwrap.dedent(
            f"""\
            providers:
              native:
                server: llama-server
                model_path: {model_a}
                ctx: 4096
                parallel: 2
                vram_priority: 10
              python:
                server: llama-cpp-python
                model_path: {model_b}
                ctx: 2048
              vllm:
                server: vllm
                model_path: Qwen/Qwen2.5-7B
              cpu:
                server: llama-server
                model_path: {model_a}
                gpu: none
            """
        )
    )
    return root


def test_budget_for_the_configured_servers(tiny: Path, sparse_8b: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg", sparse_8b, tiny)
    out = run_plan("--config-dir", str(config), "--free-mib", "10000")
    assert out["cpu_servers"] == ["cpu"]
    (card,) = out["gpus"]
    assert card["gpu"] == 0
    assert card["budget_bytes"] == 10000 * MiB - card["margin_bytes"]
    rows = {row["provider"]: row for row in card["servers"]}
    assert [row["provider"] for row in card["servers"]] == ["native", "python", "vllm"]
    assert rows["native"]["n_gpu_layers"] == 33  # highest priority: first served
    assert rows["native"]["args"] == ["-c", "8192", "-np", "2", "-ngl", "33"]
    assert rows["python"]["n_gpu_layers"] == 5  # the user's -1 from providers.yaml
    assert rows["python"]["kind"] == "fixed"
    vllm = rows["vllm"]
    assert vllm["kind"] == "share"
    left = card["budget_bytes"] - rows["native"]["gpu_bytes"] - rows["python"]["gpu_bytes"]
    assert vllm["gpu_memory_utilization"] == int(left * 100 / (10000 * MiB)) / 100
    assert card["planned_bytes"] <= card["budget_bytes"]
    # what each unit will say: gpuplan.plan_gpus, the daemon's own decision
    settings = out["settings"]
    assert set(settings) == {"native", "python", "vllm", "cpu"}
    assert (settings["native"]["n_gpu_layers"], settings["native"]["hide_gpu"]) == (33, False)
    assert settings["vllm"]["gpu_memory_utilization"] == vllm["gpu_memory_utilization"]
    assert (settings["cpu"]["n_gpu_layers"], settings["cpu"]["hide_gpu"]) == (0, True)
    assert not rows["native"]["hide_gpu"]


def test_budget_reports_an_unreadable_model(tiny: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg", tmp_path / "missing.gguf", tiny)
    out = run_plan("--config-dir", str(config), "--free-mib", "8000")
    rows = {row["provider"]: row for row in out["gpus"][0]["servers"]}
    assert rows["native"]["n_gpu_layers"] == 0
    assert rows["native"]["hide_gpu"]
    assert "no such file" in rows["native"]["warnings"][0]


def test_budget_table(tiny: Path, sparse_8b: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg", sparse_8b, tiny)
    env = dict(os.environ)
    result = run_module("--config-dir", str(config), "--free-mib", "3000", env=env)
    assert result.returncode == 0, result.stderr
    assert "GPU 0" in result.stdout
    assert "native" in result.stdout
    assert "CPU only: cpu" in result.stdout
