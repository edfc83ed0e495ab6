"""gpuplan.py: configuration + NVML's snapshot -> what each owned unit says about the GPU."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diversityd.cardplan import (
    GpuProcess,
    GpuReading,
    GpuSnapshot,
)
from diversityd.config import Config, parse_config
from diversityd.gguf import read_model
from diversityd.gpuplan import (
    GpuPlan,
    GpuSettings,
    apply_memory_args,
    plan_gpus,
    read_memory_args,
    replan_needed,
)
from diversityd.vram import (
    GiB,
    MiB,
    ModelSpec,
    Overheads,
    describe_model,
    estimate_layers,
    kv_layer_bytes,
    llama_cpp_python_run,
    llama_server_run,
)
from diversityd_lab.ggufwriter import Geometry, write_gguf

MARGIN = Overheads().margin_bytes
TYPES = {"llama-server": "llama_cpp", "llama-cpp-python": "llama_cpp", "vllm": "vllm"}
TYPES["ollama"] = "ollama"


@dataclass(frozen=True)
class Server:
    """One owned server of a test configuration."""

    name: str
    server: str = "llama-server"
    priority: int = 0
    gpu: int | None = 0
    n_gpu_layers: int | None = None  # diversityd.yaml
    provider_layers: int | None = None  # providers.yaml `configuration: n_gpu_layers`
    utilization: float | None = None
    vram_mib: int | None = None
    extra_args: tuple[str, ...] = ()
    active: bool = True
    ctx: int = 2048
    parallel: int = 1


def make_config(servers: Sequence[Server]) -> Config:
    providers: dict[str, Any] = {}
    owned: dict[str, Any] = {}
    for port, s in enumerate(servers, start=8100):
        provider: dict[str, Any] = {
            "type": TYPES[s.server],
            "base_url": f"http://127.0.0.1:{port}",
            "models": [f"{s.name}-model"],
        }
        if not s.active:
            provider["status"] = "disabled"
        if s.provider_layers is not None:
            provider["configuration"] = {"n_gpu_layers": s.provider_layers}
        providers[s.name] = provider
        body: dict[str, Any] = {
            "server": s.server,
            "vram_priority": s.priority,
            "gpu": "none" if s.gpu is None else s.gpu,
            "ctx": s.ctx,
            "parallel": s.parallel,
            "extra_args": list(s.extra_args),
        }
        if s.server != "ollama":
            body["model_path"] = f"/models/{s.name}.gguf"
        if s.n_gpu_layers is not None:
            body["n_gpu_layers"] = s.n_gpu_layers
        if s.utilization is not None:
            body["gpu_memory_utilization"] = s.utilization
        if s.vram_mib is not None:
            body["vram_mib"] = s.vram_mib
        owned[s.name] = body
    texts = {  # JSON is YAML: no hand-written indentation to get wrong
        "providers.yaml": json.dumps({"providers": providers}),
        "model-mappings.yaml": "fallback_chains: {}\n",
        "diversityd.yaml": json.dumps({"providers": owned}),
    }
    config, findings = parse_config(texts, config_dir="/cfg", hostname="box")
    assert config is not None, findings
    return config


def card(
    total_mib: float,
    used_mib: float = 0,
    processes: Sequence[GpuProcess] = (),
    index: int = 0,
) -> GpuReading:
    total, used = int(total_mib * MiB), int(used_mib * MiB)
    return GpuReading(
        index, f"card{index}", f"GPU-{index}", total, total - used, used, tuple(processes)
    )


def snapshot(*readings: GpuReading) -> GpuSnapshot:
    return GpuSnapshot(readings)


NO_DRIVER = GpuSnapshot((), "no NVIDIA driver: libnvidia-ml.so.1 not found; planning CPU only")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    path = write_gguf(tmp_path_factory.mktemp("gpuplan") / "tiny.gguf", Geometry())
    return describe_model(read_model(path))


def big(tiny: ModelSpec, block_mib: int = 1024, n: int = 8) -> ModelSpec:
    """The tiny model's shapes with GiB-sized layers: partial offloads on ordinary cards."""
    return replace(
        tiny,
        block_count=n,
        n_head_kv=(2,) * n,
        swa_layers=(False,) * n,
        block_bytes=(block_mib * MiB,) * n,
        block_device_bytes=(block_mib * MiB,) * n,
        output_bytes=block_mib * MiB,
        output_device_bytes=block_mib * MiB,
    )


