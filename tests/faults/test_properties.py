"""Property tests: the GGUF and safetensors header validators accept every valid file and, on any bytes at
all, either succeed or raise their own error type -- never another exception, never a hang, never a huge
allocation."""

from __future__ import annotations

import json
import resource
import struct
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.convert.errors import InvalidGGUF, InvalidSafetensors
from corral.convert.gguf_file import read_gguf, read_header
from corral.convert.safetensors_io import parse_header, write_safetensors
from corral.convert.safetensors_io import read_header as read_st_header

from .corpus_gguf import small_gguf

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])
FEW = settings(SETTINGS, max_examples=100)  # for the ones that write a whole file with gguf-py
BASE = small_gguf().data
SECONDS = 2.0  # one validation of a < 64 KiB input must never take longer
GROWTH_MB = 256  # nor grow the process's peak memory by more


def _maxrss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _check(call, path: Path, expected: type[Exception]) -> object:
    """Run one validation: success or `expected`, quickly, without a memory spike."""
    rss, start = _maxrss_mb(), time.monotonic()
    try:
        result = call(path)
    except expected as exc:
        assert str(path) in str(exc)
        result = None
    assert time.monotonic() - start < SECONDS
    assert _maxrss_mb() - rss < GROWTH_MB
    return result


def _check_bytes(tmp_path_factory, name: str, data: bytes, call, expected: type[Exception]) -> object:
    """`_check` on a fresh file `name` holding `data`."""
    path = tmp_path_factory.mktemp("p") / name
    path.write_bytes(data)
    return _check(call, path, expected)


# ------------------------------------------------------------------------------------------ GGUF


@SETTINGS
@given(st.binary(max_size=4096))
def test_gguf_random_bytes(tmp_path_factory, data: bytes) -> None:
    _check_bytes(tmp_path_factory, "r.gguf", data, read_gguf, InvalidGGUF)


@SETTINGS
@given(st.binary(max_size=4096))
def test_gguf_random_bytes_after_valid_prefix(tmp_path_factory, tail: bytes) -> None:
    """The magic and version are right, everything after them is random."""
    _check_bytes(tmp_path_factory, "r.gguf", b"GGUF" + struct.pack("<I", 3) + tail, read_gguf, InvalidGGUF)


@st.composite
def mutations(draw) -> bytes:
    """The valid base file with a few bytes overwritten, 64-bit fields set to extremes, or cut short."""
    data = bytearray(BASE)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "u64", "u32", "cut"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "byte":
            data[at] = draw(st.integers(0, 255))
        elif kind == "u64":
            value = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))
            data[at : at + 8] = struct.pack("<Q", value)[: len(data) - at]
        elif kind == "u32":
            data[at : at + 4] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))[: len(data) - at]
        else:
            del data[at:]
            if not data:
                break
    return bytes(data)


@SETTINGS
@given(mutations())
def test_gguf_mutated_valid_file(tmp_path_factory, data: bytes) -> None:
    model = _check_bytes(tmp_path_factory, "m.gguf", data, read_gguf, InvalidGGUF)
    if model is not None:  # whatever passes is internally consistent: data inside the file, no overlap
        size = len(data)
        spans = sorted((t.offset, t.offset + t.nbytes) for t in model.tensors)
        assert all(0 <= a <= b <= size for a, b in spans)
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))


_names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=40)
_scalars = st.one_of(st.integers(-(2**31), 2**31 - 1), st.floats(allow_nan=False, width=32), st.booleans(), _names)
_types = st.sampled_from([GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0])


