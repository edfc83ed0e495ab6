"""VRAM: what one llama server needs on a device for a given `-ngl` (pure, no I/O).

The per-card budget that shares a GPU between servers is cardplan.py's.

The numbers follow the pinned llama.cpp (llama-cpp-python 0.3.36's vendor tree); see
../../shared/design/vram-estimator.md for the facts and their sources:

- Weights: `token_embd` stays on the CPU; each block `blk.i.*` and the output layer
  (`output`, `output_norm`; with tied embeddings a copy of `token_embd`) go where `-ngl`
  puts them. On CUDA each quantized tensor's last row is padded to 512 elements and every
  tensor to 128 bytes.
- Placement: since llama.cpp PR #18148, `-ngl k` offloads the output layer first, then the
  last k-1 blocks ("output-first"); before it, the last k blocks and the output only at
  k = block_count + 1 ("legacy"). block_count + 1 is full offload either way.
- KV cache (with its layer): cells per stream = pad256(pad256(ctx_total) / slots) for
  llama-server's per-slot streams (one stream of pad256(ctx_total) when unified); a
  sliding-window layer holds pad256(min(cells, n_swa + n_ubatch)) instead. Per layer and cell:
  n_head_kv(il) x (key_length x bytes(type_k) + value_length x bytes(type_v)).
- Compute buffer: fitted to llama-server's printed `compute buffer size` on CPU (see
  `estimate_compute`), plus, on partial offload, one CPU-resident block copied in for big
  batches (op offload).
- Fixed costs: a CUDA context per process and a margin per card (see `Overheads`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from diversityd.gguf import (
    GGML_TYPE_IDS,
    GGUFError,
    GGUFHeader,
    MetadataValue,
    SkippedArray,
    TensorInfo,
    row_nbytes,
)

MiB = 1 << 20
GiB = 1 << 30

CUDA_ALIGNMENT = 128  # ggml_backend_cuda_buffer_type_get_alignment
CUDA_MATRIX_ROW_PADDING = 512  # ggml-cuda/common.cuh MATRIX_ROW_PADDING
KV_CELL_PADDING = 256  # llama_context: n_ctx = GGML_PAD(n_ctx, 256)
OP_OFFLOAD_MIN_BATCH = 32  # the CUDA backend copies CPU weights in for batches this big

INPUT_TENSORS = ("token_embd.", "token_embd_norm.", "token_types.", "position_embd.")
OUTPUT_TENSORS = ("output.", "output_norm.")
BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.")

LLAMA_SERVER_KINDS = ("llama-server", "llama-cpp-python")


class Placement(enum.StrEnum):
    OUTPUT_FIRST = "output-first"  # llama.cpp >= PR #18148 (Dec 2025): the pinned build
    LEGACY = "legacy"


DEFAULT_PLACEMENT = Placement.OUTPUT_FIRST


@dataclass(frozen=True)
class SwaRule:
    """How llama.cpp lays out sliding-window layers for an architecture (hard-coded there)."""

    n_pattern: int  # every n_pattern-th layer is full attention
    dense_first: bool = False  # True: il % n == 0 is full; False: il % n == n - 1 is full
    default_window: int = 0  # window when the GGUF names none; 0 = no SWA without the key


# From the pinned llama.cpp's src/models/*.cpp (load_swa_pattern calls). A GGUF's own
# `{arch}.attention.sliding_window_pattern` (a bool per layer, or n_pattern) wins.
SWA_RULES: Mapping[str, SwaRule] = {
    "gemma2": SwaRule(2, default_window=4096),
    "gemma3": SwaRule(6),
    "gemma3n": SwaRule(5),
    "cohere2": SwaRule(4),
    "cohere2moe": SwaRule(4, dense_first=True),
    "gpt-oss": SwaRule(2),
    "olmo2": SwaRule(4),
    "plamo3": SwaRule(8),
    "llama4": SwaRule(4, default_window=8192),  # chunked attention, sized alike
    "afmoe": SwaRule(4),
    "mellum": SwaRule(4),
    "laguna": SwaRule(4, dense_first=True),
    "smallthinker": SwaRule(4, dense_first=True),
    "exaone-moe": SwaRule(4, default_window=128),
}


def pad(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# ---------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class ModelSpec:
    """What the estimate needs from a GGUF: shapes, and tensor bytes grouped by layer."""

    path: str
    name: str
    arch: str
    file_type: str  # the most common type among the weight matrices (display only)
    block_count: int
    n_embd: int
    n_head: int  # the largest per-layer head count
    n_head_kv: tuple[int, ...]  # per block; 0 = no KV cache (recurrent layer)
    key_length: int
    value_length: int
    key_length_swa: int
    value_length_swa: int
    has_v_cache: bool  # False for MLA (DeepSeek-style) caches: K only
    n_ff: int  # the largest feed-forward length (per expert for MoE)
    n_expert: int
    n_expert_used: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int  # sliding window in tokens; 0 = none
    swa_layers: tuple[bool, ...]  # per block
    tied_embeddings: bool  # no output.weight: token_embd is loaded again as the output
    weights_bytes: int  # every tensor in the file(s)
    input_bytes: int  # token_embd & co.: always on the CPU
    block_bytes: tuple[int, ...]  # per block, as stored in the file
    output_bytes: int  # output + output_norm (+ any global tensor) as stored in the file
    block_device_bytes: tuple[int, ...]  # per block, as a CUDA buffer holds them
    output_device_bytes: int  # the output layer on a GPU: with tied embeddings, plus the
    # copy of token_embd the GPU gets as the output matrix

    @property
    def layer_count(self) -> int:
        """`-ngl` of this many (block_count + 1) is full offload."""
        return self.block_count + 1


def _meta_int(meta: Mapping[str, MetadataValue], key: str) -> int | None:
    value = meta.get(key)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _meta_ints(meta: Mapping[str, MetadataValue], key: str, n: int) -> tuple[int, ...] | None:
    """A per-layer value: a scalar broadcast to n layers, or an array of n integers."""
    value = meta.get(key)
    if isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
        values = tuple(int(v) for v in value if isinstance(v, int))
        if len(values) >= n:
            return values[:n]
        return values + (values[-1],) * (n - len(values))
    scalar = _meta_int(meta, key)
    return None if scalar is None else (scalar,) * n


def cuda_tensor_bytes(tensor: TensorInfo) -> int:
    """The bytes a tensor takes in a CUDA buffer (ggml_backend_cuda_buffer_type_get_alloc_size
    plus the buffer's 128-byte alignment)."""
    size = tensor.n_bytes
    if tensor.is_quantized and tensor.shape and tensor.shape[0] % CUDA_MATRIX_ROW_PADDING:
        size += row_nbytes(
            tensor.ggml_type, CUDA_MATRIX_ROW_PADDING - tensor.shape[0] % CUDA_MATRIX_ROW_PADDING
        )
    return pad(size, CUDA_ALIGNMENT)


def _swa_layers(
    meta: Mapping[str, MetadataValue], arch: str, n_layer: int
) -> tuple[int, tuple[bool, ...]]:
    rule = SWA_RULES.get(arch)
    window = _meta_int(meta, f"{arch}.attention.sliding_window")
    if rule is None:
        return 0, (False,) * n_layer
    if window is None:
        window = rule.default_window
    if window <= 0:
        return 0, (False,) * n_layer
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, tuple) and pattern:
        flags = tuple(bool(v) for v in pattern[:n_layer])
        return window, flags + (False,) * (n_layer - len(flags))
    n_pattern = _meta_int(meta, f"{arch}.attention.sliding_window_pattern") or rule.n_pattern
    if rule.dense_first:
        flags = tuple(n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer))
    else:
        flags = tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))
    return window, flags