# ---------------------------------------------------------------------------------------
# One card


def test_a_roomy_card_takes_the_whole_model(tiny: ModelSpec) -> None:
    config = make_config([Server("native")])
    plan = plan_gpus(config, {"native": tiny}, snapshot(card(8192)), {})
    native = plan.settings_for("native")
    assert native.n_gpu_layers == tiny.block_count + 1
    assert not native.hide_gpu
    assert native.gpu == 0
    assert native.environment == {}
    (planned,) = plan.cards
    server_plan = planned.server("native")
    assert server_plan is not None
    assert native.vram_bytes == server_plan.gpu_bytes
    assert planned.budget_bytes == 8192 * MiB - MARGIN
    assert plan.cpu_only_reason is None


def test_a_full_card_runs_the_server_on_the_cpu_with_the_gpu_hidden(tiny: ModelSpec) -> None:
    config = make_config([Server("native")])
    plan = plan_gpus(config, {"native": tiny}, snapshot(card(24564, 24264)), {})
    native = plan.settings_for("native")
    assert native.n_gpu_layers == 0  # 300 MiB free: not even the CUDA context fits
    assert native.hide_gpu
    assert native.environment == {"CUDA_VISIBLE_DEVICES": ""}
    assert native.vram_bytes == 0
    assert any("planned on the CPU" in w for w in native.warnings)


def test_partial_offload_between(tiny: ModelSpec) -> None:
    model = big(tiny)
    config = make_config([Server("native")])
    plan = plan_gpus(config, {"native": model}, snapshot(card(6 * 1024)), {})
    native = plan.settings_for("native")
    assert native.n_gpu_layers is not None
    assert 0 < native.n_gpu_layers < model.block_count + 1
    assert native.vram_bytes is not None
    assert native.vram_bytes <= 6 * GiB - MARGIN


def test_priority_gets_the_card_first(tiny: ModelSpec) -> None:
    model = big(tiny, n=4)
    config = make_config([Server("low", priority=1), Server("high", priority=5)])
    plan = plan_gpus(config, {"low": model, "high": model}, snapshot(card(9 * 1024)), {})
    assert plan.settings_for("high").n_gpu_layers == 5
    low = plan.settings_for("low").n_gpu_layers
    assert low is not None
    assert low < 5


def test_llama_cpp_python_is_sized_with_its_own_run(tiny: ModelSpec) -> None:
    config = make_config([Server("python", server="llama-cpp-python", ctx=4096)])
    plan = plan_gpus(config, {"python": tiny}, snapshot(card(8192)), {})
    assert plan.servers["python"].run == llama_cpp_python_run(4096)
    assert plan.settings_for("python").n_gpu_layers == 5


# ---------------------------------------------------------------------------------------
# What the user set wins


def test_user_layer_count_that_does_not_fit_wins_with_a_warning(tiny: ModelSpec) -> None:
    model = big(tiny)
    config = make_config([Server("native", provider_layers=-1)])
    plan = plan_gpus(config, {"native": model}, snapshot(card(4096)), {})
    native = plan.settings_for("native")
    assert native.n_gpu_layers == model.block_count + 1  # -1: all, as llama.cpp reads it
    assert any("(set by you)" in w and "would fit" in w for w in native.warnings)
    (planned,) = plan.cards
    server_plan = planned.server("native")
    assert server_plan is not None
    assert not server_plan.fits


def test_diversityd_yaml_layer_count_beats_providers_yaml(tiny: ModelSpec) -> None:
    config = make_config([Server("native", n_gpu_layers=2, provider_layers=4)])
    plan = plan_gpus(config, {"native": tiny}, snapshot(card(8192)), {})
    native = plan.settings_for("native")
    assert native.n_gpu_layers == 2
    assert native.warnings == ()  # it fits


