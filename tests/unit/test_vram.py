"""vram.py: the pure estimator, the per-card budget and the re-plan hysteresis."""

from __future__ import annotations

import textwrap
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diversityd.cardplan import (
    CardPlan,
    Elastic,
    GpuProcess,
    GpuReading,
    GpuServer,
    Hysteresis,
    ServerPlan,
    gpu_server_from_config,
    others_used_bytes,
    plan_card,
    should_replan,
)
from diversityd.config import parse_config
from diversityd.gguf import read_gguf, read_model
from diversityd.vram import (
    GiB,
    MiB,
    ModelSpec,
    Overheads,
    Placement,
    RunParams,
    choose_layers,
    cuda_tensor_bytes,
    describe_model,
    estimate_compute,
    estimate_layers,
    gpu_placement,
    kv_cells,
    kv_layer_bytes,
    llama_cpp_python_run,
    llama_server_run,
)
from diversityd_lab.ggufwriter import Geometry, write_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelSpec]:
    root = tmp_path_factory.mktemp("vram")
    geometries = {
        "llama": Geometry(),
        "tied": Geometry(file_type="Q8_0", tied_embeddings=True),
        "gemma2": Geometry(arch="gemma2", n_layer=6),
        "qwen2": Geometry(arch="qwen2", n_embd=256, n_head=8, n_head_kv=2, file_type="Q4_0"),
    }
    return {
        name: describe_model(read_model(write_gguf(root / f"{name}.gguf", g)))
        for name, g in geometries.items()
    }


# ---------------------------------------------------------------------------------------
# The model


def test_describe_groups_every_tensor(tiny: dict[str, ModelSpec]) -> None:
    for spec in tiny.values():
        header = read_gguf(spec.path)
        assert spec.weights_bytes == header.tensor_bytes
        assert spec.input_bytes + sum(spec.block_bytes) + spec.output_bytes == spec.weights_bytes
        assert len(spec.block_bytes) == spec.block_count == len(spec.n_head_kv)
        assert all(b > 0 for b in spec.block_bytes)
        assert all(d >= b for d, b in zip(spec.block_device_bytes, spec.block_bytes, strict=True))


def test_describe_reads_shapes(tiny: dict[str, ModelSpec]) -> None:
    llama = tiny["llama"]
    assert (llama.block_count, llama.n_embd, llama.n_head) == (4, 128, 4)
    assert llama.n_head_kv == (2, 2, 2, 2)
    assert (llama.key_length, llama.value_length) == (32, 32)
    assert llama.n_vocab == 512
    assert not llama.tied_embeddings
    assert llama.n_swa == 0
    assert not any(llama.swa_layers)


def test_tied_embeddings_put_a_copy_on_the_gpu(tiny: dict[str, ModelSpec]) -> None:
    tied = tiny["tied"]
    header = read_gguf(tied.path)
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")
    norm = next(t for t in header.tensors if t.name == "output_norm.weight")
    assert tied.tied_embeddings
    assert tied.input_bytes == embd.n_bytes
    assert tied.output_bytes == norm.n_bytes  # in the file: only the norm
    assert tied.output_device_bytes == cuda_tensor_bytes(norm) + cuda_tensor_bytes(embd)


def test_gemma2_every_other_layer_slides(tiny: dict[str, ModelSpec]) -> None:
    gemma = tiny["gemma2"]
    assert gemma.n_swa == 4096
    assert gemma.swa_layers == (True, False, True, False, True, False)
    assert gemma.tied_embeddings


