"""Streaming GGUF writer: header from (metadata, tensor infos), data tensor by tensor, split, atomic.

Lower-level API (used by the converter and by the streaming quantizer):

    specs = [TensorSpec(name, shape_gguf, ggml_type), ...]      # tensor_specs.TensorSpec, in output order
    with GGUFStreamWriter(out, kvs, specs, split_max_size=None, force=False, progress=cb) as w:
        for spec in specs:
            w.begin_tensor(spec.name)
            w.write(chunk)                       # bytes / memoryview / contiguous np.ndarray, any number
            w.copy_from(fd, offset, length)      # or move bytes straight from another file
            w.end_tensor()                       # checks the byte count, pads to the alignment
    # -> all shards renamed into place atomically; on any exception nothing is left at `out`.
    # A full disk or quota (ENOSPC/EDQUOT) while writing surfaces as InsufficientDisk naming `out`.

`kvs` is a list of (key, value, GGUFValueType); array element types are inferred like gguf-py
(str -> STRING, bool -> BOOL, int -> INT32, float -> FLOAT32). The file layout follows gguf-py's
GGUFWriter: GGUF v3, alignment 32, tensors padded to 32 bytes; with `split_max_size`, a new shard
starts when the next tensor would push the current one past the limit, shards are named
`<stem>-00001-of-0000N.gguf`, the first carries all metadata plus split.no / split.count /
split.tensors.count, the others carry only the split keys.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    GGUFValueType,
    Keys,
)

from .atomic import atomic_outputs, check_free_space, check_output_path
from .errors import InsufficientDisk, InvalidFile, UsageError
from .progress import ProgressFn, no_progress
from .tensor_specs import TensorSpec

KV = tuple[str, Any, GGUFValueType]
COPY_CHUNK = 64 * 1024 * 1024
_SIMPLE = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
}  # fmt: skip


def pad_to(n: int, align: int = GGUF_DEFAULT_ALIGNMENT) -> int:
    return (n + align - 1) // align * align


def _array_type(values: Sequence[Any]) -> GGUFValueType:
    first = values[0]
    if isinstance(first, (str, bytes)):
        return GGUFValueType.STRING
    if isinstance(first, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(first, (int, np.integer)):
        return GGUFValueType.INT32
    if isinstance(first, (float, np.floating)):
        return GGUFValueType.FLOAT32
    raise TypeError(f"unsupported GGUF array element {first!r}")


def _pack_string(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return struct.pack("<Q", len(raw)) + raw


def pack_value(value: Any, vtype: GGUFValueType) -> bytes:
    """The bytes of a GGUF value (type tag not included)."""
    if vtype in _SIMPLE:
        return struct.pack(_SIMPLE[vtype], value)
    if vtype == GGUFValueType.STRING:
        return _pack_string(value)
    if vtype == GGUFValueType.ARRAY:
        if len(value) == 0:
            raise UsageError("empty GGUF arrays are not allowed")
        sub = _array_type(value)
        head = struct.pack("<IQ", int(sub), len(value))
        if sub == GGUFValueType.STRING:
            return head + b"".join(_pack_string(v) for v in value)
        fmt = {GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?"}[sub]
        return head + np.asarray(value, dtype=fmt).tobytes()
    raise TypeError(f"unsupported GGUF value type {vtype!r}")


def pack_kv(key: str, value: Any, vtype: GGUFValueType) -> bytes:
    return _pack_string(key) + struct.pack("<I", int(vtype)) + pack_value(value, vtype)


def build_header(kvs: Sequence[KV], tensors: Sequence[TensorSpec], align: int = GGUF_DEFAULT_ALIGNMENT) -> bytes:
    """Magic, version, counts, metadata, tensor infos, padded to the data alignment."""
    parts = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(kvs))]
    parts += [pack_kv(k, v, t) for k, v, t in kvs]
    offset = 0
    for spec in tensors:
        dims = [int(d) for d in spec.shape]
        parts.append(_pack_string(spec.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, int(spec.ggml_type), offset))
        offset += pad_to(spec.nbytes, align)
    header = b"".join(parts)
    return header + b"\0" * (pad_to(len(header), align) - len(header))


def plan_shards(tensors: Sequence[TensorSpec], split_max_size: int | None) -> list[list[TensorSpec]]:
    """Group tensors into shards the way gguf-py does (size of unpadded tensor data per shard)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in tensors:
        if split_max_size and shards[-1] and size + spec.nbytes > split_max_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


def shard_kvs(kvs: Sequence[KV], n_shards: int, n_tensors: int) -> list[list[KV]]:
    if n_shards == 1:
        return [list(kvs)]
    out: list[list[KV]] = []
    for i in range(n_shards):
        split = [
            (Keys.Split.LLM_KV_SPLIT_NO, i, GGUFValueType.UINT16),
            (Keys.Split.LLM_KV_SPLIT_COUNT, n_shards, GGUFValueType.UINT16),
            (Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, n_tensors, GGUFValueType.INT32),
        ]
        out.append((list(kvs) if i == 0 else []) + split)
    return out


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(exc: BaseException | None, out: Path) -> InsufficientDisk | None:
    """InsufficientDisk naming `out` when `exc` is an OSError for a full disk or quota (else None)."""
    if isinstance(exc, InsufficientDisk) or not isinstance(exc, OSError) or exc.errno not in _DISK_FULL_ERRNOS:
        return None
    return InsufficientDisk(f"disk full while writing the output ({exc.strerror or os.strerror(exc.errno)})", path=out)