def test_user_sizes_of_vllm_and_ollama_win_with_warnings() -> None:
    config = make_config(
        [Server("vllm", server="vllm", utilization=0.9), Server("olla", "ollama", vram_mib=9000)]
    )
    plan = plan_gpus(config, {}, snapshot(card(16 * 1024)), {})
    vllm, olla = plan.settings_for("vllm"), plan.settings_for("olla")
    assert vllm.gpu_memory_utilization == 0.9
    assert olla.vram_bytes == 9000 * MiB
    assert olla.ollama_gpu_overhead_bytes == 0  # over budget: nothing left to keep free
    warned = [w for s in (vllm, olla) for w in s.warnings if "(set by you)" in w]
    assert len(warned) == 1  # the second in line (priority tie: by name, olla first)
    assert "vllm" in warned[0]


def test_user_set_zero_layers_hides_the_gpu(tiny: ModelSpec) -> None:
    config = make_config([Server("native", n_gpu_layers=0)])
    native = plan_gpus(config, {"native": tiny}, snapshot(card(8192)), {}).settings_for("native")
    assert (native.n_gpu_layers, native.hide_gpu) == (0, True)


# ---------------------------------------------------------------------------------------
# No GPU


def test_cpu_only_snapshot_gives_zero_layers_and_hidden_gpus(tiny: ModelSpec) -> None:
    config = make_config(
        [
            Server("native"),
            Server("python", server="llama-cpp-python"),
            Server("pinned", provider_layers=20),
            Server("vllm", server="vllm", utilization=0.5),
            Server("olla", server="ollama"),
        ]
    )
    models: dict[str, ModelSpec | str] = {"native": tiny, "python": tiny, "pinned": tiny}
    plan = plan_gpus(config, models, NO_DRIVER, {})
    assert plan.cpu_only_reason == NO_DRIVER.cpu_only_reason
    assert plan.cards == ()
    assert plan.gpus_not_seen == (0,)
    for name in ("native", "python"):
        found = plan.settings_for(name)
        assert (found.n_gpu_layers, found.hide_gpu, found.vram_bytes) == (0, True, None)
        assert "libnvidia-ml.so.1 not found" in found.warnings[0]
    pinned = plan.settings_for("pinned")
    assert (pinned.n_gpu_layers, pinned.hide_gpu) == (20, False)  # passed through as set
    assert "no GPU seen" in pinned.warnings[0]
    assert "20 you set, unchecked" in pinned.warnings[0]
    vllm = plan.settings_for("vllm")
    assert (vllm.gpu_memory_utilization, vllm.hide_gpu) == (0.5, False)
    olla = plan.settings_for("olla")
    assert (olla.ollama_gpu_overhead_bytes, olla.hide_gpu, olla.environment) == (None, False, {})
    assert NO_DRIVER.cpu_only_reason in plan.warnings


def test_an_empty_snapshot_without_a_reason_is_cpu_only(tiny: ModelSpec) -> None:
    config = make_config([Server("native")])
    plan = plan_gpus(config, {"native": tiny}, GpuSnapshot(()), {})
    assert plan.cpu_only_reason is not None
    assert plan.settings_for("native").hide_gpu


def test_a_card_nvml_does_not_show(tiny: ModelSpec) -> None:
    config = make_config([Server("zero"), Server("one", gpu=1)])
    plan = plan_gpus(config, {"zero": tiny, "one": tiny}, snapshot(card(8192)), {})
    assert [c.index for c in plan.cards] == [0]
    assert plan.gpus_not_seen == (1,)
    one = plan.settings_for("one")
    assert (one.n_gpu_layers, one.hide_gpu) == (0, True)
    assert "NVML shows no GPU 1" in one.warnings[0]
    assert plan.settings_for("zero").n_gpu_layers == 5


def test_gpu_none_hides_the_gpu_from_every_kind(tiny: ModelSpec) -> None:
    config = make_config(
        [
            Server("native", gpu=None, n_gpu_layers=12),
            Server("olla", server="ollama", gpu=None),
            Server("vllm", server="vllm", gpu=None),
        ]
    )
    plan = plan_gpus(config, {"native": tiny}, snapshot(card(8192)), {})
    native = plan.settings_for("native")
    assert (native.n_gpu_layers, native.hide_gpu) == (0, True)
    assert "`gpu: none`" in native.warnings[0]
    olla = plan.settings_for("olla")
    assert olla.environment == {"CUDA_VISIBLE_DEVICES": "-1"}  # Ollama ignores an empty one
    assert plan.settings_for("vllm").environment == {"CUDA_VISIBLE_DEVICES": ""}
    assert plan.cards == ()


