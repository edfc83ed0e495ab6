"""gguf.py: the lean header reader, checked against the gguf package's own GGUFReader."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest
from gguf import GGUFReader

from diversityd import gguf as lean
from diversityd.errors import DiversitydError
from diversityd.gguf import GGML_TYPES, GGUFError, SkippedArray, read_gguf, read_model
from diversityd_lab.ggufwriter import LLAMA_3_8B_SHAPE, Geometry, write_gguf

GEOMETRIES = {
    "llama-f32-gqa": Geometry(),
    "llama-q8-tied": Geometry(file_type="Q8_0", tied_embeddings=True, n_vocab=600),
    "qwen2-q4": Geometry(arch="qwen2", n_embd=256, n_head=8, n_head_kv=2, file_type="Q4_0"),
    "gemma2-f16": Geometry(arch="gemma2", n_layer=3, file_type="F16"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {name: write_gguf(root / f"{name}.gguf", g) for name, g in GEOMETRIES.items()}


def test_type_table_matches_the_gguf_package() -> None:
    for qtype, (block, size) in gguf.constants.GGML_QUANT_SIZES.items():
        assert GGML_TYPES[int(qtype)] == (qtype.name, block, size)
    extras = set(GGML_TYPES) - {int(q) for q in gguf.constants.GGML_QUANT_SIZES}
    # only what the pinned llama.cpp added after gguf 0.19.0 (Q2_0 = 42)
    assert extras <= {42}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_tensor_table_matches_ggufreader(models: dict[str, Path], name: str) -> None:
    path = models[name]
    ours = read_gguf(path)
    theirs = GGUFReader(path)
    assert ours.version == 3
    assert ours.alignment == theirs.alignment
    assert ours.data_offset == theirs.data_offset
    assert ours.file_size == path.stat().st_size
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.shape == tuple(int(d) for d in ref.shape)
        assert mine.ggml_type == int(ref.tensor_type)
        assert mine.n_bytes == int(ref.n_bytes)
        assert ours.data_offset + mine.offset == int(ref.data_offset)
        assert mine.n_elements == int(ref.n_elements)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_metadata_matches_ggufreader(models: dict[str, Path], name: str) -> None:
    ours = read_gguf(models[name])
    theirs = GGUFReader(models[name])
    assert set(ours.metadata) == set(theirs.fields) - {
        "GGUF.version",
        "GGUF.tensor_count",
        "GGUF.kv_count",
    }
    for key, value in ours.metadata.items():
        expected = theirs.fields[key].contents()
        if isinstance(value, SkippedArray):
            assert isinstance(expected, list)
            assert value.length == len(expected)
            assert value.length > lean.KEEP_STRING_ARRAY_MAX
        elif isinstance(value, tuple):
            assert list(value) == pytest.approx(expected)
        elif isinstance(value, float):
            assert value == pytest.approx(expected)
        else:
            assert value == expected, key


def test_vocabulary_is_skipped_not_read(models: dict[str, Path]) -> None:
    header = read_gguf(models["llama-q8-tied"])
    assert header.metadata["tokenizer.ggml.tokens"] == SkippedArray("STRING", 600)
    scores = header.metadata["tokenizer.ggml.scores"]  # short numeric arrays are kept
    assert isinstance(scores, tuple)
    assert len(scores) == 600
    assert header.metadata["llama.block_count"] == 4
    assert header.architecture == "llama"


def test_sizes_from_types(models: dict[str, Path]) -> None:
    header = read_gguf(models["llama-q8-tied"])
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")
    assert embd.shape == (128, 600)  # ggml order: row length first
    assert embd.type_name == "Q8_0"
    assert embd.is_quantized
    assert embd.n_bytes == 600 * (128 // 32) * 34
    norm = next(t for t in header.tensors if t.name == "output_norm.weight")
    assert norm.type_name == "F32"
    assert not norm.is_quantized
    assert header.tensor_bytes == sum(t.n_bytes for t in header.tensors)
    assert lean.row_nbytes(8, 100) == 4 * 34  # rounded up to whole blocks


def test_sparse_8b_header_reads_fast(tmp_path: Path) -> None:
    geometry = LLAMA_3_8B_SHAPE
    path = write_gguf(tmp_path / "sparse-8b.gguf", geometry)
    assert path.stat().st_blocks * 512 < path.stat().st_size // 100  # really a hole
    started = time.perf_counter()
    header = read_gguf(path)
    elapsed = time.perf_counter() - started
    assert len(header.tensors) == 2 + 32 * 9 + 1
    assert header.metadata["tokenizer.ggml.tokens"] == SkippedArray("STRING", 128256)
    assert header.metadata["tokenizer.ggml.scores"] == SkippedArray("FLOAT32", 128256)
    assert header.data_offset + header.data_size <= header.file_size
    assert elapsed < 0.5, f"reading the header took {elapsed:.3f} s"


def test_importing_the_reader_and_plan_stays_light() -> None:
    code = (
        "import sys, diversityd.gguf, diversityd.vram, diversityd.cli.plan; "
        "heavy = [m for m in ('numpy', 'gguf', 'pynvml', 'yaml') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


# ---------------------------------------------------------------------------------------
# Broken files: each a real file, damaged the way files get damaged


def tensor_entry_offset(data: bytes, name: str) -> int:
    """Where a tensor's entry starts after its name (n_dims) in the tensor table."""
    encoded = name.encode()
    needle = struct.pack("<Q", len(encoded)) + encoded
    start = data.index(needle)
    return start + len(needle)


