"""A lean GGUF header reader: metadata and the tensor table, never the tensor data.

Multi-GB models cost what their header costs: the file is memory-mapped and only the pages
holding the header are touched. Large arrays (`tokenizer.ggml.tokens`, `.merges`, ...) are
skipped, keeping only their element type and length. Checks follow llama.cpp's own loader
(ggml/src/gguf.cpp): magic, version 2 or 3, sane counts, unique keys and names, known types,
rows that are whole blocks, contiguous aligned offsets, and a data region inside the file.

This module imports nothing heavy (no numpy, no `gguf` package): `diversityctl plan` reads an
8B model's header in tens of milliseconds. The type table below is copied from the `gguf`
package's `GGML_QUANT_SIZES`; a unit test keeps the two in step.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from diversityd.errors import DiversitydError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_COUNT = 1 << 24  # tensors or keys: far above any real model, far below a garbage count
KEEP_ARRAY_MAX = 4096  # numeric arrays up to this length are kept (per-layer values)
KEEP_STRING_ARRAY_MAX = 64  # string arrays up to this length are kept (tags, languages)

# ggml type id -> (name, elements per block, bytes per block); from gguf.constants
# GGML_QUANT_SIZES (gguf 0.19.0), plus Q2_0 from the pinned llama.cpp's ggml.h/ggml-common.h.
GGML_TYPES: Mapping[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),  # not in gguf 0.19.0; block_q2_0 = ggml_half + 64/4 bytes
}
GGML_TYPE_IDS: Mapping[str, int] = {name: type_id for type_id, (name, _, _) in GGML_TYPES.items()}
FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
INT_TYPES = frozenset({"I8", "I16", "I32", "I64"})

# GGUF metadata value types (gguf.constants.GGUFValueType): id -> (name, struct format).
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = 8, 9, 10, 11, 12
_SCALAR_FORMATS: Mapping[int, str] = {
    _UINT8: "B",
    _INT8: "b",
    _UINT16: "H",
    _INT16: "h",
    _UINT32: "I",
    _INT32: "i",
    _FLOAT32: "f",
    _BOOL: "?",
    _UINT64: "Q",
    _INT64: "q",
    _FLOAT64: "d",
}
VALUE_TYPE_NAMES: Mapping[int, str] = {
    _UINT8: "UINT8",
    _INT8: "INT8",
    _UINT16: "UINT16",
    _INT16: "INT16",
    _UINT32: "UINT32",
    _INT32: "INT32",
    _FLOAT32: "FLOAT32",
    _BOOL: "BOOL",
    _STRING: "STRING",
    _ARRAY: "ARRAY",
    _UINT64: "UINT64",
    _INT64: "INT64",
    _FLOAT64: "FLOAT64",
}

# llama.cpp's split files: model-00001-of-00003.gguf
SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFError(DiversitydError, ValueError):
    """The file is not a GGUF model this reader (or llama.cpp) can load."""

    exit_code = 2

    def __init__(self, path: str | os.PathLike[str], problem: str, *, hint: str | None = None):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}", hint=hint)


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array too long to keep: its element type and length only."""

    element_type: str  # a VALUE_TYPE_NAMES value
    length: int


MetadataValue = int | float | bool | str | tuple["MetadataValue", ...] | SkippedArray


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (token_embd: n_embd, n_vocab)
    ggml_type: int
    offset: int  # from the start of the data region
    n_bytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def is_quantized(self) -> bool:
        name = self.type_name
        return name not in FLOAT_TYPES and name not in INT_TYPES


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    version: int
    file_size: int
    alignment: int
    data_offset: int  # absolute: where the tensor data region starts
    metadata: Mapping[str, MetadataValue]
    tensors: tuple[TensorInfo, ...]

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else ""

    @property
    def tensor_bytes(self) -> int:
        """All tensor bytes in this file (without the alignment padding between tensors)."""
        return sum(t.n_bytes for t in self.tensors)

    @property
    def data_size(self) -> int:
        """The data region as llama.cpp maps it: from the first tensor to the last one's end."""
        if not self.tensors:
            return 0
        return max(t.offset + t.n_bytes for t in self.tensors) - min(t.offset for t in self.tensors)


def tensor_nbytes(shape: Sequence[int], ggml_type: int) -> int:
    """Bytes of a tensor of this shape (ggml order) and type; rows must be whole blocks."""
    _, block_size, type_size = GGML_TYPES[ggml_type]
    count = 1
    for dim in shape:
        count *= dim
    return count // block_size * type_size