def test_an_unreadable_model_runs_on_the_cpu_with_a_warning() -> None:
    config = make_config([Server("native"), Server("python", server="llama-cpp-python")])
    models: dict[str, ModelSpec | str] = {"native": "/models/native.gguf: truncated"}
    plan = plan_gpus(config, models, snapshot(card(8192)), {})
    for name, why in (("native", "truncated"), ("python", "has not been read")):
        found = plan.settings_for(name)
        assert (found.n_gpu_layers, found.hide_gpu) == (0, True)
        assert why in found.warnings[0]


def test_inactive_providers_are_not_planned(tiny: ModelSpec) -> None:
    config = make_config([Server("on"), Server("off", active=False)])
    plan = plan_gpus(config, {"on": tiny, "off": tiny}, snapshot(card(8192)), {})
    assert set(plan.settings) == {"on"}
    off = plan.settings_for("off")  # the safe default: CPU, hidden
    assert (off.n_gpu_layers, off.hide_gpu) == (0, True)
    assert "not in the GPU plan" in off.warnings[0]


# ---------------------------------------------------------------------------------------
# vLLM and Ollama


def test_vllm_and_ollama_share_what_the_llama_servers_leave(tiny: ModelSpec) -> None:
    config = make_config(
        [Server("native", priority=5), Server("vllm", "vllm"), Server("olla", "ollama")]
    )
    plan = plan_gpus(config, {"native": tiny}, snapshot(card(24 * 1024, 2 * 1024)), {})
    (planned,) = plan.cards
    vllm, olla = plan.settings_for("vllm"), plan.settings_for("olla")
    native = plan.settings_for("native")
    assert native.vram_bytes is not None
    assert olla.vram_bytes is not None
    assert vllm.vram_bytes is not None
    left = planned.budget_bytes - native.vram_bytes
    assert olla.vram_bytes == left // 2
    assert vllm.gpu_memory_utilization == int(left // 2 * 100 / planned.total_bytes) / 100
    # Ollama may use what is free at load time minus the overhead: with the others as
    # planned, exactly its share
    free_when_olla_loads = planned.total_bytes - planned.others_bytes
    free_when_olla_loads -= native.vram_bytes + vllm.vram_bytes
    assert olla.ollama_gpu_overhead_bytes is not None
    assert free_when_olla_loads - olla.ollama_gpu_overhead_bytes == olla.vram_bytes
    assert olla.ollama_gpu_overhead_bytes >= MARGIN
    assert olla.environment == {"OLLAMA_GPU_OVERHEAD": str(olla.ollama_gpu_overhead_bytes)}
    assert olla.warnings == ()


def test_a_crumb_of_a_card_for_ollama_is_warned_about(tiny: ModelSpec) -> None:
    model = big(tiny, block_mib=1000, n=7)
    config = make_config([Server("native", priority=5), Server("olla", "ollama")])
    plan = plan_gpus(config, {"native": model}, snapshot(card(9 * 1024)), {})
    olla = plan.settings_for("olla")
    assert olla.vram_bytes is not None
    assert olla.vram_bytes < 457 * MiB
    assert "its models run on the CPU" in olla.warnings[0]


# ---------------------------------------------------------------------------------------
# Our own processes are not "others"


def test_owned_pids_are_not_counted_as_others(tiny: ModelSpec) -> None:
    config = make_config([Server("native"), Server("olla", "ollama")])
    processes = (GpuProcess(100, 3 * GiB), GpuProcess(200, 2 * GiB), GpuProcess(300, GiB))
    reading = card(24 * 1024, 7 * 1024, processes)
    # Ollama's runner is a child of the unit's main process: the daemon passes all its pids
    owned: dict[str, int | tuple[int, ...]] = {"native": 100, "olla": (200, 201)}
    plan = plan_gpus(config, {"native": tiny}, snapshot(reading), owned)
    assert plan.cards[0].others_bytes == 2 * GiB  # pid 300 and what has no process
    strangers = plan_gpus(config, {"native": tiny}, snapshot(reading), {})
    assert strangers.cards[0].others_bytes == 7 * GiB


def test_the_previous_plan_stands_in_where_nvml_has_no_number(tiny: ModelSpec) -> None:
    config = make_config([Server("native")])
    first = plan_gpus(config, {"native": tiny}, snapshot(card(8192)), {})
    used = first.settings_for("native").vram_bytes
    assert used is not None
    running = card(8192, used / MiB + 1000, (GpuProcess(100, None),))
    blind = plan_gpus(config, {"native": tiny}, snapshot(running), {"native": 100})
    assert blind.cards[0].others_bytes == running.total_bytes - running.free_bytes
    informed = plan_gpus(
        config, {"native": tiny}, snapshot(running), {"native": 100}, previous=first
    )
    assert informed.cards[0].others_bytes == running.total_bytes - running.free_bytes - used


# ---------------------------------------------------------------------------------------
# extra_args that change memory


def test_llama_server_memory_flags_are_read() -> None:
    flags = ["--verbose", "-fa", "off", "-ctk", "q8_0", "--cache-type-v=q4_0", "-nkvo"]
    args = read_memory_args("llama-server", [*flags, "-ub", "256"])
    assert args.flash_attn is False
    assert (args.cache_type_k, args.cache_type_v) == ("q8_0", "q4_0")
    assert args.kv_offload is False
    assert args.n_ubatch == 256
    assert args.warnings == ()
    assert read_memory_args("llama-server", ["-fa"]).flash_attn is True  # older flag form
    assert read_memory_args("llama-server", ["-fa", "auto", "-c", "9000"]).flash_attn is True
    last = read_memory_args("llama-server", ["-ctk", "q4_0", "--cache-type-k", "q8_0"])
    assert last.cache_type_k == "q8_0"  # the last one wins, as in llama.cpp's parser


def test_unreadable_flags_are_warned_about_and_ignored() -> None:
    args = read_memory_args("llama-server", ["-ctk", "q9_9", "-c", "auto", "-ub"])
    assert args.cache_type_k is None
    assert args.ctx_total is None
    assert len(args.warnings) == 3
    assert "'q9_9'" in args.warnings[0]


def test_llama_cpp_python_memory_flags_are_read() -> None:
    args = read_memory_args(
        "llama-cpp-python",
        ["--flash_attn", "true", "--type_k", "8", "--type_v=8", "--offload_kqv", "false"],
    )
    assert args.flash_attn is True
    assert (args.cache_type_k, args.cache_type_v) == ("q8_0", "q8_0")  # ggml type 8
    assert args.kv_offload is False
    assert read_memory_args("llama-cpp-python", ["-fa", "on"]).flash_attn is None  # not its


def test_applying_flags_changes_the_run() -> None:
    run = llama_server_run(4096, 2)
    same, warnings = apply_memory_args(run, read_memory_args("llama-server", []))
    assert (same, warnings) == (run, ())
    quantized, _ = apply_memory_args(
        run, read_memory_args("llama-server", ["-ctk", "q8_0", "-ctv", "q8_0", "-c", "3000"])
    )
    assert (quantized.cache_type_k, quantized.cache_type_v) == ("q8_0", "q8_0")
    assert (quantized.ctx_per_slot, quantized.parallel) == (1500, 2)
    refused, warnings = apply_memory_args(
        run, read_memory_args("llama-server", ["-fa", "off", "-ctv", "q4_0"])
    )
    assert (refused.flash_attn, refused.cache_type_v) == (False, "f16")  # the larger, planned
    assert "flash attention" in warnings[0]
    whole = read_memory_args("llama-server", ["-c", "0"])
    assert whole.ctx_total == 0
    trained, warnings = apply_memory_args(run, whole, n_ctx_train=131072)
    assert (trained.ctx_total, warnings) == (131072, ())  # -c 0: the model's context, shared
    unknown, warnings = apply_memory_args(run, whole)
    assert unknown == run
    assert "context of 0" in warnings[0]
    python = llama_cpp_python_run(2048)
    batch, _ = apply_memory_args(python, read_memory_args("llama-cpp-python", ["--n_batch", "64"]))
    assert (batch.n_batch, batch.n_outputs) == (64, 64)  # it reserves logits for a batch


def test_extra_args_shrink_the_planned_kv_cache(tiny: ModelSpec) -> None:
    model = big(tiny)
    plain = make_config([Server("native", ctx=32768)])
    q8 = make_config([Server("native", ctx=32768, extra_args=("-ctk", "q8_0", "-ctv", "q8_0"))])
    host_kv = make_config([Server("native", ctx=32768, extra_args=("--no-kv-offload",))])
    reading = snapshot(card(80 * 1024))
    estimates = {}
    for name, config in (("plain", plain), ("q8", q8), ("host", host_kv)):
        found = plan_gpus(config, {"native": model}, reading, {}).cards[0].server("native")
        assert found is not None
        assert found.estimate is not None
        estimates[name] = found.estimate
    assert estimates["plain"].kv_gpu_bytes == sum(kv_layer_bytes(model, llama_server_run(32768)))
    assert estimates["q8"].kv_gpu_bytes * 64 == estimates["plain"].kv_gpu_bytes * 34
    assert estimates["host"].kv_gpu_bytes == 0


def test_unread_flags_reach_the_settings_warnings(tiny: ModelSpec) -> None:
    config = make_config([Server("native", extra_args=("-ctk", "bogus"))])
    native = plan_gpus(config, {"native": tiny}, snapshot(card(8192)), {}).settings_for("native")
    assert any(w.startswith("native: extra_args: -ctk 'bogus'") for w in native.warnings)


# ---------------------------------------------------------------------------------------
# Re-planning


def test_replan_only_when_it_matters(tiny: ModelSpec) -> None:
    model = big(tiny)
    config = make_config([Server("native")])
    before = card(12 * 1024, 2 * 1024)
    plan = plan_gpus(config, {"native": model}, snapshot(before), {})
    assert not replan_needed(plan, snapshot(before), {}, plan_age_s=0).replan
    wobble = card(12 * 1024, 2 * 1024 + 100)
    assert not replan_needed(plan, snapshot(wobble), {}, plan_age_s=1e6).replan
    squeezed = replan_needed(plan, snapshot(card(12 * 1024, 6 * 1024)), {}, plan_age_s=0)
    assert squeezed.replan
    assert squeezed.reason.startswith("GPU 0: others hold")
    freed = snapshot(card(12 * 1024, 0))
    assert not replan_needed(plan, freed, {}, plan_age_s=10).replan  # too soon
    assert replan_needed(plan, freed, {}, plan_age_s=1e6).replan


def test_our_own_server_starting_is_no_reason_to_replan(tiny: ModelSpec) -> None:
    model = big(tiny)
    config = make_config([Server("native")])
    plan = plan_gpus(config, {"native": model}, snapshot(card(12 * 1024, 1024)), {})
    used = plan.settings_for("native").vram_bytes
    assert used is not None
    loaded = card(12 * 1024, 1024 + used / MiB, (GpuProcess(4242, used),))
    assert not replan_needed(plan, snapshot(loaded), {"native": 4242}, plan_age_s=0).replan
    assert replan_needed(plan, snapshot(loaded), {}, plan_age_s=0).replan  # not told: others'


def test_replan_when_cards_come_and_go(tiny: ModelSpec) -> None:
    config = make_config([Server("native")])
    cpu = plan_gpus(config, {"native": tiny}, NO_DRIVER, {})
    assert not replan_needed(cpu, NO_DRIVER, {}, plan_age_s=0).replan
    appeared = replan_needed(cpu, snapshot(card(8192)), {}, plan_age_s=0)
    assert appeared.replan
    assert "GPU 0 is seen now" in appeared.reason
    gpu = plan_gpus(config, {"native": tiny}, snapshot(card(8192)), {})
    gone = replan_needed(gpu, NO_DRIVER, {}, plan_age_s=0)
    assert gone.replan
    assert "libnvidia-ml.so.1" in gone.reason
    swapped = replan_needed(gpu, snapshot(card(16384)), {}, plan_age_s=0)
    assert swapped.replan
    nothing = plan_gpus(make_config([Server("cpu", gpu=None)]), {}, snapshot(card(8192)), {})
    assert not replan_needed(nothing, NO_DRIVER, {}, plan_age_s=0).replan


def test_same_unit_settings_ignores_status_only_fields() -> None:
    a = GpuSettings("p", 10, False, vram_bytes=1, warnings=("x",), server="llama-server", gpu=0)
    assert a.same_unit_settings(replace(a, vram_bytes=2, warnings=()))
    assert not a.same_unit_settings(replace(a, n_gpu_layers=11))
    assert not a.same_unit_settings(replace(a, hide_gpu=True))


# ---------------------------------------------------------------------------------------
# Properties


@st.composite
def model_specs(draw: st.DrawFn, tiny: ModelSpec) -> ModelSpec:
    n = draw(st.integers(1, 24))
    blocks = tuple(draw(st.lists(st.integers(1, 1500), min_size=n, max_size=n)))
    return replace(
        big(tiny, n=n),
        block_bytes=tuple(b * MiB for b in blocks),
        block_device_bytes=tuple(b * MiB for b in blocks),
        output_device_bytes=draw(st.integers(1, 2000)) * MiB,
    )


@st.composite
def server_lists(
    draw: st.DrawFn,
    *,
    user_sizes: bool,
    kinds: Sequence[str] = ("llama-server", "llama-cpp-python", "vllm", "ollama"),
) -> list[Server]:
    servers = []
    for i in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(kinds))
        server = Server(
            f"s{i}",
            kind,
            priority=draw(st.integers(-3, 3)),
            gpu=draw(st.sampled_from([0, 0, 0, 1, None])),
            ctx=draw(st.sampled_from([512, 4096, 32768])),
            parallel=draw(st.integers(1, 4)),
        )
        if user_sizes and draw(st.booleans()):
            if kind == "vllm":
                server = replace(server, utilization=draw(st.sampled_from([0.3, 0.6, 0.9])))
            elif kind == "ollama":
                server = replace(server, vram_mib=draw(st.integers(0, 30000)))
            else:
                server = replace(server, n_gpu_layers=draw(st.integers(-1, 30)))
        servers.append(server)
    return servers


