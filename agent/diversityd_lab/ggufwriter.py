"""Write GGUF models that the real llama servers load: tiny random ones for tests, and sparse
full-size ones (metadata and tensor table real, tensor data a hole) for VRAM estimates.

The tokenizer is llama's SentencePiece kind: `<unk>`, `<s>`, `</s>`, the 256 byte tokens
(llama.cpp requires them) and printable pieces. The output rows of the control and byte
tokens are zero, so with random weights a printable piece always wins the argmax: replies
are printable text that runs to max_tokens, deterministically at temperature 0.

    python -m diversityd_lab.ggufwriter tiny.gguf --type Q8_0
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import string
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

ARCHITECTURES = ("llama", "qwen2", "gemma2")
FILE_TYPES = ("F32", "F16", "Q8_0", "Q4_0")

_QUANT_TYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
    "Q4_0": gguf.GGMLQuantizationType.Q4_0,
}
_LLAMA_FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_BYTE_ID = 3
FIRST_PIECE_ID = FIRST_BYTE_ID + 256
SPACE_MARK = "\u2581"  # SentencePiece's word-start mark; llama.cpp renders it as a space

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

RMS_EPS = 1e-5
ROPE_FREQ_BASE = 10000.0
WEIGHT_STD = 0.02
# gemma2's own values: every other layer sees a 4096-token window; logits are soft-capped.
GEMMA2_SLIDING_WINDOW = 4096
GEMMA2_ATTN_SOFTCAP = 50.0
GEMMA2_FINAL_SOFTCAP = 30.0


@dataclass(frozen=True)
class Geometry:
    """The shape of a model. `arch` is llama, qwen2 (adds q/k/v biases) or gemma2 (sliding
    window on every other layer, post-norms, always tied embeddings)."""

    arch: str = "llama"
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 256
    n_vocab: int = 512  # <unk>, <s>, </s>, the 256 byte tokens, then printable pieces
    n_ctx_train: int = 2048
    tied_embeddings: bool = False  # no output.weight: llama.cpp reuses token_embd as output
    file_type: str = "F32"  # F32, F16, Q8_0, Q4_0 (norms and biases stay F32)
    sparse: bool = False  # tensor data left as a hole: apparent size full, real size tiny
    name: str = "diversityd-tiny"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ties_embeddings(self) -> bool:
        # gemma2 has no output tensor at all; llama.cpp rejects one as unexpected.
        return self.tied_embeddings or self.arch == "gemma2"

    def check(self) -> None:
        """Raise ValueError naming the first field llama.cpp would reject."""
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch {self.arch!r}: expected one of {', '.join(ARCHITECTURES)}")
        if self.file_type not in FILE_TYPES:
            raise ValueError(
                f"file_type {self.file_type!r}: expected one of {', '.join(FILE_TYPES)}"
            )
        for field in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_ctx_train"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be positive")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_head_kv")
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for rope")
        if self.n_vocab <= FIRST_PIECE_ID:
            raise ValueError(
                f"n_vocab {self.n_vocab}: needs more than {FIRST_PIECE_ID} "
                "(3 control tokens, 256 byte tokens, at least one printable piece)"
            )
        block = gguf.GGML_QUANT_SIZES[_QUANT_TYPES[self.file_type]][0]
        for field in ("n_embd", "n_ff"):
            if getattr(self, field) % block:
                raise ValueError(
                    f"{field} {getattr(self, field)}: rows of {self.file_type} tensors must "
                    f"be multiples of {block}"
                )


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, row length); GGUF lists it reversed
    quantized: bool  # False: norms and biases, always F32

    def ggml_type(self, file_type: str) -> gguf.GGMLQuantizationType:
        return _QUANT_TYPES[file_type] if self.quantized else gguf.GGMLQuantizationType.F32

    def nbytes(self, file_type: str) -> int:
        block_size, type_size = gguf.GGML_QUANT_SIZES[self.ggml_type(file_type)]
        return math.prod(self.shape) // block_size * type_size


# Llama 3.1 8B's shape (GQA, a 128k-token vocabulary) with its tensor data a sparse hole:
# the file the VRAM estimator's accuracy and speed checks use (a few MB on disk).
LLAMA_3_8B_SHAPE = Geometry(
    n_layer=32,
    n_embd=4096,
    n_head=32,
    n_head_kv=8,
    n_ff=14336,
    n_vocab=128256,
    n_ctx_train=131072,
    file_type="Q4_0",
    sparse=True,
    name="llama-3-8b-shape",
)


def tensor_specs(geometry: Geometry) -> list[TensorSpec]:
    """Every tensor llama.cpp expects for the geometry, in file order."""
    g = geometry
    kv_width = g.n_head_kv * g.head_dim
    specs = [TensorSpec("token_embd.weight", (g.n_vocab, g.n_embd), quantized=True)]
    for layer in range(g.n_layer):
        blk = f"blk.{layer}"
        specs += [
            TensorSpec(f"{blk}.attn_norm.weight", (g.n_embd,), quantized=False),
            TensorSpec(f"{blk}.attn_q.weight", (g.n_embd, g.n_embd), quantized=True),
            TensorSpec(f"{blk}.attn_k.weight", (kv_width, g.n_embd), quantized=True),
            TensorSpec(f"{blk}.attn_v.weight", (kv_width, g.n_embd), quantized=True),
        ]
        if g.arch == "qwen2":
            specs += [
                TensorSpec(f"{blk}.attn_q.bias", (g.n_embd,), quantized=False),
                TensorSpec(f"{blk}.attn_k.bias", (kv_width,), quantized=False),
                TensorSpec(f"{blk}.attn_v.bias", (kv_width,), quantized=False),
            ]
        specs.append(TensorSpec(f"{blk}.attn_output.weight", (g.n_embd, g.n_embd), True))
        if g.arch == "gemma2":
            specs.append(TensorSpec(f"{blk}.post_attention_norm.weight", (g.n_embd,), False))
        specs += [
            TensorSpec(f"{blk}.ffn_norm.weight", (g.n_embd,), quantized=False),
            TensorSpec(f"{blk}.ffn_gate.weight", (g.n_ff, g.n_embd), quantized=True),
            TensorSpec(f"{blk}.ffn_up.weight", (g.n_ff, g.n_embd), quantized=True),
            TensorSpec(f"{blk}.ffn_down.weight", (g.n_embd, g.n_ff), quantized=True),
        ]
        if g.arch == "gemma2":
            specs.append(TensorSpec(f"{blk}.post_ffw_norm.weight", (g.n_embd,), False))
    specs.append(TensorSpec("output_norm.weight", (g.n_embd,), quantized=False))
    if not g.ties_embeddings:
        specs.append(TensorSpec("output.weight", (g.n_vocab, g.n_embd), quantized=True))
    return specs


def _printable_pieces() -> Iterator[str]:
    """Unique printable pieces: the space mark, printable ASCII, then lowercase words with and
    without a leading space, ever longer (enough for any vocabulary size)."""
    yield SPACE_MARK
    yield from (chr(c) for c in range(0x21, 0x7F))
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            word = "".join(letters)
            yield SPACE_MARK + word
            if length > 1:  # single letters are already among the ASCII pieces
                yield word


def vocabulary(n_vocab: int) -> tuple[list[str], list[int], list[float]]:
    """Tokens, token types and scores of the llama (SentencePiece) tokenizer."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += itertools.islice(_printable_pieces(), n_vocab - len(tokens))
    types = [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL)]
    types += [int(gguf.TokenType.BYTE)] * 256
    types += [int(gguf.TokenType.NORMAL)] * (n_vocab - FIRST_PIECE_ID)
    # SentencePiece merges the highest-scoring pair first: shorter pieces score higher.
    scores = [0.0] * FIRST_PIECE_ID + [-float(i) for i in range(n_vocab - FIRST_PIECE_ID)]
    return tokens, types, scores