def test_cuda_pads_quantized_rows(tiny: dict[str, ModelSpec]) -> None:
    header = read_gguf(tiny["qwen2"].path)
    wq = next(t for t in header.tensors if t.name == "blk.0.attn_q.weight")  # 256 x 256 Q4_0
    # the last row grows to 512 elements: + (512 - 256) / 32 blocks of 18 bytes, and the
    # tensor to a multiple of the buffer's 128-byte alignment
    assert cuda_tensor_bytes(wq) == -(-(wq.n_bytes + 8 * 18) // 128) * 128 > wq.n_bytes + 144
    norm = next(t for t in header.tensors if t.name == "blk.0.attn_norm.weight")
    assert cuda_tensor_bytes(norm) == 1024  # F32: no row padding, 128-byte aligned


# ---------------------------------------------------------------------------------------
# KV cache and compute


@pytest.mark.parametrize(
    ("ctx", "parallel", "cells", "streams"),
    [
        (1000, 3, 1024, 3),  # -c 3000 -> 3072 -> 1024 per slot (llama-server: n_ctx_seq)
        (4096, 1, 4096, 1),
        (100, 3, 256, 3),  # -c 300 -> 512 -> 170 per slot -> padded to 256
        (256, 4, 256, 4),
        (1, 1, 256, 1),
    ],
)
def test_kv_cells_follow_llama_context(ctx: int, parallel: int, cells: int, streams: int) -> None:
    run = llama_server_run(ctx, parallel)
    assert kv_cells(run) == (cells, streams)


def test_kv_bytes_formula(tiny: dict[str, ModelSpec]) -> None:
    llama = tiny["llama"]
    run = llama_server_run(2048, 2)
    per_layer = 2 * 2048 * 2 * (32 * 2 + 32 * 2)  # streams x cells x kv heads x (K + V) f16
    assert kv_layer_bytes(llama, run) == (per_layer,) * 4
    q8 = llama_server_run(2048, 2, cache_type_k="q8_0", cache_type_v="q8_0")
    assert kv_layer_bytes(llama, q8) == (2 * 2048 * 2 * (64 // 32 * 34),) * 4
    q4 = llama_server_run(2048, 2, cache_type_k="q4_0", cache_type_v="q4_0")
    assert kv_layer_bytes(llama, q4) == (2 * 2048 * 2 * (64 // 32 * 18),) * 4


def test_sliding_window_layers_hold_the_window(tiny: dict[str, ModelSpec]) -> None:
    gemma = tiny["gemma2"]
    run = llama_server_run(16384, 1)
    sizes = kv_layer_bytes(gemma, run)
    row = 2 * 32 * 2 * 2  # kv heads x head dim x (K + V) x f16
    window_cells = 4096 + 512  # n_swa + n_ubatch, padded to 256
    assert sizes == (window_cells * row, 16384 * row) * 3
    short = kv_layer_bytes(gemma, llama_server_run(2048, 1))
    assert short == (2048 * row,) * 6  # the window is longer than the context
    full = kv_layer_bytes(gemma, replace(run, swa_full=True))
    assert full == (16384 * row,) * 6


def test_recurrent_layers_have_no_kv(tiny: dict[str, ModelSpec]) -> None:
    hybrid = replace(tiny["llama"], n_head_kv=(2, 0, 2, 0))
    sizes = kv_layer_bytes(hybrid, llama_server_run(1024, 1))
    assert sizes[1] == sizes[3] == 0
    assert sizes[0] == sizes[2] > 0


def test_quantized_v_cache_needs_flash_attention() -> None:
    with pytest.raises(ValueError, match="flash attention"):
        RunParams(1024, cache_type_v="q8_0", flash_attn=False)
    with pytest.raises(ValueError, match="unknown KV cache type"):
        RunParams(1024, cache_type_k="q3_x")


def test_compute_grows_with_context_without_flash_attention(tiny: dict[str, ModelSpec]) -> None:
    llama = tiny["llama"]
    small = estimate_compute(llama, llama_server_run(1024, 1, flash_attn=False))
    big = estimate_compute(llama, llama_server_run(8192, 1, flash_attn=False))
    # the scores (n_kv x ubatch x heads x 4) dominate: 8x the cells, about 8x the buffer
    assert big > 6 * small
    fa = estimate_compute(llama, llama_server_run(8192, 1))
    assert fa < big / 4


def test_llama_cpp_python_reserves_logits_for_a_batch(tiny: dict[str, ModelSpec]) -> None:
    llama = replace(tiny["llama"], n_vocab=128256)
    server = estimate_compute(llama, llama_server_run(4096, 1), layers=False)
    python = estimate_compute(llama, llama_cpp_python_run(4096), layers=False)
    assert python - server >= 4 * 128256 * (512 - 1)


# ---------------------------------------------------------------------------------------
# Placement


@pytest.mark.parametrize(
    ("k", "output_first", "legacy"),
    [
        (0, (4, False), (4, False)),
        (1, (4, True), (3, False)),
        (2, (3, True), (2, False)),
        (4, (1, True), (0, False)),
        (5, (0, True), (0, True)),
        (9, (0, True), (0, True)),
        (-1, (0, True), (0, True)),
    ],
)
def test_placement_rules(k: int, output_first: tuple[int, bool], legacy: tuple[int, bool]) -> None:
    assert gpu_placement(4, k, Placement.OUTPUT_FIRST) == output_first
    assert gpu_placement(4, k, Placement.LEGACY) == legacy


def test_estimate_at_full_and_no_offload(tiny: dict[str, ModelSpec]) -> None:
    for spec in tiny.values():
        run = llama_server_run(2048, 2)
        full = estimate_layers(spec, run, -1)
        assert full.full_offload
        assert full.n_gpu_layers == spec.block_count + 1
        assert full.weights_gpu_bytes == sum(spec.block_device_bytes) + spec.output_device_bytes
        assert full.weights_cpu_bytes == spec.input_bytes
        assert full.kv_gpu_bytes == sum(kv_layer_bytes(spec, run))
        assert full.kv_cpu_bytes == 0
        assert full.gpu_bytes == (
            full.weights_gpu_bytes + full.kv_gpu_bytes + full.compute_gpu_bytes + 512 * MiB
        )
        none = estimate_layers(spec, run, 0)
        assert none.gpu_bytes == 0
        assert none.weights_cpu_bytes == spec.weights_bytes
        assert none.kv_cpu_bytes == full.kv_gpu_bytes


def test_output_first_offloads_the_output_alone_at_one(tiny: dict[str, ModelSpec]) -> None:
    spec = tiny["tied"]
    one = estimate_layers(spec, llama_server_run(1024, 1), 1)
    assert one.output_on_gpu
    assert one.gpu_blocks == 0
    assert one.weights_gpu_bytes == spec.output_device_bytes
    assert one.kv_gpu_bytes == 0
    legacy = estimate_layers(spec, llama_server_run(1024, 1), 1, placement=Placement.LEGACY)
    assert not legacy.output_on_gpu
    assert legacy.gpu_blocks == 1
    assert legacy.weights_gpu_bytes == spec.block_device_bytes[-1]


# Synthetic models for the properties: random block and output sizes, real shapes.
@st.composite
def specs(draw: st.DrawFn) -> ModelSpec:
    n = draw(st.integers(1, 48))
    blocks = tuple(draw(st.lists(st.integers(1, 800 * MiB), min_size=n, max_size=n)))
    kv_heads = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 8]), min_size=n, max_size=n)))
    output = draw(st.integers(1, 1200 * MiB))
    tied = draw(st.booleans())
    return ModelSpec(
        path="synthetic.gguf",
        name="synthetic",
        arch="llama",
        file_type="Q4_K",
        block_count=n,
        n_embd=4096,
        n_head=32,
        n_head_kv=kv_heads,
        key_length=128,
        value_length=128,
        key_length_swa=128,
        value_length_swa=128,
        has_v_cache=True,
        n_ff=14336,
        n_expert=0,
        n_expert_used=0,
        n_vocab=128256,
        n_ctx_train=131072,
        n_swa=0,
        swa_layers=(False,) * n,
        tied_embeddings=tied,
        weights_bytes=sum(blocks) + output + 500 * MiB,
        input_bytes=500 * MiB,
        block_bytes=blocks,
        output_bytes=output,
        block_device_bytes=tuple(b + 4096 for b in blocks),
        output_device_bytes=output + 4096 + (500 * MiB if tied else 0),
    )