def llama_names(servers: Sequence[Server]) -> list[str]:
    return [s.name for s in servers if s.server in ("llama-server", "llama-cpp-python")]


def gpu_snapshots() -> st.SearchStrategy[GpuSnapshot]:
    reading = st.builds(
        lambda index, total, used_share: card(total, int(total * used_share), index=index),
        st.just(0),
        st.integers(1024, 96 * 1024),
        st.floats(0, 1),
    )
    second = st.builds(lambda r: replace(r, index=1), reading)
    return st.builds(lambda a, b: GpuSnapshot((a, *b)), reading, st.lists(second, max_size=1))


PROPERTY = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def plan_of(
    servers: Sequence[Server], models: Mapping[str, ModelSpec], reading: GpuSnapshot
) -> GpuPlan:
    return plan_gpus(make_config(servers), models, reading, {})


@PROPERTY
@given(st.data(), server_lists(user_sizes=False), gpu_snapshots())
def test_the_plan_never_exceeds_a_cards_budget(
    tiny: ModelSpec, data: st.DataObject, servers: list[Server], reading: GpuSnapshot
) -> None:
    models = {name: data.draw(model_specs(tiny)) for name in llama_names(servers)}
    plan = plan_of(servers, models, reading)
    for planned in plan.cards:
        on_card = [s for s in plan.settings.values() if s.gpu == planned.index]
        assert sum(s.vram_bytes or 0 for s in on_card) <= planned.budget_bytes
        assert planned.planned_bytes + planned.others_bytes + planned.margin_bytes <= max(
            planned.total_bytes, planned.others_bytes + planned.margin_bytes
        )
        for found in on_card:
            if found.ollama_gpu_overhead_bytes is not None:
                assert found.ollama_gpu_overhead_bytes >= min(
                    planned.margin_bytes, planned.total_bytes - planned.others_bytes
                )
    for found in plan.settings.values():
        if found.server in ("llama-server", "llama-cpp-python"):
            assert found.hide_gpu == (found.n_gpu_layers == 0)