def test_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b'{"__metadata__": {}}' + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file") as info:
        read_gguf(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, DiversitydError)
    assert info.value.exit_code == 2


def test_too_short_and_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match="too short"):
        read_gguf(empty)
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "absent.gguf")
    with pytest.raises(GGUFError, match="directory"):
        read_gguf(tmp_path)


@pytest.mark.parametrize("version", [1, 4, 7])
def test_unsupported_version(models: dict[str, Path], tmp_path: Path, version: int) -> None:
    data = bytearray(models["llama-f32-gqa"].read_bytes())
    data[4:8] = struct.pack("<I", version)
    path = tmp_path / "v.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=f"version {version} is not supported"):
        read_gguf(path)


def test_version_2_is_read(models: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(models["llama-f32-gqa"].read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 share the little-endian layout
    path = tmp_path / "v2.gguf"
    path.write_bytes(bytes(data))
    assert read_gguf(path).version == 2


@pytest.mark.parametrize("fraction", [0.0001, 0.002, 0.01, 0.3, 0.9, 0.9999])
def test_truncated_anywhere(models: dict[str, Path], tmp_path: Path, fraction: float) -> None:
    data = models["llama-f32-gqa"].read_bytes()
    cut = max(24, int(len(data) * fraction))
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(GGUFError, match="truncated") as info:
        read_gguf(path)
    assert str(path) in str(info.value)


def test_implausible_counts(models: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(models["llama-f32-gqa"].read_bytes())
    data[8:16] = struct.pack("<Q", 1 << 40)
    path = tmp_path / "count.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="implausible tensor count"):
        read_gguf(path)


def test_unknown_tensor_type(models: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(models["llama-f32-gqa"].read_bytes())
    at = tensor_entry_offset(bytes(data), "blk.0.attn_q.weight")
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    data[type_at : type_at + 4] = struct.pack("<I", 77)
    path = tmp_path / "type.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="unknown ggml type 77"):
        read_gguf(path)


def test_rows_must_be_whole_blocks(models: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(models["llama-q8-tied"].read_bytes())
    at = tensor_entry_offset(bytes(data), "blk.1.attn_k.weight")
    data[at + 4 : at + 12] = struct.pack("<Q", 100)  # 100 is not a multiple of Q8_0's 32
    path = tmp_path / "rows.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="not whole Q8_0 blocks"):
        read_gguf(path)


def test_offsets_must_be_contiguous(models: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(models["llama-f32-gqa"].read_bytes())
    at = tensor_entry_offset(bytes(data), "blk.2.ffn_up.weight")
    n_dims = struct.unpack_from("<I", data, at)[0]
    offset_at = at + 4 + 8 * n_dims + 4
    (offset,) = struct.unpack_from("<Q", data, offset_at)
    data[offset_at : offset_at + 8] = struct.pack("<Q", offset + 32)
    path = tmp_path / "offset.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"blk\.2\.ffn_up\.weight.*has offset"):
        read_gguf(path)


def test_split_names() -> None:
    paths = lean.split_paths("/m/qwen-00002-of-00003.gguf", 3)
    assert [p.name for p in paths] == [
        "qwen-00001-of-00003.gguf",
        "qwen-00002-of-00003.gguf",
        "qwen-00003-of-00003.gguf",
    ]
    with pytest.raises(GGUFError, match="does not look like"):
        lean.split_paths("/m/qwen.gguf", 3)


def test_read_model_of_one_file(models: dict[str, Path]) -> None:
    headers = read_model(models["qwen2-q4"])
    assert len(headers) == 1
    assert headers[0].architecture == "qwen2"
