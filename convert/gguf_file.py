"""A validating GGUF header reader (single files and llama.cpp split shards).

Model files come from the internet, so nothing reaches llama.cpp (or `gguf.GGUFReader`)
before its header has been walked here with every count, size and offset checked
against the file: absurd key/tensor counts, oversized strings or arrays, unknown value
or tensor types, tensor data outside the file or overlapping -- each is an
`InvalidGGUF` naming the file. Only the header is read; weights stay on disk.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, Keys

from .errors import InputNotFound, InvalidGGUF
from .gguf_keys import MAX_COUNT, check_known_keys
from .packed_strings import PackedStrings, pack
from .tensor_specs import TensorSpec, tensor_nbytes

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = GGUF_DEFAULT_ALIGNMENT
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING_BYTES = 64 * 1024 * 1024  # a chat template or key is never this large
MAX_ARRAY_DEPTH = 2
PACK_MIN = 4096  # string arrays this long (a vocabulary, its merges) are kept packed
MAX_TENSOR_NAME = 64  # GGML_MAX_NAME: llama.cpp refuses names of 64 bytes or more
_SCALAR = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_U64 = struct.Struct("<Q")
_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class GGUFTensor(TensorSpec):
    """One tensor's header entry: a `TensorSpec` plus where its data lies (absolute `offset` in `file`)."""

    offset: int
    file: Path


@dataclass(frozen=True)
class GGUFHeader:
    """The validated header of one GGUF file."""

    path: Path
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, GGUFValueType]
    kv_bytes: dict[str, int]  # bytes each key/value pair takes in the header (key, type tag, value)
    tensors: tuple[GGUFTensor, ...]
    alignment: int
    data_offset: int
    file_bytes: int


@dataclass(frozen=True)
class GGUFModelFile:
    """A model: one GGUF file or every shard of a split, merged."""

    files: tuple[Path, ...]
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]
    file_bytes: int
    headers: tuple[GGUFHeader, ...] = field(repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get(Keys.General.ARCHITECTURE, "unknown"))

    def arch_key(self, template: str, default: Any = None) -> Any:
        """Read an `{arch}`-templated key such as `Keys.LLM.BLOCK_COUNT`."""
        return self.metadata.get(template.format(arch=self.architecture), default)

    @property
    def n_tokens(self) -> int:
        """How many strings the vocabulary array holds (0: none)."""
        tokens = self.metadata.get(Keys.Tokenizer.LIST)
        return len(tokens) if isinstance(tokens, (list, PackedStrings)) else 0

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)


class _Cursor:
    """Bounds-checked reads from a memory-mapped header."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def fail(self, what: str) -> InvalidGGUF:
        return InvalidGGUF(f"invalid GGUF header: {what}", path=self.path)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated while reading {what} at byte {self.pos}")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        return self.strings(1, what)[0]

    def strings(self, count: int, what: str) -> list[str] | PackedStrings:
        """`count` strings in a row (a vocabulary holds hundreds of thousands, hence the tight loop); from
        PACK_MIN strings on, packed (see `packed_strings`)."""
        buf, pos, size = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        first, packed = pos, count >= PACK_MIN
        out: list[Any] = [""] * count
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"truncated while reading {what} at byte {pos}")
            (length,) = unpack(buf, pos)
            pos += 8
            if length > MAX_STRING_BYTES:
                raise self.fail(f"{what} is {length:,} bytes long (limit {MAX_STRING_BYTES:,})")
            if pos + length > size:
                raise self.fail(f"truncated while reading {what} at byte {pos}")
            out[i] = pos if packed else buf[pos : pos + length].decode("utf-8", errors="replace")
            pos += length
        self.pos = pos
        return pack(buf, first, pos, out) if packed else out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        try:
            kind = GGUFValueType(vtype)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {vtype}") from None
        if kind == GGUFValueType.STRING:
            return self.string(what)
        if kind == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail(f"{what} nests arrays too deeply")
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if count > MAX_COUNT:
                raise self.fail(f"{what} claims {count:,} array elements")
            try:
                ekind = GGUFValueType(etype)
            except ValueError:
                raise self.fail(f"{what} has unknown array element type {etype}") from None
            if ekind in _SCALAR:
                fmt = _SCALAR[ekind]
                size = struct.calcsize(fmt)
                self.need(size * count, what)
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
                self.pos += size * count
                return values
            # strings and nested arrays: each element needs at least 8 bytes
            self.need(8 * count, what)
            if ekind == GGUFValueType.STRING:
                return self.strings(count, what)
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        return self.scalar(_SCALAR[kind], what)


def read_header(path: str | Path) -> GGUFHeader:
    """Read and validate one GGUF file's header; raise InvalidGGUF on anything malformed."""
    path = Path(path)
    if not path.exists():
        raise InputNotFound("no such file", path=path)
    if path.is_dir():
        raise InvalidGGUF("is a directory, not a GGUF file", path=path)
    file_bytes = path.stat().st_size
    if file_bytes < 24:
        raise InvalidGGUF(f"not a GGUF file ({file_bytes} bytes)", path=path)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _parse(buf, path, file_bytes)