@PROPERTY
@given(
    st.data(),
    server_lists(user_sizes=True),
    st.sampled_from(["llama-server", "llama-cpp-python", "vllm", "ollama"]),
    gpu_snapshots(),
)
def test_a_lower_priority_server_never_costs_a_higher_one_layers(
    tiny: ModelSpec,
    data: st.DataObject,
    servers: list[Server],
    kind: str,
    reading: GpuSnapshot,
) -> None:
    lowest = min(s.priority for s in servers) - 1
    newcomer = Server("zz-new", kind, priority=lowest, gpu=0)
    models = {name: data.draw(model_specs(tiny)) for name in llama_names([*servers, newcomer])}
    alone = plan_of(servers, models, reading)
    crowded = plan_of([*servers, newcomer], models, reading)
    for name in llama_names(servers):
        assert crowded.settings_for(name) == alone.settings_for(name)


@PROPERTY
@given(st.data(), server_lists(user_sizes=True))
def test_a_cpu_only_snapshot_gives_zero_layers_except_what_the_user_set(
    tiny: ModelSpec, data: st.DataObject, servers: list[Server]
) -> None:
    models = {name: data.draw(model_specs(tiny)) for name in llama_names(servers)}
    plan = plan_of(servers, models, NO_DRIVER)
    assert plan.cards == ()
    assert plan.cpu_only_reason == NO_DRIVER.cpu_only_reason
    for server in servers:
        found = plan.settings_for(server.name)
        if server.server not in ("llama-server", "llama-cpp-python"):
            continue
        if server.gpu is None or server.n_gpu_layers is None:
            assert (found.n_gpu_layers, found.hide_gpu) == (0, True)
        else:
            assert found.n_gpu_layers == server.n_gpu_layers
            assert found.hide_gpu == (server.n_gpu_layers == 0)
            assert any("no GPU seen" in w for w in found.warnings)


