"""VRAM estimate vs llama.cpp's own printed buffer sizes, and `plan`'s wall time.

    python bench/vram.py [--quick]

For each geometry: write the GGUF (diversityd_lab.ggufwriter; the 8B-shaped ones sparse), run
the real `llama-server -ngl 0 -lv 4 --no-repack` on the CPU until it has printed its model,
KV and compute buffer sizes, and compare with the estimate. Errors are measured at the
print's resolution (MiB with two decimals): the estimate is rounded the same way first.
plan_ms is the median wall time of `python -m diversityd.cli.plan --gguf F --ctx N
--parallel P --free-mib 24000 --json` (the process `diversityctl plan` is), three runs.

The last line of stdout is one JSON object: geometries (name, model_error_pct,
kv_error_pct, plan_ms, and more), max_model_error_pct, max_kv_error_pct.
"""

from __future__ import annotations

import argparse
import json
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diversityd import parts
from diversityd.gguf import read_model
from diversityd.vram import (
    describe_model,
    estimate_compute,
    kv_layer_bytes,
    llama_server_run,
)
from diversityd_lab.ggufwriter import LLAMA_3_8B_SHAPE, Geometry, write_gguf

MiB = 1 << 20
BUFFER = re.compile(r"(\S+?)(?:\[[^\]]*\])?\s+(model|KV|compute) buffer size =\s+([\d.]+) MiB")

QWEN_05B = Geometry(
    arch="qwen2",
    n_layer=24,
    n_embd=896,
    n_head=14,
    n_head_kv=2,
    n_ff=4864,
    n_vocab=151936,
    n_ctx_train=32768,
    tied_embeddings=True,
    file_type="Q8_0",
    sparse=True,
    name="qwen2.5-0.5b-shape",
)
GEMMA2_2B = Geometry(
    arch="gemma2",
    n_layer=26,
    n_embd=2048,
    n_head=8,
    n_head_kv=4,
    n_ff=9216,
    n_vocab=256000,
    n_ctx_train=8192,
    file_type="F16",
    sparse=True,
    name="gemma2-2b-shape",
)


@dataclass(frozen=True)
class Case:
    name: str
    geometry: Geometry
    ctx_per_slot: int
    parallel: int
    flash_attn: bool = True
    quick: bool = True


CASES = [
    Case("tiny-llama-f32-gqa-3x1000", Geometry(), 1000, 3),
    Case("tiny-llama-f32-gqa-3x300", Geometry(), 300, 3, quick=False),
    Case("tiny-llama-q8-tied-4x512", Geometry(file_type="Q8_0", tied_embeddings=True), 512, 4),
    Case(
        "tiny-qwen2-q4-tied-2x2048",
        Geometry(arch="qwen2", n_embd=256, n_head=8, n_head_kv=2, n_ff=512, file_type="Q4_0"),
        2048,
        2,
    ),
    Case("tiny-llama-f16-mha-nofa", Geometry(n_head_kv=4, file_type="F16"), 1024, 2, False, False),
    Case("tiny-gemma2-swa-8192", Geometry(arch="gemma2", n_layer=6, file_type="F16"), 8192, 1),
    Case("tiny-gemma2-swa-2x3000", Geometry(arch="gemma2", n_layer=6), 3000, 2, quick=False),
    Case("llama-3-8b-shape-q4_0-4096", LLAMA_3_8B_SHAPE, 4096, 1),
    Case("llama-3-8b-shape-q4_0-4x2048-nofa", LLAMA_3_8B_SHAPE, 2048, 4, False, False),
    Case("qwen2.5-0.5b-shape-q8_0-2x8192", QWEN_05B, 8192, 2, quick=False),
    Case("gemma2-2b-shape-f16-8192", GEMMA2_2B, 8192, 1, quick=False),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def printed_buffers(
    binary: Path, model: Path, ctx: int, parallel: int, flash_attn: bool
) -> dict[str, list[float]]:
    """Run llama-server until it has printed its CPU buffers; stop it; return MiB per kind."""
    command = [
        str(binary),
        *("-m", str(model), "-c", str(ctx), "-np", str(parallel), "-ngl", "0", "-lv", "4"),
        *("--host", "127.0.0.1", "--port", str(free_port()), "--no-warmup", "--no-repack"),
        *("-t", "1", "-fa", "on" if flash_attn else "off"),
    ]
    sizes: dict[str, list[float]] = {}
    lines: list[str] = []
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline and "compute" not in sizes:
                if not selector.select(timeout=1.0):
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
                match = BUFFER.search(line)
                if match and match.group(1) in ("CPU", "CPU_Mapped"):
                    sizes.setdefault(match.group(2), []).append(float(match.group(3)))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if "compute" not in sizes:
        raise RuntimeError(f"llama-server printed no buffer sizes:\n{''.join(lines[-15:])}")
    return sizes


def plan_ms(model: Path, ctx: int, parallel: int) -> float:
    times = []
    command = [
        sys.executable,
        *("-m", "diversityd.cli.plan", "--gguf", str(model), "--ctx", str(ctx)),
        *("--parallel", str(parallel), "--free-mib", "24000", "--json"),
    ]
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, timeout=60)
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