def describe_model(headers: Sequence[GGUFHeader]) -> ModelSpec:
    """Group a model's tensors by layer and read the shapes the KV cache needs.

    `headers`: the files of one model (several when it is split), first file first.
    Raises GGUFError when the metadata lacks what llama.cpp itself would need.
    """
    if not headers:
        raise ValueError("describe_model needs at least one GGUF header")
    first = headers[0]
    meta = first.metadata
    path = first.path
    arch = first.architecture
    if not arch:
        raise GGUFError(path, "general.architecture is missing: not a model llama.cpp can load")
    n_layer = _meta_int(meta, f"{arch}.block_count")
    n_embd = _meta_int(meta, f"{arch}.embedding_length")
    if not n_layer or n_layer < 0:
        raise GGUFError(path, f"{arch}.block_count is missing: not a model with layers")
    if not n_embd or n_embd < 0:
        raise GGUFError(path, f"{arch}.embedding_length is missing")
    heads = _meta_ints(meta, f"{arch}.attention.head_count", n_layer) or (0,) * n_layer
    heads_kv = _meta_ints(meta, f"{arch}.attention.head_count_kv", n_layer) or heads
    n_head = max(heads)
    first_head = next((h for h in heads if h > 0), 0)
    default_head = n_embd // first_head if first_head else 0
    key_length = _meta_int(meta, f"{arch}.attention.key_length") or default_head
    value_length = _meta_int(meta, f"{arch}.attention.value_length") or default_head
    key_length_swa = _meta_int(meta, f"{arch}.attention.key_length_swa") or key_length
    value_length_swa = _meta_int(meta, f"{arch}.attention.value_length_swa") or value_length
    has_v_cache = f"{arch}.attention.key_length_mla" not in meta
    n_expert = _meta_int(meta, f"{arch}.expert_count") or 0
    n_expert_used = _meta_int(meta, f"{arch}.expert_used_count") or 0
    ff = _meta_ints(meta, f"{arch}.feed_forward_length", n_layer) or (0,) * n_layer
    n_ff = max(ff)
    if n_expert:
        n_ff = _meta_int(meta, f"{arch}.expert_feed_forward_length") or n_ff
    n_swa, swa_layers = _swa_layers(meta, arch, n_layer)

    tensors = [t for header in headers for t in header.tensors]
    by_name = {t.name: t for t in tensors}
    tied = "output.weight" not in by_name and "token_embd.weight" in by_name
    block_bytes = [0] * n_layer
    block_device = [0] * n_layer
    input_bytes = output_bytes = output_device = 0
    for tensor in tensors:
        match = BLOCK_TENSOR.match(tensor.name)
        if match:
            il = min(int(match.group(1)), n_layer - 1)  # MTP/nextn blocks past the count
            block_bytes[il] += tensor.n_bytes
            block_device[il] += cuda_tensor_bytes(tensor)
        elif tensor.name.startswith(INPUT_TENSORS):
            input_bytes += tensor.n_bytes
        else:  # output, output_norm, and anything global: with the output layer
            output_bytes += tensor.n_bytes
            output_device += cuda_tensor_bytes(tensor)
    if tied:  # the GPU gets its own copy of token_embd as the output matrix
        output_device += cuda_tensor_bytes(by_name["token_embd.weight"])

    vocab = _meta_int(meta, f"{arch}.vocab_size")
    tokens = meta.get("tokenizer.ggml.tokens")
    if vocab is None and isinstance(tokens, SkippedArray):
        vocab = tokens.length
    elif vocab is None and isinstance(tokens, tuple):
        vocab = len(tokens)
    embd_tensor = by_name.get("token_embd.weight")
    if vocab is None and embd_tensor is not None and len(embd_tensor.shape) > 1:
        vocab = embd_tensor.shape[1]
    matrices = [t for t in tensors if len(t.shape) > 1]
    counts: dict[str, int] = {}
    for tensor in matrices:
        counts[tensor.type_name] = counts.get(tensor.type_name, 0) + tensor.n_elements
    file_type = max(counts, key=lambda k: counts[k]) if counts else "F32"
    name = meta.get("general.name")
    return ModelSpec(
        path=path,
        name=name if isinstance(name, str) else "",
        arch=arch,
        file_type=file_type,
        block_count=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=heads_kv,
        key_length=key_length,
        value_length=value_length,
        key_length_swa=key_length_swa,
        value_length_swa=value_length_swa,
        has_v_cache=has_v_cache,
        n_ff=n_ff,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_vocab=vocab or 0,
        n_ctx_train=_meta_int(meta, f"{arch}.context_length") or 0,
        n_swa=n_swa,
        swa_layers=swa_layers,
        tied_embeddings=tied,
        weights_bytes=sum(t.n_bytes for t in tensors),
        input_bytes=input_bytes,
        block_bytes=tuple(block_bytes),
        output_bytes=output_bytes,
        block_device_bytes=tuple(block_device),
        output_device_bytes=output_device,
    )