runs = st.builds(
    llama_server_run,
    st.integers(1, 65536),
    st.integers(1, 8),
    flash_attn=st.booleans(),
)
placements = st.sampled_from(list(Placement))
free = st.integers(0, 96 * GiB)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), runs, placements, free, free)
def test_more_free_memory_never_gives_fewer_layers(
    spec: ModelSpec, run: RunParams, placement: Placement, a: int, b: int
) -> None:
    low, high = sorted((a, b))
    fewer = choose_layers(spec, run, low, placement=placement)
    more = choose_layers(spec, run, high, placement=placement)
    assert more.n_gpu_layers >= fewer.n_gpu_layers


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), runs, placements, free)
def test_the_chosen_count_fits_and_no_larger_one_does(
    spec: ModelSpec, run: RunParams, placement: Placement, available: int
) -> None:
    chosen = choose_layers(spec, run, available, placement=placement)
    assert chosen.gpu_bytes <= available
    for k in range(chosen.n_gpu_layers + 1, spec.block_count + 2):
        assert estimate_layers(spec, run, k, placement=placement).gpu_bytes > available


@settings(max_examples=100, deadline=None)
@given(specs(), runs, placements)
def test_weights_and_kv_grow_with_layers(
    spec: ModelSpec, run: RunParams, placement: Placement
) -> None:
    previous = estimate_layers(spec, run, 0, placement=placement)
    for k in range(1, spec.block_count + 2):
        current = estimate_layers(spec, run, k, placement=placement)
        assert current.weights_gpu_bytes >= previous.weights_gpu_bytes
        assert current.kv_gpu_bytes >= previous.kv_gpu_bytes
        assert current.weights_cpu_bytes <= previous.weights_cpu_bytes
        assert current.kv_gpu_bytes + current.kv_cpu_bytes == sum(kv_layer_bytes(spec, run))
        previous = current


