"""The estimate against llama.cpp itself: the real llama-server prints its buffer sizes.

`llama-server -m X -c CTX -np P -ngl 0 -lv 4` prints `CPU_Mapped model buffer size`,
`CPU KV buffer size` and `CPU compute buffer size` (MiB, two decimals); the server is
stopped as soon as they are out. The model estimate must be within 1%, the KV cache exact
(to the printed resolution), the compute buffer never under-estimated by more than 3%.

Placement shows only per device: llama.cpp's ggml-rpc-server on this machine acts as a
second device (`--rpc`), and the `RPC0` buffers show which layers `-ngl k` put there.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from diversityd.gguf import read_gguf, read_model
from diversityd.vram import (
    Placement,
    RunParams,
    describe_model,
    estimate_compute,
    estimate_layers,
    gpu_placement,
    kv_cells,
    kv_layer_bytes,
    llama_cpp_python_run,
    llama_server_run,
)
from diversityd_lab.ggufwriter import LLAMA_3_8B_SHAPE, Geometry, write_gguf
from diversityd_lab.stack import free_port
from tests.conftest import unavailable

pytestmark = pytest.mark.integration

MiB = 1 << 20
BUFFER = re.compile(r"(\S+?)(?:\[[^\]]*\])?\s+(model|KV|compute) buffer size =\s+([\d.]+) MiB")
N_CTX = re.compile(r"llama_context: n_ctx\s+= (\d+)")
PRINT_RESOLUTION = 0.005 * MiB  # "%8.2f MiB"


@dataclass
class Buffers:
    # (device, kind) -> the printed MiB of each buffer (an SWA model has two KV caches)
    sizes: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    n_ctx: int | None = None
    log: list[str] = field(default_factory=list)

    def mib(self, device: str, kind: str) -> float:
        return round(sum(self.sizes.get((device, kind), [])), 2)

    def each(self, device: str, kind: str) -> list[float]:
        return sorted(self.sizes.get((device, kind), []))


def llama_buffers(
    binary: Path,
    model: Path,
    ctx_total: int,
    parallel: int,
    *extra: str,
    timeout: float = 180.0,  # a busy 2-core machine prints -lv 4's thousands of lines slowly
) -> Buffers:
    """Start llama-server, read its buffer sizes, stop it as soon as they are printed."""
    command = [
        str(binary),
        *("-m", str(model), "-c", str(ctx_total), "-np", str(parallel)),
        *("-lv", "4", "--host", "127.0.0.1", "--port", str(free_port())),
        *("--no-warmup", "--no-repack", "-t", "1"),
        *extra,
    ]
    if "-ngl" not in extra:
        command += ["-ngl", "0"]
    return read_buffers(command, None, timeout)


def read_buffers(command: list[str], env: dict[str, str] | None, timeout: float) -> Buffers:
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    )
    assert proc.stdout is not None
    buffers = Buffers()
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=1.0):
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                buffers.log.append(line)
                if match := BUFFER.search(line):
                    device, kind, size = match.groups()
                    buffers.sizes.setdefault((device, kind), []).append(float(size))
                elif match := N_CTX.search(line):
                    buffers.n_ctx = int(match.group(1))
                if ("CPU", "compute") in buffers.sizes:
                    break
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    tail = "".join(buffers.log[-20:])
    assert ("CPU", "compute") in buffers.sizes, f"no buffer sizes printed:\n{tail}"
    return buffers


@dataclass(frozen=True)
class Case:
    name: str
    geometry: Geometry
    ctx_per_slot: int
    parallel: int
    flash_attn: bool = True


CASES = [
    Case("llama-f32-gqa-3x1000", Geometry(), 1000, 3),
    Case("llama-f32-gqa-4096", Geometry(), 4096, 1),
    # -c 900 -np 3: pad256(900) / 3 = 341 cells per slot, padded to 512: 1536, not 1024
    Case("llama-f32-gqa-3x300", Geometry(), 300, 3),
    Case("llama-q8-tied-4x512", Geometry(file_type="Q8_0", tied_embeddings=True), 512, 4),
    Case(
        "qwen2-q4-tied-2x2048",
        Geometry(
            arch="qwen2",
            n_embd=256,
            n_head=8,
            n_head_kv=2,
            n_ff=512,
            tied_embeddings=True,
            file_type="Q4_0",
        ),
        2048,
        2,
    ),
    Case("llama-f16-mha-2x1024-nofa", Geometry(n_head_kv=4, file_type="F16"), 1024, 2, False),
    Case("gemma2-swa-8192", Geometry(arch="gemma2", n_layer=6, file_type="F16"), 8192, 1),
    Case("gemma2-swa-2x3000", Geometry(arch="gemma2", n_layer=6), 3000, 2),
    Case("gemma2-swa-16384-nofa", Geometry(arch="gemma2", n_layer=4), 16384, 1, False),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama-vram")
    return {case.name: write_gguf(root / f"{case.name}.gguf", case.geometry) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_estimate_matches_llama_server(
    llama_server_bin: Path, models: dict[str, Path], case: Case
) -> None:
    path = models[case.name]
    spec = describe_model(read_model(path))
    run = llama_server_run(case.ctx_per_slot, case.parallel, flash_attn=case.flash_attn)
    printed = llama_buffers(
        llama_server_bin,
        path,
        run.ctx_total,
        run.parallel,
        "-fa",
        "on" if case.flash_attn else "off",
    )
    cells, streams = kv_cells(run)
    assert printed.n_ctx == cells * streams

    model_mib = printed.mib("CPU_Mapped", "model")
    error = abs(spec.weights_bytes - model_mib * MiB)
    assert error <= max(0.01 * model_mib * MiB, PRINT_RESOLUTION), (spec.weights_bytes, model_mib)

    kv = kv_layer_bytes(spec, run)
    caches = {  # llama.cpp keeps sliding-window layers in a cache of their own
        swa: sum(b for b, s in zip(kv, spec.swa_layers, strict=True) if s is swa)
        for swa in set(spec.swa_layers)
    }
    assert sorted(round(b / MiB, 2) for b in caches.values()) == printed.each("CPU", "KV")

    compute = estimate_compute(spec, run)
    printed_compute = printed.mib("CPU", "compute") * MiB
    assert compute >= 0.97 * printed_compute, (compute / MiB, printed_compute / MiB)
    assert compute <= 1.5 * printed_compute + MiB, (compute / MiB, printed_compute / MiB)


@pytest.mark.slow
def test_8b_shape_matches_llama_server(llama_server_bin: Path, tmp_path: Path) -> None:
    """A Llama-3-8B-shaped model (128k vocabulary, GQA, Q4_0) whose tensor data is a hole:
    llama-server maps it without reading, and prints the real buffer sizes."""
    geometry = LLAMA_3_8B_SHAPE
    path = write_gguf(tmp_path / "llama-8b.gguf", geometry)
    spec = describe_model(read_model(path))
    run = llama_server_run(2048, 2)
    printed = llama_buffers(llama_server_bin, path, run.ctx_total, run.parallel, timeout=120)
    model_mib = printed.mib("CPU_Mapped", "model")
    assert abs(spec.weights_bytes - model_mib * MiB) <= 0.01 * model_mib * MiB
    assert round(sum(kv_layer_bytes(spec, run)) / MiB, 2) == printed.mib("CPU", "KV")
    compute = estimate_compute(spec, run)
    printed_compute = printed.mib("CPU", "compute") * MiB
    assert 0.97 * printed_compute <= compute <= 1.5 * printed_compute


@pytest.mark.parametrize("case", [CASES[0], CASES[-3]], ids=lambda c: c.name)
def test_estimate_matches_llama_cpp_python(
    llama_cpp_python_interpreter: Path,
    llama_server_bin: Path,
    models: dict[str, Path],
    case: Case,
) -> None:
    """llama-cpp-python's server sizes its context its own way: one sequence, no flash
    attention, a full-size sliding-window cache, logits reserved for a whole batch."""
    path = models[case.name]
    spec = describe_model(read_model(path))
    run = llama_cpp_python_run(case.ctx_per_slot, case.parallel)
    command = [
        str(llama_cpp_python_interpreter),
        *("-m", "llama_cpp.server", "--model", str(path), "--n_ctx", str(run.ctx_total)),
        *("--n_gpu_layers", "0", "--n_threads", "1", "--verbose", "true"),
        *("--host", "127.0.0.1", "--port", str(free_port())),
    ]
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(llama_server_bin.parent)}
    printed = read_buffers(command, env, 90.0)
    assert printed.n_ctx == kv_cells(run)[0]  # one sequence of pad256(ctx)
    model_mib = printed.mib("CPU_Mapped", "model")
    assert abs(spec.weights_bytes - model_mib * MiB) <= max(
        0.01 * model_mib * MiB, PRINT_RESOLUTION
    )
    kv = kv_layer_bytes(spec, run)
    caches = {
        swa: sum(b for b, s in zip(kv, spec.swa_layers, strict=True) if s is swa)
        for swa in set(spec.swa_layers)
    }
    assert sorted(round(b / MiB, 2) for b in caches.values()) == printed.each("CPU", "KV")
    compute = estimate_compute(spec, run)
    printed_compute = printed.mib("CPU", "compute") * MiB
    assert compute >= 0.97 * printed_compute, (compute / MiB, printed_compute / MiB)
    assert compute <= 1.5 * printed_compute + MiB, (compute / MiB, printed_compute / MiB)


# ---------------------------------------------------------------------------------------
# Placement, seen through an RPC "device"


@pytest.fixture(scope="module")
def rpc_server(llama_server_bin: Path) -> Iterator[str]:
    binary = llama_server_bin.with_name("ggml-rpc-server")
    if not binary.exists():
        unavailable(f"{binary} missing: build llama.cpp with -DGGML_RPC=ON")
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None:
                    unavailable("ggml-rpc-server exited at start")
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def host_bytes_on_device(path: Path, first_block: int, output: bool) -> int:
    """What a CPU-like device holds: the tensors' own bytes (no CUDA row padding)."""
    header = read_gguf(path)
    spec = describe_model((header,))
    total = sum(spec.block_bytes[first_block:])
    if output:
        total += spec.output_bytes
        if spec.tied_embeddings:
            total += next(t.n_bytes for t in header.tensors if t.name == "token_embd.weight")
    return total