# ---------------------------------------------------------------------------------------
# How the server runs it


@dataclass(frozen=True)
class RunParams:
    """The context a server is started with. Build it with `llama_server_run` or
    `llama_cpp_python_run`: their defaults differ (flash attention, streams, outputs)."""

    ctx_per_slot: int
    parallel: int = 1
    kv_unified: bool = False  # llama-server with an explicit -np: one stream per slot
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool = True  # llama-server's "auto" turns it on where the backend has it
    n_batch: int = 2048
    n_ubatch: int = 512
    n_outputs: int | None = None  # logits rows reserved; None = one per slot (llama-server)
    swa_full: bool = False  # llama-server: false; llama-cpp-python: true
    op_offload: bool = True

    def __post_init__(self) -> None:
        if self.ctx_per_slot < 1 or self.parallel < 1:
            raise ValueError("ctx_per_slot and parallel must be at least 1")
        for type_name in (self.cache_type_k, self.cache_type_v):
            if type_name.upper() not in GGML_TYPE_IDS:
                raise ValueError(f"unknown KV cache type {type_name!r}")
        if not self.flash_attn and self.cache_type_v.upper() not in ("F16", "F32", "BF16"):
            raise ValueError("a quantized V cache needs flash attention")

    @property
    def ctx_total(self) -> int:
        """What the server's `-c` is given: ctx per slot x slots."""
        return self.ctx_per_slot * self.parallel

    @property
    def outputs(self) -> int:
        return self.parallel if self.n_outputs is None else self.n_outputs