# ---------------------------------------------------------------------------------------
# The card's budget


def llama(name: str, spec: ModelSpec, priority: int = 0, **kwargs: object) -> GpuServer:
    return GpuServer(
        provider=name,
        server="llama-server",
        priority=priority,
        model=spec,
        run=llama_server_run(4096, 2),
        **kwargs,  # type: ignore[arg-type]
    )


def test_priority_gets_the_memory_first(tiny: dict[str, ModelSpec]) -> None:
    spec = replace(tiny["llama"], block_device_bytes=(1 * GiB,) * 4, output_device_bytes=GiB)
    full = estimate_layers(spec, llama_server_run(4096, 2), -1).gpu_bytes
    total = full + full // 2 + 512 * MiB  # room for one and a half
    card = plan_card(0, total, 0, [llama("low", spec, 1), llama("high", spec, 5)])
    high, low = card.servers
    assert (high.provider, low.provider) == ("high", "low")
    assert high.n_gpu_layers == 5
    assert 0 < (low.n_gpu_layers or 0) < 5
    assert card.planned_bytes <= card.budget_bytes
    assert card.unallocated_bytes >= 0


def test_user_layers_win_with_a_warning(tiny: dict[str, ModelSpec]) -> None:
    spec = replace(tiny["llama"], block_device_bytes=(1 * GiB,) * 4, output_device_bytes=GiB)
    card = plan_card(0, 3 * GiB, 0, [llama("mine", spec, n_gpu_layers=5)])
    (mine,) = card.servers
    assert mine.n_gpu_layers == 5
    assert mine.kind is Elastic.FIXED
    assert not mine.fits
    assert "set by you" in mine.warnings[0]
    assert "would fit" in mine.warnings[0]
    assert card.warnings == mine.warnings
    ok = plan_card(0, 80 * GiB, 0, [llama("mine", spec, n_gpu_layers=2)]).servers[0]
    assert ok.fits
    assert ok.n_gpu_layers == 2
    assert not ok.warnings


