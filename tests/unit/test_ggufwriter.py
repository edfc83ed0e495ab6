"""ggufwriter: what it writes, read back through the gguf package's own reader."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diversityd_lab import ggufwriter
from diversityd_lab.ggufwriter import FIRST_PIECE_ID, LLAMA_3_8B_SHAPE, Geometry, write_gguf


def field(reader: GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def tensors_by_name(reader: GGUFReader) -> dict[str, Any]:
    return {tensor.name: tensor for tensor in reader.tensors}


def ggml_shape(tensor: Any) -> list[int]:
    return [int(n) for n in tensor.shape]


def test_default_geometry_round_trips(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf")
    reader = GGUFReader(path)
    g = Geometry()

    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.name") == "diversityd-tiny"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert field(reader, "llama.block_count") == g.n_layer
    assert field(reader, "llama.embedding_length") == g.n_embd
    assert field(reader, "llama.feed_forward_length") == g.n_ff
    assert field(reader, "llama.attention.head_count") == g.n_head
    assert field(reader, "llama.attention.head_count_kv") == g.n_head_kv
    assert field(reader, "llama.context_length") == g.n_ctx_train
    assert field(reader, "llama.rope.dimension_count") == g.n_embd // g.n_head
    assert field(reader, "llama.vocab_size") == g.n_vocab
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)

    tensors = tensors_by_name(reader)
    expected_names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for layer in range(g.n_layer):
        for part in (
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ):
            expected_names.add(f"blk.{layer}.{part}.weight")
    assert set(tensors) == expected_names

    # GGUF lists shapes in ggml order: row length first.
    kv_width = g.n_head_kv * (g.n_embd // g.n_head)
    assert ggml_shape(tensors["token_embd.weight"]) == [g.n_embd, g.n_vocab]
    assert ggml_shape(tensors["output.weight"]) == [g.n_embd, g.n_vocab]
    assert ggml_shape(tensors["blk.0.attn_q.weight"]) == [g.n_embd, g.n_embd]
    assert ggml_shape(tensors["blk.0.attn_k.weight"]) == [g.n_embd, kv_width]
    assert ggml_shape(tensors["blk.0.attn_v.weight"]) == [g.n_embd, kv_width]
    assert ggml_shape(tensors["blk.0.ffn_gate.weight"]) == [g.n_embd, g.n_ff]
    assert ggml_shape(tensors["blk.0.ffn_down.weight"]) == [g.n_ff, g.n_embd]
    assert ggml_shape(tensors["blk.3.attn_norm.weight"]) == [g.n_embd]
    assert all(t.tensor_type == GGMLQuantizationType.F32 for t in reader.tensors)


def test_tokenizer_is_llama_with_byte_tokens_and_chatml(tmp_path: Path) -> None:
    reader = GGUFReader(write_gguf(tmp_path / "tiny.gguf"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    scores = field(reader, "tokenizer.ggml.scores")

    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert len(tokens) == len(types) == len(scores) == 512
    assert len(set(tokens)) == len(tokens)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3:FIRST_PIECE_ID] == [f"<0x{b:02X}>" for b in range(256)]
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert set(types[3:FIRST_PIECE_ID]) == {gguf.TokenType.BYTE}
    assert set(types[FIRST_PIECE_ID:]) == {gguf.TokenType.NORMAL}
    # Every piece a model may emit renders as printable text.
    assert all(token.replace("\u2581", " ").isprintable() for token in tokens[FIRST_PIECE_ID:])
    assert field(reader, "tokenizer.ggml.unknown_token_id") == 0
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")


def test_output_rows_of_control_and_byte_tokens_are_zero(tmp_path: Path) -> None:
    reader = GGUFReader(write_gguf(tmp_path / "tiny.gguf"))
    output = np.asarray(tensors_by_name(reader)["output.weight"].data)
    assert output.shape == (512, 128)
    assert not output[:FIRST_PIECE_ID].any()
    assert np.all(np.abs(output[FIRST_PIECE_ID:]).sum(axis=1) > 0)
    # The input embeddings of those tokens stay random: only the output is masked.
    embeddings = np.asarray(tensors_by_name(reader)["token_embd.weight"].data)
    assert np.abs(embeddings[:FIRST_PIECE_ID]).sum() > 0


def test_tied_embeddings_drop_output_and_mask_token_embd(tmp_path: Path) -> None:
    reader = GGUFReader(write_gguf(tmp_path / "tied.gguf", Geometry(tied_embeddings=True)))
    tensors = tensors_by_name(reader)
    assert "output.weight" not in tensors
    embeddings = np.asarray(tensors["token_embd.weight"].data)
    assert not embeddings[:FIRST_PIECE_ID].any()
    assert np.all(np.abs(embeddings[FIRST_PIECE_ID:]).sum(axis=1) > 0)


@pytest.mark.parametrize(
    ("file_type", "ggml_type", "llama_file_type"),
    [
        ("F32", GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        ("F16", GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        ("Q8_0", GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
        ("Q4_0", GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    ],
)
def test_file_types_quantize_matrices_and_keep_norms_f32(
    tmp_path: Path,
    file_type: str,
    ggml_type: GGMLQuantizationType,
    llama_file_type: gguf.LlamaFileType,
) -> None:
    reader = GGUFReader(write_gguf(tmp_path / "m.gguf", Geometry(file_type=file_type)))
    assert field(reader, "general.file_type") == llama_file_type
    for tensor in reader.tensors:
        want = GGMLQuantizationType.F32 if len(tensor.shape) == 1 else ggml_type
        assert tensor.tensor_type == want, tensor.name
        block_size, type_size = gguf.GGML_QUANT_SIZES[want]
        assert int(tensor.n_bytes) == int(tensor.n_elements) // block_size * type_size
    # tensor_specs (what the VRAM estimator may size without writing) agrees with the file.
    specs = {spec.name: spec for spec in ggufwriter.tensor_specs(Geometry(file_type=file_type))}
    assert [t.name for t in reader.tensors] == list(specs)
    for tensor in reader.tensors:
        assert int(tensor.n_bytes) == specs[tensor.name].nbytes(file_type)
        assert tensor.tensor_type == specs[tensor.name].ggml_type(file_type)
    if file_type in ("Q8_0", "Q4_0"):
        assert field(reader, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    # The zeroed output rows survive quantization.
    output = tensors_by_name(reader)["output.weight"]
    values = gguf.quants.dequantize(np.asarray(output.data), output.tensor_type)
    assert not values[:FIRST_PIECE_ID].any()
    assert np.abs(values[FIRST_PIECE_ID:]).sum() > 0


def test_smaller_types_make_smaller_files(tmp_path: Path) -> None:
    sizes = {
        file_type: write_gguf(tmp_path / f"{file_type}.gguf", Geometry(file_type=file_type))
        .stat()
        .st_size
        for file_type in ("F32", "F16", "Q8_0", "Q4_0")
    }
    assert sizes["F32"] > sizes["F16"] > sizes["Q8_0"] > sizes["Q4_0"]


def test_qwen2_adds_qkv_biases(tmp_path: Path) -> None:
    reader = GGUFReader(write_gguf(tmp_path / "q.gguf", Geometry(arch="qwen2")))
    tensors = tensors_by_name(reader)
    assert field(reader, "general.architecture") == "qwen2"
    assert field(reader, "qwen2.block_count") == 4
    assert ggml_shape(tensors["blk.0.attn_q.bias"]) == [128]
    assert ggml_shape(tensors["blk.0.attn_k.bias"]) == [64]
    assert ggml_shape(tensors["blk.3.attn_v.bias"]) == [64]
    assert "output.weight" in tensors


def test_gemma2_is_tied_with_sliding_window_and_post_norms(tmp_path: Path) -> None:
    reader = GGUFReader(write_gguf(tmp_path / "g.gguf", Geometry(arch="gemma2")))
    tensors = tensors_by_name(reader)
    assert field(reader, "general.architecture") == "gemma2"
    assert field(reader, "gemma2.attention.sliding_window") == ggufwriter.GEMMA2_SLIDING_WINDOW
    assert "output.weight" not in tensors
    assert "blk.0.post_attention_norm.weight" in tensors
    assert "blk.0.post_ffw_norm.weight" in tensors


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    first = write_gguf(tmp_path / "a.gguf", seed=7).read_bytes()
    again = write_gguf(tmp_path / "b.gguf", seed=7).read_bytes()
    other = write_gguf(tmp_path / "c.gguf", seed=8).read_bytes()
    assert first == again
    assert len(first) == len(other)
    assert first != other


def test_tiny_model_writes_well_under_a_second(tmp_path: Path) -> None:
    started = time.monotonic()
    write_gguf(tmp_path / "tiny.gguf")
    assert time.monotonic() - started < 1.0


def test_sparse_file_has_the_dense_layout_but_no_data(tmp_path: Path) -> None:
    dense = write_gguf(tmp_path / "dense.gguf", Geometry(file_type="Q8_0"))
    sparse = write_gguf(tmp_path / "sparse.gguf", Geometry(file_type="Q8_0", sparse=True))
    assert sparse.stat().st_size == dense.stat().st_size

    def layout(path: Path) -> list[tuple[str, int, list[int], int, int]]:
        reader = GGUFReader(path)
        return [
            (t.name, int(t.tensor_type), ggml_shape(t), int(t.n_bytes), int(t.data_offset))
            for t in reader.tensors
        ]

    assert layout(sparse) == layout(dense)
    data = tensors_by_name(GGUFReader(sparse))["blk.0.attn_q.weight"].data
    assert not np.asarray(data).any()


def llama_parameters(g: Geometry) -> tuple[int, int]:
    """(matrix elements, norm elements) of an untied llama, counted from the architecture."""
    kv_width = g.n_head_kv * (g.n_embd // g.n_head)
    per_layer = 2 * g.n_embd * g.n_embd + 2 * g.n_embd * kv_width + 3 * g.n_embd * g.n_ff
    matrices = 2 * g.n_vocab * g.n_embd + g.n_layer * per_layer
    norms = g.n_layer * 2 * g.n_embd + g.n_embd
    return matrices, norms


def test_sparse_8b_writes_in_seconds_full_size_on_paper_small_on_disk(tmp_path: Path) -> None:
    started = time.monotonic()
    path = write_gguf(tmp_path / "8b.gguf", LLAMA_3_8B_SHAPE)
    assert time.monotonic() - started < 10.0

    matrices, norms = llama_parameters(LLAMA_3_8B_SHAPE)
    assert 8.0e9 < matrices + norms < 8.1e9  # Llama 3.1 8B has 8.03 B
    q4_block, q4_bytes = gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
    data_bytes = matrices // q4_block * q4_bytes + 4 * norms
    stat = path.stat()
    metadata_bytes = stat.st_size - data_bytes
    assert 0 < metadata_bytes < 4 * 2**20  # header, 128k-token vocabulary, tensor table
    assert stat.st_blocks * 512 < 8 * 2**20  # the data is a hole: only metadata is on disk
    with path.open("rb") as model:
        header = model.read(24)
    assert header[:4] == b"GGUF"
    assert int.from_bytes(header[8:16], "little") == 2 + 9 * LLAMA_3_8B_SHAPE.n_layer + 1


def test_sparse_8b_tensor_table_reads_back(tmp_path: Path) -> None:
    # Same shape with a small vocabulary: GGUFReader needs ~8 s to parse 128k token strings.
    geometry = replace(LLAMA_3_8B_SHAPE, n_vocab=1024)
    reader = GGUFReader(write_gguf(tmp_path / "8b-small-vocab.gguf", geometry))
    tensors = tensors_by_name(reader)
    matrices, norms = llama_parameters(geometry)
    assert len(tensors) == 2 + 9 * geometry.n_layer + 1
    assert sum(int(t.n_elements) for t in reader.tensors) == matrices + norms
    assert ggml_shape(tensors["token_embd.weight"]) == [4096, 1024]
    assert ggml_shape(tensors["blk.31.attn_k.weight"]) == [4096, 1024]
    assert ggml_shape(tensors["blk.31.ffn_down.weight"]) == [14336, 4096]
    assert tensors["blk.31.ffn_down.weight"].tensor_type == GGMLQuantizationType.Q4_0
    assert tensors["output_norm.weight"].tensor_type == GGMLQuantizationType.F32
    last = max(reader.tensors, key=lambda t: int(t.data_offset))
    assert (
        int(last.data_offset) + int(last.n_bytes)
        <= (tmp_path / "8b-small-vocab.gguf").stat().st_size
    )


def test_sparse_f16_8b_is_twice_as_big_as_it_has_parameters(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "8b-f16.gguf", replace(LLAMA_3_8B_SHAPE, file_type="F16"))
    matrices, norms = llama_parameters(LLAMA_3_8B_SHAPE)
    metadata_bytes = path.stat().st_size - (2 * matrices + 4 * norms)
    assert 0 < metadata_bytes < 4 * 2**20
    assert path.stat().st_blocks * 512 < 8 * 2**20


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "models" / "tiny.gguf"
    write_gguf(path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="n_head"):
        write_gguf(path, Geometry(n_head=5))
    assert path.read_bytes() == before  # a rejected write leaves the old model alone
    write_gguf(path, Geometry(file_type="Q4_0"))
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]
    assert GGUFReader(path).tensors[0].tensor_type == GGMLQuantizationType.Q4_0


@pytest.mark.parametrize(
    ("geometry", "message"),
    [
        (Geometry(arch="mamba"), "arch"),
        (Geometry(file_type="Q5_K"), "file_type"),
        (Geometry(n_embd=130), "n_head"),
        (Geometry(n_embd=100), "even"),
        (Geometry(n_head_kv=3), "n_head_kv"),
        (Geometry(n_vocab=259), "n_vocab"),
        (Geometry(n_embd=144, n_head=4, file_type="Q8_0"), "multiples of 32"),
        (Geometry(n_ff=200, file_type="Q4_0"), "n_ff"),
        (Geometry(n_layer=0), "n_layer"),
    ],
)
def test_geometries_llama_cpp_would_reject_are_refused(geometry: Geometry, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        geometry.check()


def test_cli_writes_the_geometry_it_is_given(tmp_path: Path) -> None:
    out = tmp_path / "cli.gguf"
    options = "--layers 2 --embd 64 --heads 2 --kv-heads 1 --ff 96 --vocab 300 --ctx-train 512"
    code = ggufwriter.main([str(out), *options.split(), "--tied", "--type", "Q8_0", "--seed", "3"])
    assert code == 0
    reader = GGUFReader(out)
    assert field(reader, "llama.block_count") == 2
    assert field(reader, "llama.embedding_length") == 64
    assert field(reader, "llama.attention.head_count_kv") == 1
    assert field(reader, "llama.feed_forward_length") == 96
    assert field(reader, "llama.context_length") == 512
    assert len(field(reader, "tokenizer.ggml.tokens")) == 300
    assert "output.weight" not in tensors_by_name(reader)
    assert (
        out.read_bytes()
        == write_gguf(
            tmp_path / "api.gguf",
            Geometry(
                n_layer=2,
                n_embd=64,
                n_head=2,
                n_head_kv=1,
                n_ff=96,
                n_vocab=300,
                n_ctx_train=512,
                tied_embeddings=True,
                file_type="Q8_0",
            ),
            seed=3,
        ).read_bytes()
    )


def test_cli_rejects_a_bad_geometry_with_usage_exit(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ggufwriter.main([str(tmp_path / "x.gguf"), "--heads", "3"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "x.gguf").exists()


@st.composite
def geometries(draw: st.DrawFn) -> Geometry:
    n_head_kv = draw(st.integers(1, 3))
    n_head = n_head_kv * draw(st.integers(1, 3))
    return Geometry(
        arch=draw(st.sampled_from(ggufwriter.ARCHITECTURES)),
        n_layer=draw(st.integers(1, 3)),
        n_embd=n_head * draw(st.sampled_from([32, 64])),
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=32 * draw(st.integers(1, 4)),
        n_vocab=draw(st.integers(FIRST_PIECE_ID + 1, 1200)),
        tied_embeddings=draw(st.booleans()),
        file_type=draw(st.sampled_from(ggufwriter.FILE_TYPES)),
        sparse=draw(st.booleans()),
    )


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(geometry=geometries())
def test_any_valid_geometry_round_trips(tmp_path: Path, geometry: Geometry) -> None:
    g = geometry
    reader = GGUFReader(write_gguf(tmp_path / "any.gguf", g))
    tensors = tensors_by_name(reader)
    head_dim = g.n_embd // g.n_head
    assert field(reader, f"{g.arch}.attention.head_count") == g.n_head
    assert field(reader, f"{g.arch}.block_count") == g.n_layer
    assert ggml_shape(tensors["token_embd.weight"]) == [g.n_embd, g.n_vocab]
    assert ggml_shape(tensors[f"blk.{g.n_layer - 1}.attn_k.weight"]) == [
        g.n_embd,
        g.n_head_kv * head_dim,
    ]
    assert ggml_shape(tensors[f"blk.{g.n_layer - 1}.ffn_down.weight"]) == [g.n_ff, g.n_embd]
    assert ("output.weight" in tensors) == (not g.tied_embeddings and g.arch != "gemma2")
    assert len(field(reader, "tokenizer.ggml.tokens")) == g.n_vocab