def llama_server_run(
    ctx_per_slot: int,
    parallel: int = 1,
    *,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    flash_attn: bool = True,
) -> RunParams:
    """llama-server `-c ctx*parallel -np parallel` (pinned build: per-slot streams, flash
    attention auto, one logits row per slot)."""
    return RunParams(
        ctx_per_slot,
        parallel,
        cache_type_k=cache_type_k,
        cache_type_v=cache_type_v,
        flash_attn=flash_attn,
    )


def llama_cpp_python_run(ctx_per_slot: int, parallel: int = 1) -> RunParams:
    """llama-cpp-python's server: one sequence of n_ctx, flash attention off, full-size SWA
    cache, logits for a whole n_batch (512) reserved."""
    return RunParams(
        ctx_per_slot * parallel,
        1,
        kv_unified=True,
        flash_attn=False,
        n_batch=512,
        n_outputs=512,
        swa_full=True,
    )


def run_params_for(
    server: str, ctx_per_slot: int, parallel: int = 1, *, cache_type: str = "f16"
) -> RunParams:
    """The RunParams of a llama server kind (config.SERVER_KINDS) at this context."""
    if server == "llama-cpp-python":
        return llama_cpp_python_run(ctx_per_slot, parallel)
    return llama_server_run(
        ctx_per_slot, parallel, cache_type_k=cache_type, cache_type_v=cache_type
    )