def test_vllm_and_ollama_share_what_is_left(tiny: dict[str, ModelSpec]) -> None:
    spec = tiny["llama"]
    servers = [
        llama("llama", spec, priority=10),
        GpuServer("vllm", "vllm", priority=20),
        GpuServer("ollama", "ollama", priority=0),
        GpuServer("pinned", "vllm", gpu_memory_utilization=0.25),
        GpuServer("olla2", "ollama", vram_bytes=2 * GiB),
    ]
    total = 24 * GiB
    card = plan_card(0, total, 3 * GiB, servers)
    by = {s.provider: s for s in card.servers}
    assert by["pinned"].gpu_bytes == int(0.25 * total)
    assert by["olla2"].gpu_bytes == 2 * GiB
    assert by["llama"].estimate is not None
    assert by["llama"].estimate.full_offload
    left = card.budget_bytes - sum(by[p].gpu_bytes for p in ("pinned", "olla2", "llama"))
    assert by["ollama"].gpu_bytes == left // 2
    assert by["vllm"].gpu_memory_utilization == int(left // 2 * 100 / total) / 100
    assert by["vllm"].gpu_bytes <= left // 2
    assert card.planned_bytes <= card.budget_bytes
    assert by["vllm"].can_grow
    assert card.can_grow


def test_no_model_means_cpu_with_a_reason() -> None:
    server = GpuServer(
        "broken", "llama-server", run=llama_server_run(1024), model_problem="x.gguf: truncated"
    )
    (plan,) = plan_card(0, 24 * GiB, 0, [server]).servers
    assert plan.n_gpu_layers == 0
    assert plan.cpu_only
    assert "truncated" in plan.warnings[0]


@st.composite
def gpu_servers(draw: st.DrawFn) -> list[GpuServer]:
    servers: list[GpuServer] = []
    for i in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["llama-server", "llama-cpp-python", "vllm", "ollama"]))
        priority = draw(st.integers(-5, 5))
        if kind in ("llama-server", "llama-cpp-python"):
            servers.append(GpuServer(f"s{i}", kind, priority, model=draw(specs()), run=draw(runs)))
        elif kind == "vllm":
            servers.append(GpuServer(f"s{i}", kind, priority))
        else:
            servers.append(GpuServer(f"s{i}", kind, priority))
    return servers


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gpu_servers(), st.integers(1 * GiB, 192 * GiB), st.floats(0, 1))
def test_the_budget_never_exceeds_the_card(
    servers: list[GpuServer], total: int, others_share: float
) -> None:
    others = int(total * others_share)
    card = plan_card(0, total, others, servers)
    assert card.planned_bytes <= card.budget_bytes <= max(0, total - others)
    assert card.planned_bytes + card.others_bytes + card.margin_bytes <= max(
        total, card.others_bytes + card.margin_bytes
    )
    assert all(s.fits or s.server == "vllm" for s in card.servers)
    for server in card.servers:
        if server.n_gpu_layers is not None and server.estimate is not None:
            assert server.gpu_bytes == server.estimate.gpu_bytes


# ---------------------------------------------------------------------------------------
# Observations and hysteresis


def test_others_are_everything_but_ours() -> None:
    reading = GpuReading(
        index=0,
        name="shim",
        uuid="GPU-0",
        total_bytes=24 * GiB,
        free_bytes=14 * GiB,
        used_bytes=10 * GiB,
        processes=(GpuProcess(100, 6 * GiB), GpuProcess(200, 3 * GiB), GpuProcess(300, None)),
    )
    assert others_used_bytes(reading, {}) == 10 * GiB
    assert others_used_bytes(reading, {100: None}) == 4 * GiB
    assert others_used_bytes(reading, {100: None, 300: 1 * GiB}) == 3 * GiB
    assert others_used_bytes(reading, {999: None}) == 10 * GiB  # not on this card


def fixed_plan(others: int, unallocated: int, *, can_grow: bool = True) -> CardPlan:
    total = 24 * GiB
    margin = Overheads().margin_bytes
    planned = total - others - margin - unallocated
    server = ServerPlan(
        "s", "ollama", 0, Elastic.SHARE if can_grow else Elastic.FIXED, gpu_bytes=planned
    )
    return CardPlan(0, total, others, margin, (server,))