PLACEMENT_MODELS = {
    "untied-f32": Geometry(n_layer=5),
    "tied-q8": Geometry(n_layer=5, file_type="Q8_0", tied_embeddings=True, n_vocab=2048),
}


@pytest.mark.parametrize("name", list(PLACEMENT_MODELS))
def test_placement_is_output_first(
    llama_server_bin: Path, rpc_server: str, tmp_path: Path, name: str
) -> None:
    path = write_gguf(tmp_path / f"{name}.gguf", PLACEMENT_MODELS[name])
    spec = describe_model(read_model(path))
    run: RunParams = llama_server_run(1024, 1)
    kv = kv_layer_bytes(spec, run)
    n = spec.block_count
    for k in (1, 2, n, n + 1):
        printed = llama_buffers(
            llama_server_bin, path, run.ctx_total, 1, "--rpc", rpc_server, "-ngl", str(k)
        )
        first, output = gpu_placement(n, k, Placement.OUTPUT_FIRST)
        estimate = estimate_layers(spec, run, k)
        assert (estimate.first_gpu_block, estimate.output_on_gpu) == (first, output)
        on_device = printed.mib("RPC0", "model") * MiB
        expected = host_bytes_on_device(path, first, output)
        assert abs(on_device - expected) <= max(0.01 * expected, PRINT_RESOLUTION), (k, name)
        assert printed.mib("RPC0", "KV") == round(estimate.kv_gpu_bytes / MiB, 2), k
        assert printed.mib("CPU", "KV") == round(estimate.kv_cpu_bytes / MiB, 2), k
        assert estimate.kv_gpu_bytes == sum(kv[first:])
        if k == 1:
            # the older rule would have put the last block there, not the output layer
            legacy_first, legacy_output = gpu_placement(n, k, Placement.LEGACY)
            legacy = host_bytes_on_device(path, legacy_first, legacy_output)
            assert abs(on_device - legacy) > max(0.01 * legacy, PRINT_RESOLUTION)