def _add_metadata(writer: gguf.GGUFWriter, g: Geometry) -> None:
    writer.add_name(g.name)
    writer.add_file_type(int(_LLAMA_FILE_TYPES[g.file_type]))
    if g.file_type in ("Q8_0", "Q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(g.n_vocab)
    writer.add_context_length(g.n_ctx_train)
    writer.add_embedding_length(g.n_embd)
    writer.add_block_count(g.n_layer)
    writer.add_feed_forward_length(g.n_ff)
    writer.add_head_count(g.n_head)
    writer.add_head_count_kv(g.n_head_kv)
    writer.add_key_length(g.head_dim)
    writer.add_value_length(g.head_dim)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(g.head_dim)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    if g.arch == "gemma2":
        writer.add_sliding_window(GEMMA2_SLIDING_WINDOW)
        writer.add_attn_logit_softcapping(GEMMA2_ATTN_SOFTCAP)
        writer.add_final_logit_softcapping(GEMMA2_FINAL_SOFTCAP)

    tokens, types, scores = vocabulary(g.n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def _tensor_data(
    spec: TensorSpec, g: Geometry, rng: np.random.Generator
) -> tuple[np.ndarray[Any, Any], gguf.GGMLQuantizationType | None]:
    """Random weights (ones for norms) in the file's type; raw_dtype for add_tensor."""
    if not spec.quantized:
        if spec.name.endswith(".bias"):
            return rng.standard_normal(spec.shape, dtype=np.float32) * WEIGHT_STD, None
        return np.ones(spec.shape, dtype=np.float32), None
    weights = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(WEIGHT_STD)
    is_output = spec.name == "output.weight" or (
        spec.name == "token_embd.weight" and g.ties_embeddings
    )
    if is_output:
        weights[:FIRST_PIECE_ID] = 0.0  # control and byte tokens never win the argmax
    if g.file_type == "F32":
        return weights, None
    if g.file_type == "F16":
        return weights.astype(np.float16), None
    qtype = _QUANT_TYPES[g.file_type]
    return gguf.quants.quantize(weights, qtype), qtype


def _write_sparse(writer: gguf.GGUFWriter, specs: Sequence[TensorSpec], g: Geometry) -> None:
    """Header, metadata and tensor table for real; the data region only as a length."""
    for spec in specs:
        # A dtype other than uint8 with raw_dtype keeps the shape in elements, not bytes.
        writer.add_tensor_info(
            spec.name,
            spec.shape,
            np.dtype(np.float32),
            spec.nbytes(g.file_type),
            raw_dtype=spec.ggml_type(g.file_type),
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    out = writer.fout[0]
    alignment = writer.data_alignment
    data_start = gguf.GGUFWriter.ggml_pad(out.tell(), alignment)
    data_size = sum(gguf.GGUFWriter.ggml_pad(s.nbytes(g.file_type), alignment) for s in specs)
    out.flush()
    out.truncate(data_start + data_size)


def write_gguf(path: Path, geometry: Geometry = Geometry(), *, seed: int = 0) -> Path:
    """Write the model to `path` atomically (temporary file, then rename); return `path`."""
    geometry.check()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(geometry)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        writer = gguf.GGUFWriter(temp, geometry.arch)
        try:
            _add_metadata(writer, geometry)
            if geometry.sparse:
                _write_sparse(writer, specs, geometry)
            else:
                rng = np.random.default_rng(seed)
                for spec in specs:
                    data, raw_dtype = _tensor_data(spec, geometry, rng)
                    writer.add_tensor(spec.name, data, raw_dtype=raw_dtype)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
        finally:
            writer.close()
        temp.chmod(0o644)  # mkstemp's 0600 would hide the model from a server run as another user
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def parse_args(argv: Sequence[str] | None) -> tuple[Path, Geometry, int]:
    defaults = Geometry()
    parser = argparse.ArgumentParser(
        prog="python -m diversityd_lab.ggufwriter",
        description="Write a random-weight GGUF model the llama servers load.",
    )
    parser.add_argument("out", type=Path, help="file to write (atomically)")
    parser.add_argument("--arch", choices=ARCHITECTURES, default=defaults.arch)
    parser.add_argument("--layers", type=int, default=defaults.n_layer)
    parser.add_argument("--embd", type=int, default=defaults.n_embd)
    parser.add_argument("--heads", type=int, default=defaults.n_head)
    parser.add_argument("--kv-heads", type=int, default=defaults.n_head_kv)
    parser.add_argument("--ff", type=int, default=defaults.n_ff)
    parser.add_argument("--vocab", type=int, default=defaults.n_vocab)
    parser.add_argument("--ctx-train", type=int, default=defaults.n_ctx_train)
    parser.add_argument("--tied", action="store_true", help="no output.weight")
    parser.add_argument("--type", choices=FILE_TYPES, default=defaults.file_type)
    parser.add_argument("--sparse", action="store_true", help="leave the tensor data a hole")
    parser.add_argument("--name", default=defaults.name)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    geometry = Geometry(
        arch=args.arch,
        n_layer=args.layers,
        n_embd=args.embd,
        n_head=args.heads,
        n_head_kv=args.kv_heads,
        n_ff=args.ff,
        n_vocab=args.vocab,
        n_ctx_train=args.ctx_train,
        tied_embeddings=args.tied,
        file_type=args.type,
        sparse=args.sparse,
        name=args.name,
    )
    try:
        geometry.check()
    except ValueError as error:
        parser.error(str(error))
    return args.out, geometry, args.seed


def main(argv: Sequence[str] | None = None) -> int:
    out, geometry, seed = parse_args(argv)
    started = time.monotonic()
    write_gguf(out, geometry, seed=seed)
    elapsed = time.monotonic() - started
    stat = out.stat()
    print(
        f"{out}: {stat.st_size} bytes ({stat.st_blocks * 512} on disk), written in {elapsed:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