@FEW
@given(
    kvs=st.dictionaries(_names.map(lambda s: "x." + s), st.one_of(_scalars, st.lists(_names, max_size=5),
                                                                  st.lists(st.integers(0, 1000), max_size=5)),
                        max_size=6),
    tensors=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 3), _types), max_size=5),
)
def test_gguf_valid_files_always_pass(tmp_path_factory, kvs: dict, tensors: list) -> None:
    """Anything gguf-py's own writer produces is accepted and read back exactly."""
    path = tmp_path_factory.mktemp("p") / "v.gguf"
    writer = GGUFWriter(str(path), "llama")
    for key, value in kvs.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_int32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif value:
            writer.add_array(key, value)
    for i, (rows, blocks, ggml_type) in enumerate(tensors):
        shape = (rows, 32 * blocks)
        if ggml_type == GGMLQuantizationType.Q8_0:
            raw = np.zeros((rows, 34 * blocks), dtype=np.uint8)
            writer.add_tensor(f"t{i}", raw, raw_dtype=ggml_type)
        else:
            dtype = np.float32 if ggml_type == GGMLQuantizationType.F32 else np.float16
            writer.add_tensor(f"t{i}", np.full(shape, i, dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = read_gguf(path)
    for key, value in kvs.items():
        if isinstance(value, list) and not value:
            continue
        got = model.metadata[key]
        if isinstance(value, float):
            assert got == np.float32(value)
        else:
            assert got == value
    assert [t.name for t in model.tensors] == [f"t{i}" for i in range(len(tensors))]
    assert [t.shape for t in model.tensors] == [(32 * b, r) for r, b, _ in tensors]


def test_real_converted_model_passes(mini_gguf_bf16: Path) -> None:
    header = read_header(mini_gguf_bf16)
    assert len(header.tensors) > 10 and header.metadata["general.architecture"] == "llama"
    assert header.tensors[-1].offset + header.tensors[-1].nbytes <= header.file_bytes


# ----------------------------------------------------------------------------------- safetensors

_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I64": 8, "F8_E4M3": 1}


@SETTINGS
@given(st.binary(max_size=2048))
def test_safetensors_random_bytes(tmp_path_factory, data: bytes) -> None:
    _check_bytes(tmp_path_factory, "r.safetensors", data, read_st_header, InvalidSafetensors)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from([*_DTYPES, "F128", 7, None]),
    "shape": st.lists(st.integers(-2, 2**40), max_size=4) | _json,
    "data_offsets": st.lists(st.integers(-2, 2**40), min_size=0, max_size=3) | _json,
})


@SETTINGS
@given(header=st.dictionaries(st.text(max_size=10), _entry | _json, max_size=5), data_len=st.integers(0, 4096))
def test_safetensors_random_headers(header: dict, data_len: int) -> None:
    """Structurally random JSON headers: only InvalidSafetensors, and whatever passes tiles the data exactly."""
    raw = json.dumps(header).encode()
    path = Path("/virtual/x.safetensors")
    start = time.monotonic()
    try:
        parsed = parse_header(path, raw, 8 + len(raw) + data_len)
    except InvalidSafetensors as exc:
        assert str(path) in str(exc)
        return
    finally:
        assert time.monotonic() - start < SECONDS
    infos = sorted(parsed.tensors.values(), key=lambda t: t.start)
    assert sum(t.nbytes for t in infos) == data_len
    for t in infos:
        assert t.nbytes == int(np.prod(t.shape, dtype=object)) * _DTYPES.get(t.dtype, 0) or t.dtype not in _DTYPES


@FEW
@given(tensors=st.lists(st.tuples(st.sampled_from(sorted(_DTYPES)), st.lists(st.integers(0, 5), max_size=3)),
                        max_size=6),
       cut=st.integers(0, 64))
def test_safetensors_valid_files_pass_and_truncations_fail(tmp_path_factory, tensors: list, cut: int) -> None:
    path = tmp_path_factory.mktemp("p") / "v.safetensors"
    spec = {f"t{i}": (dtype, tuple(shape), bytes(int(np.prod(shape)) * _DTYPES[dtype]))
            for i, (dtype, shape) in enumerate(tensors)}
    write_safetensors(path, spec)
    header = read_st_header(path)
    assert list(header.tensors) == list(spec) or sorted(header.tensors) == sorted(spec)
    data_len = sum(len(v[2]) for v in spec.values())
    if cut and data_len:
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) - min(cut, data_len)])
        _check(read_st_header, path, InvalidSafetensors)
        try:
            read_st_header(path)
            raise AssertionError("a truncated file passed")
        except InvalidSafetensors:
            pass