def _parse(buf: mmap.mmap | bytes, path: Path, file_bytes: int) -> GGUFHeader:
    cur = _Cursor(buf, path)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise InvalidGGUF("not a GGUF file (bad magic)", path=path)
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise InvalidGGUF(f"unsupported GGUF version {version}", path=path)
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "key/value count")
    # every key/value takes >= 13 bytes and every tensor info >= 32: counts must fit the file
    for count, what, least in ((n_kv, "key/value count", 13), (n_tensors, "tensor count", 32)):
        if count > MAX_COUNT:
            raise cur.fail(f"absurd {what} {count:,}")
        if count * least > file_bytes:
            raise cur.fail(f"{what} {count:,} cannot fit in {file_bytes:,} bytes: truncated or corrupt")

    metadata: dict[str, Any] = {}
    value_types: dict[str, GGUFValueType] = {}
    kv_bytes: dict[str, int] = {}
    for i in range(n_kv):
        start = cur.pos
        key = cur.string(f"key #{i}")
        if not key:
            raise cur.fail(f"key #{i} is empty")
        vtype = cur.scalar("<I", f"type of {key!r}")
        if key in metadata:
            raise cur.fail(f"duplicate key {key!r}")
        metadata[key] = cur.value(vtype, f"value of {key!r}")
        value_types[key] = GGUFValueType(vtype)
        kv_bytes[key] = cur.pos - start

    alignment = metadata.get(Keys.General.ALIGNMENT, DEFAULT_ALIGNMENT)
    if Keys.General.ALIGNMENT in metadata and value_types[Keys.General.ALIGNMENT] != GGUFValueType.UINT32:
        raise cur.fail(f"{Keys.General.ALIGNMENT} must be a uint32")
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"alignment {alignment!r} is not a power of two")
    check_known_keys(metadata, path)

    raw_tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor #{i} name")
        if not name or len(name.encode("utf-8")) >= MAX_TENSOR_NAME:
            raise cur.fail(f"tensor #{i} name is empty or {MAX_TENSOR_NAME}+ bytes long")
        if name in seen:
            raise cur.fail(f"duplicate tensor {name!r}")
        seen.add(name)
        n_dims = cur.scalar("<I", f"dimensions of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.scalar("<Q", f"shape of {name!r}") for _ in range(n_dims))
        if any(d <= 0 or d > 1 << 40 for d in shape):
            raise cur.fail(f"tensor {name!r} has shape {shape}")
        type_id = cur.scalar("<I", f"type of {name!r}")
        try:
            ggml_type = GGMLQuantizationType(type_id)
            block, _ = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise cur.fail(f"tensor {name!r} has unknown type {type_id}") from None
        if shape[0] % block:
            raise cur.fail(f"tensor {name!r} row of {shape[0]} is not a multiple of {ggml_type.name}'s block {block}")
        offset = cur.scalar("<Q", f"offset of {name!r}")
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
        raw_tensors.append((name, shape, ggml_type, offset))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: list[GGUFTensor] = []
    for name, shape, ggml_type, offset in raw_tensors:
        nbytes = tensor_nbytes(shape, ggml_type)
        start = data_offset + offset
        if start + nbytes > file_bytes:
            raise InvalidGGUF(
                f"tensor {name!r} data ({nbytes:,} bytes at {start:,}) runs past the end of the file "
                f"({file_bytes:,} bytes): truncated or corrupt",
                path=path,
            )
        tensors.append(GGUFTensor(name, shape, ggml_type, start, path))
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.offset + a.nbytes > b.offset:
            raise InvalidGGUF(f"tensors {a.name!r} and {b.name!r} overlap", path=path)
    # llama.cpp (gguf.cpp) wants the data laid out in table order, each tensor padded to the alignment
    expected = 0
    for (name, _, _, offset), tensor in zip(raw_tensors, tensors):
        if offset != expected:
            raise InvalidGGUF(f"tensor {name!r} data is at offset {offset:,}, expected {expected:,}", path=path)
        expected += -(-tensor.nbytes // alignment) * alignment
    return GGUFHeader(
        path=path,
        version=version,
        metadata=metadata,
        value_types=value_types,
        kv_bytes=kv_bytes,
        tensors=tuple(tensors),
        alignment=alignment,
        data_offset=data_offset,
        file_bytes=file_bytes,
    )


def split_paths(path: str | Path) -> list[Path]:
    """All shard paths of a llama.cpp split given any one of them (or just [path])."""
    path = Path(path)
    match = _SPLIT_RE.match(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    if count < 1:
        raise InvalidGGUF("split count is zero", path=path)
    return [path.with_name(f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def read_gguf(path: str | Path) -> GGUFModelFile:
    """Read and validate a GGUF model (every shard of a split), header only.

    A vocabulary-sized header takes a fraction of a second to walk, and one command may
    need it several times (validation, planning, loading): results are cached by each
    shard's path, size and modification time, so a changed file is always read again.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFound("no such file", path=path)
    key = []
    for shard in split_paths(path):
        try:
            st = shard.stat()
        except OSError:
            return _read_gguf(path)  # let the uncached path report the missing shard
        key.append((str(shard.resolve()), st.st_size, st.st_mtime_ns))
    return _read_gguf_cached(path, tuple(key))


@lru_cache(maxsize=8)
def _read_gguf_cached(path: Path, key: tuple[tuple[str, int, int], ...]) -> GGUFModelFile:
    return _read_gguf(path)


def clear_header_cache() -> None:
    """Forget the cached headers: a Llama 3 vocabulary is ~30 MiB of Python strings per model, which a loaded model
    no longer needs (and which a memory cgroup would otherwise take from the weights' resident share)."""
    _read_gguf_cached.cache_clear()


def _read_gguf(path: Path) -> GGUFModelFile:
    shards = split_paths(path)
    first = read_header(shards[0])
    declared = first.metadata.get(Keys.Split.LLM_KV_SPLIT_COUNT)
    if declared is not None and int(declared) != len(shards):
        if len(shards) == 1:
            raise InvalidGGUF(f"file is shard 1 of {declared} but is not named like a split", path=path)
        raise InvalidGGUF(f"split.count says {declared} shards, the name says {len(shards)}", path=path)
    headers = [first]
    for shard in shards[1:]:
        if not shard.exists():
            raise InputNotFound(f"missing shard of a split model ({len(shards)} expected)", path=shard)
        headers.append(read_header(shard))
    metadata = dict(first.metadata)
    tensors = tuple(t for h in headers for t in h.tensors)
    names = Counter(t.name for t in tensors)
    dupes = [n for n, c in names.items() if c > 1]
    if dupes:
        raise InvalidGGUF(f"tensor {dupes[0]!r} appears in more than one shard", path=path)
    declared_tensors = metadata.get(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    if declared_tensors is not None and int(declared_tensors) != len(tensors):
        raise InvalidGGUF(f"split.tensors.count says {declared_tensors}, shards hold {len(tensors)}", path=path)
    check_llama_aborts(metadata, tensors, path)
    return GGUFModelFile(
        files=tuple(h.path for h in headers),
        metadata=metadata,
        tensors=tensors,
        file_bytes=sum(h.file_bytes for h in headers),
        headers=tuple(headers),
    )


LLAMA_MAX_LAYERS = 512  # llama.cpp src/llama-hparams.h


def check_llama_aborts(metadata: dict[str, Any], tensors: Sequence[TensorSpec], path: Path) -> None:
    """Reject what makes llama.cpp abort() (or hang) in-process instead of failing the load: a Llama block
    count outside 1..LLAMA_MAX_LAYERS (GGML_ASSERT in llama-model.cpp load_hparams), and a norm or rope_freqs
    tensor that is not F32 (ggml-cpu binary-ops.cpp aborts on an F32 x F16/quant MUL inside the worker
    threads, which then hang; ggml_rope_ext asserts F32 frequency factors)."""
    if metadata.get(Keys.General.ARCHITECTURE) != "llama":
        return
    blocks = metadata.get("llama.block_count")
    if isinstance(blocks, int) and not 1 <= blocks <= LLAMA_MAX_LAYERS:
        raise InvalidGGUF(f"llama.block_count is {blocks}; llama.cpp needs 1..{LLAMA_MAX_LAYERS}", path=path)
    for t in tensors:
        if len(t.shape) == 1 and t.ggml_type != GGMLQuantizationType.F32:
            raise InvalidGGUF(f"tensor {t.name!r} is {t.ggml_type.name}; llama.cpp needs 1-D (norm and rope) "
                              "tensors in F32 and would crash on it", path=path)