def error_pct(estimate_bytes: int, printed_mib: float) -> float:
    estimate_mib = round(estimate_bytes / MiB, 2)  # at the print's resolution
    if printed_mib == 0:
        return 0.0 if estimate_mib == 0 else 100.0
    return round(abs(estimate_mib - printed_mib) / printed_mib * 100, 3)


def measure(case: Case, binary: Path, root: Path) -> dict[str, Any]:
    path = root / f"{case.name}.gguf"
    if not path.exists():
        write_gguf(path, case.geometry)
    spec = describe_model(read_model(path))
    run = llama_server_run(case.ctx_per_slot, case.parallel, flash_attn=case.flash_attn)
    printed = printed_buffers(binary, path, run.ctx_total, run.parallel, case.flash_attn)
    kv = kv_layer_bytes(spec, run)
    caches = sorted(  # one KV buffer per cache: full attention, sliding window
        sum(b for b, swa in zip(kv, spec.swa_layers, strict=True) if swa is kind)
        for kind in set(spec.swa_layers)
    )
    kv_printed = sorted(printed["KV"])
    kv_error = max((error_pct(e, p) for e, p in zip(caches, kv_printed, strict=True)), default=0.0)
    if len(caches) != len(kv_printed):
        kv_error = 100.0
    compute = estimate_compute(spec, run)
    compute_printed = sum(printed["compute"])
    return {
        "name": case.name,
        "model_error_pct": error_pct(spec.weights_bytes, sum(printed["model"])),
        "kv_error_pct": kv_error,
        "plan_ms": plan_ms(path, case.ctx_per_slot, case.parallel),
        "compute_error_pct": round((compute / MiB - compute_printed) / compute_printed * 100, 2),
        "model_mib": {"estimate": round(spec.weights_bytes / MiB, 2), "llama": printed["model"]},
        "kv_mib": {"estimate": [round(c / MiB, 2) for c in caches], "llama": kv_printed},
        "compute_mib": {"estimate": round(compute / MiB, 2), "llama": compute_printed},
        "ctx": f"-c {run.ctx_total} -np {run.parallel}",
        "flash_attn": case.flash_attn,
        "sparse": case.geometry.sparse,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer geometries (a few minutes)")
    args = parser.parse_args()
    binary = parts.llama_server_binary()
    if not binary.exists():
        print(f"{binary} missing: run packaging/build-llama-server.sh", file=sys.stderr)
        return 1
    cases = [c for c in CASES if c.quick or not args.quick]
    results = []
    with tempfile.TemporaryDirectory(prefix="diversityd-bench-vram-") as temp:
        for case in cases:
            started = time.monotonic()
            result = measure(case, binary, Path(temp))
            print(
                f"{case.name}: model {result['model_error_pct']}%, kv {result['kv_error_pct']}%, "
                f"compute {result['compute_error_pct']:+}%, plan {result['plan_ms']} ms "
                f"({time.monotonic() - started:.1f} s)",
                file=sys.stderr,
            )
            results.append(result)
    summary = {
        "geometries": results,
        "max_model_error_pct": max(r["model_error_pct"] for r in results),
        "max_kv_error_pct": max(r["kv_error_pct"] for r in results),
        "max_plan_ms": max(r["plan_ms"] for r in results),
        "resolution": "errors at llama-server's printed resolution (MiB, two decimals)",
        "quick": args.quick,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