def row_nbytes(ggml_type: int, n_elements: int) -> int:
    """ggml_row_size: bytes of `n_elements` values of the type (rounded up to whole blocks)."""
    _, block_size, type_size = GGML_TYPES[ggml_type]
    return -(-n_elements // block_size) * type_size


class _Cursor:
    """Reads little- or big-endian GGUF fields from a buffer, failing with the file's name."""

    def __init__(self, path: str, data: mmap.mmap | bytes, endian: str) -> None:
        self.path = path
        self.data = data
        self.size = len(data)
        self.pos = 0
        self.endian = endian
        self._u32 = struct.Struct(endian + "I")
        self._u64 = struct.Struct(endian + "Q")

    def fail(self, problem: str, hint: str | None = None) -> GGUFError:
        return GGUFError(self.path, problem, hint=hint)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated: {what} at byte {self.pos} needs {n} bytes, the file has "
                f"{self.size - self.pos} left",
                hint="the download or copy is incomplete; fetch the file again",
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = self._u32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(value)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = self._u64.unpack_from(self.data, self.pos)
        self.pos += 8
        return int(value)

    def string(self, what: str) -> str:
        length = self.u64(f"the length of {what}")
        self.need(length, what)
        raw = bytes(self.data[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        length = self.u64(f"the length of {what}")
        self.need(length, what)
        self.pos += length

    def scalar(self, value_type: int, what: str) -> int | float | bool:
        fmt = _SCALAR_FORMATS[value_type]
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(self.endian + fmt, self.data, self.pos)
        self.pos += size
        return value  # type: ignore[no-any-return]

    def value(self, value_type: int, key: str) -> MetadataValue:
        if value_type in _SCALAR_FORMATS:
            return self.scalar(value_type, f"the value of {key!r}")
        if value_type == _STRING:
            return self.string(f"the value of {key!r}")
        if value_type == _ARRAY:
            return self.array(key)
        raise self.fail(f"key {key!r} has an unknown value type {value_type}")

    def array(self, key: str) -> MetadataValue:
        element_type = self.u32(f"the element type of {key!r}")
        length = self.u64(f"the length of {key!r}")
        if element_type not in VALUE_TYPE_NAMES:
            raise self.fail(f"array {key!r} has an unknown element type {element_type}")
        if element_type in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[element_type]
            size = struct.calcsize(fmt)
            if length > (self.size - self.pos) // size:
                self.need(length * size, f"the {length} elements of {key!r}")
            if length <= KEEP_ARRAY_MAX:
                values = struct.unpack_from(f"{self.endian}{length}{fmt}", self.data, self.pos)
                self.pos += length * size
                return tuple(values)
            self.pos += length * size
            return SkippedArray(VALUE_TYPE_NAMES[element_type], length)
        if element_type == _STRING:
            # each string is at least its 8-byte length: a cheap bound before walking them
            if length > (self.size - self.pos) // 8:
                self.need(length * 8, f"the {length} strings of {key!r}")
            if length <= KEEP_STRING_ARRAY_MAX:
                return tuple(self.string(f"element {i} of {key!r}") for i in range(length))
            self._skip_strings(length, key)
            return SkippedArray("STRING", length)
        # an array of arrays: rare; walk it, keep nothing
        for _ in range(length):
            self.array(key)
        return SkippedArray("ARRAY", length)

    def _skip_strings(self, count: int, key: str) -> None:
        """Step over `count` strings reading only their lengths (the vocabulary: 128k+)."""
        unpack = self._u64.unpack_from
        data, pos, size = self.data, self.pos, self.size
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"a string length in {key!r}")
            (length,) = unpack(data, pos)
            pos += 8 + length
        if pos > size:
            self.pos = size
            raise self.fail(
                f"truncated: the strings of {key!r} run past the end of the file",
                hint="the download or copy is incomplete; fetch the file again",
            )
        self.pos = pos


def read_gguf(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read and check one GGUF file's header; raise GGUFError naming the file."""
    name = str(path)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < 24:
                raise GGUFError(
                    name,
                    f"not a GGUF file: {size} bytes, too short for a GGUF header",
                    hint="pass the path of a .gguf model",
                )
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(name, data, size)
    except IsADirectoryError:
        raise GGUFError(name, "is a directory, not a GGUF file") from None
    except FileNotFoundError:
        raise GGUFError(name, "no such file", hint="check the model path") from None
    except PermissionError:
        raise GGUFError(name, "permission denied", hint="check the file's permissions") from None
    except OSError as exc:
        raise GGUFError(name, f"cannot read: {exc.strerror or exc}") from None


def _parse(path: str, data: mmap.mmap | bytes, size: int) -> GGUFHeader:
    magic = bytes(data[:4])
    if magic != GGUF_MAGIC:
        raise GGUFError(
            path,
            f"not a GGUF file: the magic is {magic!r}, expected {GGUF_MAGIC!r}",
            hint="pass the path of a .gguf model (safetensors and ggml/ggjt files are not GGUF)",
        )
    (version,) = struct.unpack_from("<I", data, 4)
    endian = "<"
    if version & 0xFFFF == 0 and version != 0:  # written on a big-endian machine
        endian = ">"
        (version,) = struct.unpack_from(">I", data, 4)
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(
            path,
            f"GGUF version {version} is not supported (only 2 and 3)",
            hint="convert the model again with a current llama.cpp",
        )
    cursor = _Cursor(path, data, endian)
    cursor.pos = 8
    n_tensors = cursor.u64("the tensor count")
    n_kv = cursor.u64("the metadata count")
    # every tensor entry takes at least 28 bytes, every key/value at least 13
    if n_tensors > MAX_COUNT or n_tensors * 28 > size:
        raise cursor.fail(f"implausible tensor count {n_tensors} for a {size}-byte file")
    if n_kv > MAX_COUNT or n_kv * 13 > size:
        raise cursor.fail(f"implausible metadata count {n_kv} for a {size}-byte file")

    metadata: dict[str, MetadataValue] = {}
    for index in range(n_kv):
        key = cursor.string(f"key {index}")
        if not key:
            raise cursor.fail(f"metadata key {index} is empty")
        if key in metadata:
            raise cursor.fail(f"duplicate metadata key {key!r}")
        value_type = cursor.u32(f"the type of {key!r}")
        metadata[key] = cursor.value(value_type, key)

    alignment_value = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (
        not isinstance(alignment_value, int)
        or isinstance(alignment_value, bool)
        or alignment_value <= 0
        or alignment_value & (alignment_value - 1)
    ):
        raise cursor.fail(f"general.alignment {alignment_value!r} is not a power of 2")
    alignment = alignment_value

    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for index in range(n_tensors):
        name = cursor.string(f"the name of tensor {index}")
        if name in seen:
            raise cursor.fail(f"duplicate tensor name {name!r}")
        seen.add(name)
        n_dims = cursor.u32(f"the dimension count of {name!r}")
        if n_dims > MAX_DIMS:
            raise cursor.fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        shape = tuple(cursor.u64(f"dimension {d} of {name!r}") for d in range(n_dims))
        ggml_type = cursor.u32(f"the type of {name!r}")
        offset = cursor.u64(f"the offset of {name!r}")
        if ggml_type not in GGML_TYPES:
            raise cursor.fail(
                f"tensor {name!r} has unknown ggml type {ggml_type}",
                hint="a newer llama.cpp may know it; update diversityd",
            )
        type_name, block_size, _ = GGML_TYPES[ggml_type]
        if shape and shape[0] % block_size:
            raise cursor.fail(
                f"tensor {name!r}: rows of {shape[0]} elements are not whole {type_name} "
                f"blocks of {block_size}"
            )
        elements = 1
        for dim in shape:
            elements *= dim
        if elements >= 1 << 63:
            raise cursor.fail(f"tensor {name!r} has an impossible shape {shape}")
        tensors.append(TensorInfo(name, shape, ggml_type, offset, tensor_nbytes(shape, ggml_type)))

    data_offset = -(-cursor.pos // alignment) * alignment if tensors else cursor.pos
    expected = 0
    for tensor in tensors:
        if tensor.offset != expected:
            raise cursor.fail(
                f"tensor {tensor.name!r} has offset {tensor.offset}, expected {expected} "
                "(tensors must follow each other, aligned)"
            )
        expected += -(-tensor.n_bytes // alignment) * alignment
    if tensors:
        end = data_offset + max(t.offset + t.n_bytes for t in tensors)
        if end > size:
            raise cursor.fail(
                f"truncated: the tensor data ends at byte {end}, the file has {size} "
                f"({end - size} missing)",
                hint="the download or copy is incomplete; fetch the file again",
            )
    return GGUFHeader(
        path=path,
        version=version,
        file_size=size,
        alignment=alignment,
        data_offset=data_offset,
        metadata=metadata,
        tensors=tuple(tensors),
    )


def split_paths(path: str | os.PathLike[str], count: int) -> list[Path]:
    """The files of a split model (`name-00001-of-0000N.gguf`), given any one of them."""
    first = Path(path)
    match = SPLIT_NAME.match(first.name)
    if match is None:
        raise GGUFError(
            first,
            f"split.count is {count} but the name does not look like NAME-00001-of-"
            f"{count:05d}.gguf",
            hint="keep the split files' original names side by side",
        )
    prefix = match.group("prefix")
    return [first.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def read_model(path: str | os.PathLike[str]) -> tuple[GGUFHeader, ...]:
    """The header of a model, and of each further file when it is split (`split.count`)."""
    first = read_gguf(path)
    count = first.metadata.get("split.count", 1)
    if not isinstance(count, int) or count <= 1:
        return (first,)
    paths = split_paths(Path(path).resolve(), count)
    headers = [first if p == Path(path).resolve() else read_gguf(p) for p in paths]
    return tuple(headers)