def _write_all(fh: BinaryIO, data: Any) -> int:
    view = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else memoryview(np.ascontiguousarray(data)).cast("B")
    done = 0
    total = len(view)
    while done < total:
        n = fh.write(view[done:])
        if n is None or n <= 0:  # pragma: no cover - raw file writes block
            raise OSError(errno.EIO, "short write")
        done += n
    return total


class GGUFStreamWriter:
    """Writes one GGUF (or a split set) tensor by tensor; see the module docstring."""

    def __init__(
        self,
        out: str | Path,
        kvs: Sequence[KV],
        tensors: Sequence[TensorSpec],
        *,
        split_max_size: int | None = None,
        force: bool = False,
        progress: ProgressFn | None = None,
    ) -> None:
        self.out = Path(out)
        self.shards = plan_shards(tensors, split_max_size)
        self.paths = shard_paths(self.out, len(self.shards))
        self.headers = [
            build_header(kv, shard) for kv, shard in zip(shard_kvs(kvs, len(self.shards), len(tensors)), self.shards)
        ]
        self.total_bytes = sum(len(h) + sum(pad_to(t.nbytes) for t in s) for h, s in zip(self.headers, self.shards))
        self.data_bytes = sum(t.nbytes for t in tensors)
        self.force = force
        self.progress = progress or no_progress
        self._order = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._current: TensorSpec | None = None
        self._written = 0
        self._done_bytes = 0
        self._files: list[BinaryIO] = []
        self._stack: ExitStack | None = None
        self.temps: list[Path] = []

    # -- lifecycle ------------------------------------------------------------------
    def __enter__(self) -> GGUFStreamWriter:
        for path in self.paths:
            check_output_path(path, force=self.force)
        # Temp files are complete before any old output is replaced: the full size must be free.
        check_free_space(self.out.parent, self.total_bytes)
        self._stack = ExitStack()
        try:
            self.temps = self._stack.enter_context(atomic_outputs(self.paths))
            for tmp, header in zip(self.temps, self.headers):
                fh = self._stack.enter_context(open(tmp, "wb", buffering=0))
                _write_all(fh, header)
                self._files.append(fh)
        except BaseException as exc:
            self._stack.__exit__(*sys.exc_info())
            full = disk_full_error(exc, self.out)
            if full is not None:
                raise full from exc
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        assert self._stack is not None
        if exc_type is None and (self._next != len(self._order) or self._current is not None):
            missing = self._current.name if self._current else self._order[self._next][1].name
            err = RuntimeError(f"GGUF writer for {self.out} closed before tensor {missing!r} was written")
            self._stack.__exit__(RuntimeError, err, None)
            raise err
        try:
            self._stack.__exit__(exc_type, exc, tb)  # removes the temp files on error, fsyncs + renames on success
        except OSError as err:  # fsync or rename of the finished file
            full = disk_full_error(err, self.out)
            if full is not None:
                raise full from err
            raise
        full = disk_full_error(exc, self.out)  # a write, copy or padding inside the `with` block
        if full is not None:
            raise full from exc
        return False

    # -- data ---------------------------------------------------------------------
    @property
    def _fh(self) -> BinaryIO:
        return self._files[self._order[self._next][0]]

    def begin_tensor(self, name: str) -> None:
        if self._current is not None:
            raise RuntimeError(f"tensor {self._current.name!r} not finished before {name!r}")
        if self._next >= len(self._order):
            raise RuntimeError(f"unexpected tensor {name!r}: all tensors already written")
        spec = self._order[self._next][1]
        if spec.name != name:
            raise RuntimeError(f"tensor {name!r} written out of order (expected {spec.name!r})")
        self._current = spec
        self._written = 0

    def _advance(self, n: int) -> None:
        assert self._current is not None
        self._written += n
        if self._written > self._current.nbytes:
            raise RuntimeError(f"tensor {self._current.name!r}: {self._written} bytes written, expected {self._current.nbytes}")
        self._done_bytes += n
        self.progress(self._done_bytes, self.data_bytes, self._current.name)

    def write(self, data: Any) -> None:
        """Append bytes (bytes, memoryview or numpy array, little-endian) to the current tensor."""
        if self._current is None:
            raise RuntimeError("write() outside begin_tensor()/end_tensor()")
        self._advance(_write_all(self._fh, data))

    def copy_from(self, fd: int, offset: int, length: int) -> None:
        """Append `length` bytes at `offset` of file descriptor `fd` (in-kernel copy where possible)."""
        if self._current is None:
            raise RuntimeError("copy_from() outside begin_tensor()/end_tensor()")
        out_fd = self._fh.fileno()
        done = 0
        use_kernel = hasattr(os, "copy_file_range")
        while done < length:
            step = min(COPY_CHUNK, length - done)
            n = 0
            if use_kernel:
                try:
                    n = os.copy_file_range(fd, out_fd, step, offset + done)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                        raise
                    use_kernel = False
                    continue
                if n == 0:
                    raise InvalidFile(f"source file ended early while copying {self._current.name!r}")
            else:
                buf = os.pread(fd, step, offset + done)
                if not buf:
                    raise InvalidFile(f"source file ended early while copying {self._current.name!r}")
                n = _write_all(self._fh, buf)
            done += n
            self._advance(n)

    def end_tensor(self) -> None:
        spec = self._current
        if spec is None:
            raise RuntimeError("end_tensor() without begin_tensor()")
        if self._written != spec.nbytes:
            raise RuntimeError(f"tensor {spec.name!r}: {self._written} bytes written, expected {spec.nbytes}")
        pad = pad_to(spec.nbytes) - spec.nbytes
        fh = self._fh
        if pad:
            _write_all(fh, b"\0" * pad)
        self._current = None
        self._next += 1