def kv_cells(run: RunParams) -> tuple[int, int]:
    """(cells per stream, streams) as llama_context sizes them."""
    n_ctx = pad(run.ctx_total, KV_CELL_PADDING)
    if run.kv_unified or run.parallel == 1:
        return n_ctx, 1
    return pad(n_ctx // run.parallel, KV_CELL_PADDING), run.parallel


def ubatch_tokens(run: RunParams) -> int:
    """n_ubatch as llama_context clamps it (n_batch is capped by the context)."""
    n_batch = min(run.ctx_total, run.n_batch)
    return min(n_batch, run.n_ubatch)


def kv_layer_cells(model: ModelSpec, run: RunParams, il: int) -> int:
    """Cells per stream of layer il: all of them, or a sliding window's worth."""
    cells, streams = kv_cells(run)
    if model.n_swa and model.swa_layers[il] and not run.swa_full:
        seqs = run.parallel if (run.kv_unified and streams == 1) else 1
        return min(cells, pad(model.n_swa * seqs + ubatch_tokens(run), KV_CELL_PADDING))
    return cells


def kv_layer_bytes(model: ModelSpec, run: RunParams) -> tuple[int, ...]:
    """KV cache bytes of each block (0 for layers without attention cache)."""
    _, streams = kv_cells(run)
    type_k = GGML_TYPE_IDS[run.cache_type_k.upper()]
    type_v = GGML_TYPE_IDS[run.cache_type_v.upper()]
    v_widths = [
        kv * (model.value_length_swa if model.swa_layers[il] else model.value_length)
        for il, kv in enumerate(model.n_head_kv)
    ]
    v_max = max(v_widths, default=0)
    sizes = []
    for il, kv in enumerate(model.n_head_kv):
        if kv <= 0:
            sizes.append(0)
            continue
        swa = model.swa_layers[il]
        k_width = kv * (model.key_length_swa if swa else model.key_length)
        # without flash attention V is stored transposed, every layer at the widest width
        v_width = v_widths[il] if run.flash_attn else v_max
        row = row_nbytes(type_k, k_width)
        if model.has_v_cache:
            row += row_nbytes(type_v, v_width)
        sizes.append(streams * kv_layer_cells(model, run, il) * row)
    return tuple(sizes)


def estimate_compute(
    model: ModelSpec, run: RunParams, *, layers: bool = True, output: bool = True
) -> int:
    """The compute buffer reserved for the worst-case graph on one device, without op-offload
    copies. Fitted to llama-server's printed CPU compute buffer: the peak is the KQ masks plus
    the larger of the feed-forward activations (3 x n_ff + 4 x n_embd floats per token) and
    attention (without flash attention: the n_kv x n_head scores per token); the output layer
    adds the logits of the reserved outputs."""
    tokens = min(pad(run.ctx_total, KV_CELL_PADDING), ubatch_tokens(run))
    cells, _ = kv_cells(run)
    # one KQ mask per kind of layer (full attention, sliding window), even of equal size
    kinds = {
        model.swa_layers[il]: kv_layer_cells(model, run, il) for il in range(model.block_count)
    }
    n_kv = max(kinds.values(), default=cells)
    peak = 0
    if layers:
        mask = (sum(kinds.values()) or cells) * tokens * (2 if run.flash_attn else 4)
        ff = model.n_ff * (model.n_expert_used or 1)
        ffn = 4 * tokens * (3 * ff + 4 * model.n_embd + model.n_expert)
        if run.flash_attn:
            attention = 4 * tokens * 4 * model.n_embd
        else:
            attention = 4 * tokens * (n_kv * model.n_head + 7 * model.n_embd)
        peak = mask + max(ffn, attention)
    if output:
        peak = max(peak, 4 * tokens * model.n_embd + 4 * run.outputs * model.n_vocab)
    return peak + 64 * tokens  # token ids, positions, output ids: small graph inputs


# ---------------------------------------------------------------------------------------
# One server on one device


@dataclass(frozen=True)
class Overheads:
    """Fixed costs the tensors do not show.

    cuda_context_bytes, per process on each card it uses: the CUDA context, cuBLAS handles
    and workspace, llama.cpp's CUDA memory pool. Reported 107-555 MiB depending on GPU,
    driver and CUDA version (llama.cpp PR #23604); Ollama assumes 457 MiB, gguf-parser-go
    250 MiB. 512 MiB covers all but the top of that range; NVML's free memory is read
    before the process creates its context, so it must be reserved. Not yet measured on
    this project's own GPU (no GPU run so far): replace with the measured value when one is.
    margin_bytes, per card, kept free: allocator fragmentation, estimate error, small
    moves of other processes. llama.cpp's own --fit keeps 1024 MiB but has no separate
    context reserve; here the reserve is separate and the hysteresis absorbs drift."""

    cuda_context_bytes: int = 512 * MiB
    margin_bytes: int = 512 * MiB


DEFAULT_OVERHEADS = Overheads()


@dataclass(frozen=True)
class LayerEstimate:
    """Where the memory of one llama server goes at one `-ngl` value."""

    n_gpu_layers: int  # 0..block_count + 1
    block_count: int
    placement: Placement
    first_gpu_block: int  # blocks first_gpu_block..block_count-1 are on the GPU
    output_on_gpu: bool
    weights_gpu_bytes: int
    kv_gpu_bytes: int
    compute_gpu_bytes: int
    context_bytes: int  # the CUDA context reserve (0 when nothing is on the GPU)
    weights_cpu_bytes: int
    kv_cpu_bytes: int
    compute_cpu_bytes: int

    @property
    def gpu_blocks(self) -> int:
        return self.block_count - self.first_gpu_block

    @property
    def full_offload(self) -> bool:
        return self.n_gpu_layers >= self.block_count + 1

    @property
    def gpu_bytes(self) -> int:
        """What the process takes on the card: weights, KV, compute and its CUDA context."""
        return (
            self.weights_gpu_bytes
            + self.kv_gpu_bytes
            + self.compute_gpu_bytes
            + (self.context_bytes)
        )

    @property
    def cpu_bytes(self) -> int:
        return self.weights_cpu_bytes + self.kv_cpu_bytes + self.compute_cpu_bytes


def gpu_placement(block_count: int, n_gpu_layers: int, placement: Placement) -> tuple[int, bool]:
    """(first block on the GPU, output on the GPU) for `-ngl n_gpu_layers`; negative = all."""
    k = block_count + 1 if n_gpu_layers < 0 else min(n_gpu_layers, block_count + 1)
    if placement is Placement.OUTPUT_FIRST:
        # llama_model_base::load_tensors: i_gpu_start = max(n_layer + 1 - ngl, 0), the output
        # counting as layer n_layer
        return max(block_count + 1 - k, 0) if k else block_count, k >= 1
    return block_count - min(k, block_count), k > block_count


def estimate_layers(
    model: ModelSpec,
    run: RunParams,
    n_gpu_layers: int,
    *,
    placement: Placement = DEFAULT_PLACEMENT,
    overheads: Overheads = DEFAULT_OVERHEADS,
) -> LayerEstimate:
    """Where the memory goes with `-ngl n_gpu_layers` (negative = all)."""
    n = model.block_count
    k = n + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n + 1)
    first, output_gpu = gpu_placement(n, k, placement)
    kv = kv_layer_bytes(model, run)
    gpu_blocks = range(first, n)
    weights_gpu = sum(model.block_device_bytes[il] for il in gpu_blocks)
    weights_cpu = model.input_bytes + sum(model.block_bytes[il] for il in range(first))
    if output_gpu:
        weights_gpu += model.output_device_bytes
    else:
        weights_cpu += model.output_bytes  # a tied output is token_embd itself, mapped once
    kv_gpu = sum(kv[il] for il in gpu_blocks)
    kv_cpu = sum(kv) - kv_gpu
    if k == 0:
        # CPU only: the plan hides the GPU from the server, so nothing lands there
        compute_cpu = estimate_compute(model, run)
        return LayerEstimate(
            0, n, placement, n, False, 0, 0, 0, 0, weights_cpu, kv_cpu, compute_cpu
        )
    partial = first > 0 or not output_gpu
    if partial and run.op_offload and ubatch_tokens(run) >= OP_OFFLOAD_MIN_BATCH:
        # op offload: big batches run the CPU layers' matrix products on the GPU too, copying
        # one CPU-resident layer's weights at a time into the GPU's compute buffer
        cpu_weights = [model.block_device_bytes[il] for il in range(first)]
        if not output_gpu:
            cpu_weights.append(model.output_device_bytes)
        compute_gpu = estimate_compute(model, run) + max(cpu_weights, default=0)
    else:
        compute_gpu = estimate_compute(model, run, layers=first < n, output=output_gpu)
    compute_cpu = estimate_compute(model, run, layers=first > 0, output=not output_gpu)
    return LayerEstimate(
        n_gpu_layers=k,
        block_count=n,
        placement=placement,
        first_gpu_block=first,
        output_on_gpu=output_gpu,
        weights_gpu_bytes=weights_gpu,
        kv_gpu_bytes=kv_gpu,
        compute_gpu_bytes=compute_gpu,
        context_bytes=overheads.cuda_context_bytes,
        weights_cpu_bytes=weights_cpu,
        kv_cpu_bytes=kv_cpu,
        compute_cpu_bytes=compute_cpu,
    )


def choose_layers(
    model: ModelSpec,
    run: RunParams,
    free_bytes: int,
    *,
    placement: Placement = DEFAULT_PLACEMENT,
    overheads: Overheads = DEFAULT_OVERHEADS,
) -> LayerEstimate:
    """The largest `-ngl` whose GPU use fits in `free_bytes` (the caller has already set the
    card's margin aside); 0 (CPU only) when not even the output layer fits."""
    for k in range(model.block_count + 1, 0, -1):
        estimate = estimate_layers(model, run, k, placement=placement, overheads=overheads)
        if estimate.gpu_bytes <= free_bytes:
            return estimate
    return estimate_layers(model, run, 0, placement=placement, overheads=overheads)


__all__ = [
    "DEFAULT_OVERHEADS",
    "DEFAULT_PLACEMENT",
    "LayerEstimate",
    "ModelSpec",
    "Overheads",
    "Placement",
    "RunParams",
    "choose_layers",
    "describe_model",
    "estimate_compute",
    "estimate_layers",
    "gpu_placement",
    "kv_cells",
    "kv_layer_bytes",
    "llama_cpp_python_run",
    "llama_server_run",
    "run_params_for",
]