def test_small_moves_change_nothing() -> None:
    plan = fixed_plan(4 * GiB, 0)
    for delta in (-900 * MiB, -1, 0, 1, 200 * MiB, 256 * MiB):
        decision = should_replan(plan, 4 * GiB + delta, plan_age_s=10_000)
        assert not decision.replan, (delta, decision.reason)


def test_others_growing_past_the_headroom_shrinks_at_once() -> None:
    plan = fixed_plan(4 * GiB, 1 * GiB)
    assert not should_replan(plan, 5 * GiB + 256 * MiB, plan_age_s=0).replan
    decision = should_replan(plan, 5 * GiB + 257 * MiB, plan_age_s=0)
    assert decision.replan
    assert "more than when planned" in decision.reason


def test_others_freeing_memory_grows_only_when_useful_and_not_too_often() -> None:
    plan = fixed_plan(8 * GiB, 0)
    assert should_replan(plan, 7 * GiB, plan_age_s=301).replan
    assert not should_replan(plan, 7 * GiB, plan_age_s=299).replan
    saturated = fixed_plan(8 * GiB, 0, can_grow=False)
    assert not should_replan(saturated, 1 * GiB, plan_age_s=10_000).replan


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 16 * GiB),
    st.integers(0, 4 * GiB),
    st.integers(-(1 * GiB) + 1, 256 * MiB),
)
def test_no_restart_storm(others: int, unallocated: int, delta: int) -> None:
    plan = fixed_plan(others, unallocated)
    now = max(0, others + delta)
    assert not should_replan(plan, now, plan_age_s=1e9, hysteresis=Hysteresis()).replan


def test_real_card_plan_then_replan(tiny: dict[str, ModelSpec]) -> None:
    spec = tiny["qwen2"]
    card = plan_card(0, 8 * GiB, 2 * GiB, [llama("a", spec), llama("b", spec, 1)])
    assert all(s.estimate is not None and s.estimate.full_offload for s in card.servers)
    assert not card.can_grow  # everything is fully offloaded: freed memory is no reason
    assert not should_replan(card, 0, plan_age_s=1e9).replan
    squeezed = should_replan(card, 8 * GiB, plan_age_s=0)
    assert squeezed.replan


def test_servers_from_the_configuration() -> None:
    providers = """\
    providers:
      native:
        type: llama_cpp
        base_url: http://127.0.0.1:8080
        models: [a]
        configuration: {n_gpu_layers: 20}
      python:
        type: llama_cpp
        base_url: http://127.0.0.1:8000
        models: [b]
        configuration: {n_gpu_layers: 20}
      ollama:
        type: ollama
        base_url: http://127.0.0.1:11434
        models: [c]
    """
    settings = """\
    providers:
      native: {server: llama-server, model_path: /m.gguf, ctx: 4096, parallel: 2}
      python:
        server: llama-cpp-python
        model_path: /m.gguf
        ctx: 8192
        n_gpu_layers: 7
        vram_priority: 3
      ollama: {server: ollama, vram_mib: 6000}
    """
    texts = {
        "providers.yaml": textwrap.dedent(providers),
        "model-mappings.yaml": "fallback_chains: {}\n",
        "diversityd.yaml": textwrap.dedent(settings),
    }
    config, findings = parse_config(texts, config_dir="/cfg", hostname="box")
    assert config is not None, findings
    owned = config.settings.owned
    native = gpu_server_from_config(owned["native"], config.providers["native"], None)
    assert native.n_gpu_layers == 20  # providers.yaml's configuration
    assert native.run == llama_server_run(4096, 2)
    python = gpu_server_from_config(owned["python"], config.providers["python"], None)
    assert python.n_gpu_layers == 7  # diversityd.yaml's own setting wins
    assert python.priority == 3
    assert python.run == llama_cpp_python_run(8192)
    ollama = gpu_server_from_config(owned["ollama"], config.providers["ollama"], None)
    assert ollama.vram_bytes == 6000 * MiB
    assert ollama.run is None
