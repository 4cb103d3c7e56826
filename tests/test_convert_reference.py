"""Byte-level comparison with llama.cpp's own converter (convert_hf_to_gguf.py of the pinned sdist).

Every miniature shape is converted by both tools; metadata (except provenance keys), key order,
tensor names, types, shapes, relative offsets and data bytes must be identical.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from corral.convert.converter import convert_checkpoint
from corral.convert.minimodel import MiniSpec, build_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [
    os.environ.get("CORRAL_REF_CONVERTER", ""),
    str(REPO / ".venv/reference/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"),
]
REF_CONVERTER = next((Path(c) for c in _CANDIDATES if c and Path(c).is_file()), None)
# Keys that name or describe the source (folder name, size label) rather than the model.
PROVENANCE = ("general.name", "general.basename", "general.size_label", "general.finetune", "general.version",
              "general.license", "general.tags", "general.languages", "general.base_model", "general.organization")


@dataclass(frozen=True)
class Case:
    name: str
    spec: MiniSpec
    outtypes: tuple[str, ...]


CASES = (
    # GQA 4:1, BF16, two shards, llama3 rope scaling (rope_freqs), instruct template.
    Case("gqa4-bf16", MiniSpec(n_embd=128, n_layer=2, n_head=4, n_head_kv=1, n_ff=256), ("bf16", "q8_0")),
    # Tied embeddings (Llama 3.2 style), F16 input, MHA, rope_parameters config with head_dim,
    # FFN rows of 208 values (not a multiple of 32: Q8_0 falls back to F16 there).
    Case("tied-f16", MiniSpec(n_embd=128, n_layer=1, n_head=2, n_head_kv=2, n_ff=208, tie_embeddings=True,
                              dtype="float16", config_style="rope_parameters", head_dim_in_config=True, shards=1),
         ("q8_0", "auto")),
    # F32 input, GQA 2:1, head_dim 16, base model (no template), no rope scaling.
    Case("gqa2-f32", MiniSpec(n_embd=96, n_layer=2, n_head=6, n_head_kv=3, n_ff=160, dtype="float32",
                              instruct=False, rope_scaling=False, shards=3), ("f32", "bf16")),
)
SPLIT_CASE, SPLIT_SIZE = "gqa4-bf16", "12M"  # llama.cpp: M = 10^6


def _reference(src: Path, out: Path, outtype: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    assert REF_CONVERTER is not None
    cmd = [sys.executable, str(REF_CONVERTER), str(src), "--outfile", str(out), "--outtype", outtype, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """Every (case, outtype) converted by llama.cpp (in parallel) and by corral."""
    if REF_CONVERTER is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py not found (set CORRAL_REF_CONVERTER or run `make venv`)")
    root = tmp_path_factory.mktemp("refcmp")
    jobs = []
    for case in CASES:
        src = build_checkpoint(root / case.name / "Mini-Model", case.spec, seed=3)
        for outtype in case.outtypes:
            jobs.append((case.name, outtype, src, root / case.name / f"ref-{outtype}.gguf", ()))
    split_src = root / SPLIT_CASE / "Mini-Model"
    (root / "split-ref").mkdir()
    jobs.append((SPLIT_CASE, "split", split_src, root / "split-ref" / "m.gguf", ("--split-max-size", SPLIT_SIZE)))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda j: _reference(j[2], j[3], "bf16" if j[1] == "split" else j[1], j[4]), jobs))
    for job, res in zip(jobs, results):
        assert res.returncode == 0, f"reference converter failed on {job[0]}/{job[1]}:\n{res.stderr[-3000:]}"
    pairs: dict[tuple[str, str], tuple[Path, Path]] = {}
    for case_name, outtype, src, ref, _ in jobs:
        if outtype == "split":
            continue
        ours = ref.with_name(f"ours-{outtype}.gguf")
        convert_checkpoint(src, ours, outtype=outtype)
        pairs[(case_name, outtype)] = (ours, ref)
    (root / "split-ours").mkdir()
    from corral.convert.units import parse_size

    result = convert_checkpoint(split_src, root / "split-ours" / "m.gguf", outtype="bf16",
                                split_max_size=parse_size(SPLIT_SIZE + "B"))
    pairs[(SPLIT_CASE, "split")] = (result.paths[0].parent, root / "split-ref")
    return pairs


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    if vtype in sizes:
        return pos + sizes[vtype]
    if vtype == 8:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    assert vtype == 9, vtype
    sub, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if sub in sizes:
        return pos + sizes[sub] * count
    for _ in range(count):
        pos = _skip_value(buf, pos, sub)
    return pos


def _load(path: Path) -> tuple[list[tuple[str, bytes]], list[tuple], bytes]:
    """(key, raw typed value bytes) in order, tensor infos with relative offsets, and the data section."""
    buf = path.read_bytes()
    magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
    assert magic == 0x46554747 and version == 3
    pos = 24
    kvs = []
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", buf, pos)
        key = buf[pos + 8 : pos + 8 + klen].decode()
        start = pos + 8 + klen
        (vtype,) = struct.unpack_from("<I", buf, start)
        pos = _skip_value(buf, start + 4, vtype)
        kvs.append((key, buf[start:pos]))
    infos = []
    for _ in range(n_tensors):
        (nlen,) = struct.unpack_from("<Q", buf, pos)
        name = buf[pos + 8 : pos + 8 + nlen].decode()
        pos += 8 + nlen
        (nd,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{nd}Q", buf, pos + 4)
        ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        infos.append((name, dims, ttype, offset))
    data_start = (pos + 31) // 32 * 32
    return kvs, infos, buf[data_start:]


def assert_same_gguf(ours: Path, ref: Path) -> None:
    """Same non-provenance metadata (order and bytes), tensor infos and tensor data."""
    o_kv, o_ti, o_data = _load(ours)
    r_kv, r_ti, r_data = _load(ref)
    keep = lambda kv: not kv[0].startswith(PROVENANCE)  # noqa: E731
    assert [k for k, _ in filter(keep, o_kv)] == [k for k, _ in filter(keep, r_kv)]
    for (key, mine), (_, theirs) in zip(filter(keep, o_kv), filter(keep, r_kv)):
        assert mine == theirs, f"metadata {key} differs"
    assert o_ti == r_ti
    if o_data != r_data:
        for name, _, _, offset in o_ti:
            assert o_data[offset : offset + 64] == r_data[offset : offset + 64], f"tensor {name} differs"
        raise AssertionError("tensor data differs")


@pytest.mark.parametrize(("case", "outtype"), [(c.name, t) for c in CASES for t in c.outtypes])
def test_identical_to_llama_cpp_converter(converted: dict, case: str, outtype: str) -> None:
    ours, ref = converted[(case, outtype)]
    assert_same_gguf(ours, ref)


def test_expected_tensor_types(converted: dict) -> None:
    from gguf import GGMLQuantizationType as T

    q8 = {name: T(t).name for name, _, t, _ in _load(converted[("tied-f16", "q8_0")][0])[1]}
    assert q8["blk.0.ffn_down.weight"] == "F16"  # 208-value rows cannot be Q8_0 blocks
    assert q8["blk.0.ffn_up.weight"] == "Q8_0" and q8["blk.0.attn_norm.weight"] == "F32"
    assert q8["rope_freqs.weight"] == "F32" and "output.weight" not in q8  # tied: no output tensor
    f32 = {name for name, *_ in _load(converted[("gqa2-f32", "f32")][0])[1]}
    assert "rope_freqs.weight" not in f32 and "output.weight" in f32


def test_split_shards_identical_to_llama_cpp(converted: dict) -> None:
    ours_dir, ref_dir = converted[(SPLIT_CASE, "split")]
    ours = sorted(ours_dir.iterdir())
    refs = sorted(ref_dir.iterdir())
    assert [p.name for p in ours] == [p.name for p in refs]
    assert len(ours) > 2 and ours[0].name.endswith(f"-00001-of-{len(ours):05d}.gguf")
    assert_same_gguf(ours[0], refs[0])
    for mine, theirs in zip(ours[1:], refs[1:]):
        assert mine.read_bytes() == theirs.read_bytes()


def test_split_output_loads_in_llama_cpp(converted: dict) -> None:
    from llama_cpp import Llama

    first = sorted(converted[(SPLIT_CASE, "split")][0].iterdir())[0]
    llm = Llama(model_path=str(first), n_ctx=64, n_threads=1, verbose=False)
    try:
        tokens = llm.tokenize(b"Hello world")
        assert tokens[0] == 128000 and len(tokens) == 3
        llm.eval(tokens)
        assert np.isfinite(np.asarray(llm.scores[len(tokens) - 1])).all()
    finally:
        llm.close()