@PROPERTY
@given(st.data(), server_lists(user_sizes=True, kinds=["llama-server"]), gpu_snapshots())
def test_user_layer_counts_pass_through_with_a_warning_when_they_do_not_fit(
    tiny: ModelSpec, data: st.DataObject, servers: list[Server], reading: GpuSnapshot
) -> None:
    models = {name: data.draw(model_specs(tiny)) for name in llama_names(servers)}
    plan = plan_of(servers, models, reading)
    for server in servers:
        if server.n_gpu_layers is None or server.gpu is None:
            continue
        found = plan.settings_for(server.name)
        layers = models[server.name].block_count + 1
        wanted = layers if server.n_gpu_layers < 0 else min(server.n_gpu_layers, layers)
        assert found.n_gpu_layers == (
            wanted if plan.card(server.gpu) is not None else server.n_gpu_layers
        )
        planned = plan.card(server.gpu)
        if planned is None:
            continue
        server_plan = planned.server(server.name)
        assert server_plan is not None
        warned = any("(set by you)" in w for w in found.warnings)
        assert warned == (not server_plan.fits)
        assert server_plan.estimate is not None
        run = plan.servers[server.name].run
        assert run is not None
        expected = estimate_layers(models[server.name], run, wanted)
        assert found.vram_bytes == expected.gpu_bytes


@PROPERTY
@given(
    st.data(),
    server_lists(user_sizes=False),
    st.tuples(st.integers(2048, 48 * 1024), st.integers(0, 4 * 1024), st.integers(0, 8 * 1024)),
)
def test_owned_pids_count_as_free_memory_not_as_others(
    tiny: ModelSpec, data: st.DataObject, servers: list[Server], mib: tuple[int, int, int]
) -> None:
    total_mib, stranger_mib, ours_mib = mib
    models = {name: data.draw(model_specs(tiny)) for name in llama_names(servers)}
    config = make_config(servers)
    used = min(total_mib, stranger_mib + ours_mib)
    ours = used - min(stranger_mib, used)
    processes = (GpuProcess(1, (used - ours) * MiB), GpuProcess(2, ours * MiB))
    with_ours = snapshot(card(total_mib, used, processes))
    without_ours = snapshot(card(total_mib, used - ours, processes[:1]))
    owner = servers[0].name
    mine = plan_gpus(config, models, with_ours, {owner: 2})
    freed = plan_gpus(config, models, without_ours, {})
    assert mine.settings == freed.settings
    assert [c.others_bytes for c in mine.cards] == [c.others_bytes for c in freed.cards]
