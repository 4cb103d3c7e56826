"""`corral imatrix`: the eval-callback collector against transformers' activations, the files llama-imatrix
writes, quantized and streaming models, and the command line."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from corral.app.cli.main import cli
from corral.app.runtime import imatrix_collect
from corral.app.runtime.chunks import text_chunks
from corral.app.runtime.engine import load_engine
from corral.app.runtime.imatrix_collect import GgmlTensor, ImatrixCollector, compute_imatrix, weight_name
from corral.app.runtime.streaming import units_of
from corral.app.runtime.texts import calibration_text
from corral.convert.errors import OutputExists, UsageError
from corral.convert.gguf_file import read_gguf
from corral.convert.imatrix import load_imatrix
from corral.convert.imatrix_write import ImatrixData, ImatrixEntry, legacy_bytes, write_imatrix
from corral.convert.quantize import quantize_gguf
from tests.helpers.engine import cpu_plan, write_tiny_gguf

N_CTX, N_CHUNKS = 128, 3
HF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}


def _collect(path: Path, *, process_output: bool = True, cancel_after: int | None = None, n_chunks: int = N_CHUNKS,
             collector: ImatrixCollector | None = None, **plan: Any) -> tuple[ImatrixData, list[list[int]], int]:
    """Run the collector over the calibration text's first chunks; (data, the chunks' tokens, the layer
    boundaries the streamer's callback saw)."""
    collector = collector or ImatrixCollector(process_output=process_output)
    engine = load_engine(path, plan=cpu_plan(n_ctx=N_CTX, n_threads=2, n_threads_batch=2, **plan),
                         eval_callback=collector)
    try:
        chunks = text_chunks(engine, calibration_text(), N_CTX, n_chunks)
        tokens = [chunks.chunk(i, engine.bos_id) for i in range(chunks.count)]
        stop: Any = None
        progress: Callable[[int, int], None] | None = None
        if cancel_after is not None:
            import threading

            stop = threading.Event()

            def progress(done: int, total: int) -> None:
                if done == cancel_after:
                    stop.set()

        run = compute_imatrix(engine, collector, chunks, dataset="calib.txt", progress=progress, cancel=stop)
        streamer = engine.streamer
        positions = streamer.positions if streamer is not None else 0
    finally:
        engine.close()
    return run.data, tokens, positions


def _transformers_sums(folder: Path, chunks: list[list[int]]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Per weight, Σx² over every token of each input column, from forward pre-hooks (float64)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for i, layer in enumerate(model.model.layers):
        for attr, short in HF_NAMES.items():
            layer.get_submodule(attr).register_forward_pre_hook(hook_for(f"blk.{i}.{short}.weight"))
    model.lm_head.register_forward_pre_hook(hook_for("output.weight"))
    with torch.no_grad():
        for tokens in chunks:
            model(torch.tensor([tokens]))
    return sums, counts


@pytest.fixture(scope="module")
def f32_run(mini_gguf_f32: Path) -> tuple[ImatrixData, list[list[int]]]:
    data, tokens, _ = _collect(mini_gguf_f32)
    return data, tokens


def _rel_err(ours: ImatrixData, ref: ImatrixData | dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, entry in ours.entries.items():
        want = ref.entries[name].sums if isinstance(ref, ImatrixData) else ref[name]
        got = entry.sums.reshape(-1).astype(np.float64)
        want = np.asarray(want, dtype=np.float64).reshape(-1)
        worst = max(worst, float(np.max(np.abs(got - want) / want)))
    return worst


# ---------------------------------------------------------------- (a) the sums are the activations' squares

@pytest.mark.slow
def test_sums_and_counts_equal_transformers_forward_hooks(f32_run: tuple, mini_checkpoint: Path) -> None:
    data, tokens = f32_run
    ref, ref_counts = _transformers_sums(mini_checkpoint, tokens)
    assert sorted(data.entries) == sorted(ref)  # every q/k/v/o/gate/up/down of every layer, and the head
    assert len(data.entries) == 2 * 7 + 1
    for name, entry in data.entries.items():
        assert entry.sums.shape == (1, ref[name].size)
        assert entry.counts.tolist() == [ref_counts[name]] == [N_CTX * N_CHUNKS]
    err = _rel_err(data, ref)
    assert err <= 1e-3, f"relative error {err:.2e}"
    assert data.chunk_count == N_CHUNKS and data.chunk_size == N_CTX and data.datasets == ("calib.txt",)


def test_output_head_only_when_asked(mini_gguf_f32: Path, f32_run: tuple) -> None:
    data, _, _ = _collect(mini_gguf_f32, process_output=False)
    assert "output.weight" not in data.entries
    assert sorted(data.entries) == sorted(n for n in f32_run[0].entries if n != "output.weight")
    assert _rel_err(data, f32_run[0]) == 0.0  # the same sums, bit for bit


@pytest.mark.slow
def test_interrupted_run_keeps_exactly_the_complete_chunks(mini_gguf_f32: Path, mini_checkpoint: Path) -> None:
    data, tokens, _ = _collect(mini_gguf_f32, cancel_after=1)
    assert data.chunk_count == 1
    assert all(e.counts.tolist() == [N_CTX] for e in data.entries.values())
    one, _ = _transformers_sums(mini_checkpoint, tokens[:1])
    assert _rel_err(data, one) <= 1e-3


def test_weight_names_and_struct_layout() -> None:
    assert weight_name(b"CUDA0#blk.0.attn_k.weight#0") == "blk.0.attn_k.weight"
    assert weight_name(b"blk.3.ffn_down.weight") == "blk.3.ffn_down.weight"
    ggml = imatrix_collect.Ggml()  # checks sizeof(struct ggml_tensor) against ggml_tensor_overhead()
    assert ctypes.sizeof(GgmlTensor) == 336 and ggml.op_name(ggml.mul_mat) == b"MUL_MAT"


# ---------------------------------------------------------------- (b) the files llama-imatrix writes

def _llama_cpp_gguf(path: Path, data: ImatrixData) -> None:
    """The same contents written by ggml's own gguf API, the way llama-imatrix's save_imatrix calls it."""
    lib = imatrix_collect.Ggml().lib

    class InitParams(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    lib.ggml_init.restype, lib.ggml_init.argtypes = vp, [InitParams]
    lib.gguf_init_empty.restype = vp
    lib.gguf_set_val_str.argtypes = [vp, cp, cp]
    lib.gguf_set_arr_str.argtypes = [vp, cp, ctypes.POINTER(cp), ctypes.c_size_t]
    lib.gguf_set_val_u32.argtypes = [vp, cp, ctypes.c_uint32]
    lib.ggml_new_tensor_2d.restype = vp
    lib.ggml_new_tensor_2d.argtypes = [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.ggml_set_name.argtypes = [vp, cp]
    lib.gguf_add_tensor.argtypes = [vp, vp]
    lib.gguf_write_to_file.restype, lib.gguf_write_to_file.argtypes = ctypes.c_bool, [vp, cp, ctypes.c_bool]
    lib.gguf_free.argtypes = lib.ggml_free.argtypes = [vp]
    size = sum(e.sums.size + e.counts.size for e in data.entries.values()) * 4 + 2048 * (len(data.entries) + 1)
    ctx = lib.ggml_init(InitParams(size, None, False))
    gg = lib.gguf_init_empty()
    try:
        lib.gguf_set_val_str(gg, b"general.type", b"imatrix")
        names = (cp * len(data.datasets))(*(d.encode() for d in data.datasets))
        lib.gguf_set_arr_str(gg, b"imatrix.datasets", names, len(data.datasets))
        lib.gguf_set_val_u32(gg, b"imatrix.chunk_count", data.chunk_count)
        lib.gguf_set_val_u32(gg, b"imatrix.chunk_size", data.chunk_size)
        for name in sorted(data.entries):
            entry = data.entries[name]
            n_mat = entry.counts.size
            for suffix, values, ne0 in ((".in_sum2", entry.sums, entry.sums.size // n_mat), (".counts", entry.counts, 1)):
                t = lib.ggml_new_tensor_2d(ctx, 0, ne0, n_mat)
                lib.ggml_set_name(t, (name + suffix).encode())
                raw = np.ascontiguousarray(values, dtype=np.float32).tobytes()
                ctypes.memmove(GgmlTensor.from_address(t).data, raw, len(raw))
                lib.gguf_add_tensor(gg, t)
        assert lib.gguf_write_to_file(gg, str(path).encode(), False)
    finally:
        lib.gguf_free(gg)
        lib.ggml_free(ctx)


def test_gguf_file_is_byte_for_byte_what_llama_imatrix_writes(f32_run: tuple, tmp_path: Path) -> None:
    data = f32_run[0]
    ours = write_imatrix(tmp_path / "ours.gguf", data)
    _llama_cpp_gguf(tmp_path / "ref.gguf", data)
    assert ours.read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    reader = gguf.GGUFReader(ours)
    assert [f.name for f in reader.fields.values()][-4:] == ["general.type", "imatrix.datasets",
                                                             "imatrix.chunk_count", "imatrix.chunk_size"]
    shapes = {t.name: (t.tensor_type, [int(n) for n in t.shape]) for t in reader.tensors}
    assert shapes["blk.1.ffn_down.weight.in_sum2"] == (gguf.GGMLQuantizationType.F32, [512])  # [512, 1]: 1-D
    assert shapes["blk.1.ffn_down.weight.counts"] == (gguf.GGMLQuantizationType.F32, [1])
    assert [t.name for t in reader.tensors][:2] == ["blk.0.attn_k.weight.in_sum2", "blk.0.attn_k.weight.counts"]
    experts = {"blk.0.ffn_up_exps.weight": ImatrixEntry(np.arange(12, dtype=np.float32).reshape(3, 4),
                                                        np.array([2, 0, 4])),
               "blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 8), np.float32), np.array([7]))}
    several = ImatrixData(experts, chunk_count=2, chunk_size=4, datasets=("a.txt", "b.txt"))
    _llama_cpp_gguf(tmp_path / "ref3.gguf", several)
    assert write_imatrix(tmp_path / "ours3.gguf", several).read_bytes() == (tmp_path / "ref3.gguf").read_bytes()


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_round_trip_through_load_imatrix(f32_run: tuple, tmp_path: Path, suffix: str) -> None:
    data = f32_run[0]
    loaded = load_imatrix(write_imatrix(tmp_path / f"i{suffix}", data))
    assert loaded.format == ("legacy" if suffix == ".dat" else "gguf")
    assert loaded.chunk_count == N_CHUNKS and loaded.datasets == ("calib.txt",)
    assert sorted(loaded.entries) == sorted(data.entries)
    for name, entry in data.entries.items():
        mean = entry.sums.reshape(-1).astype(np.float64) / entry.counts[0]
        np.testing.assert_allclose(loaded.get(name), mean, rtol=1e-6)


def test_legacy_layout_and_entries_without_data() -> None:
    entries = {"blk.0.b.weight": ImatrixEntry(np.array([[6.0, 12.0]], np.float32), np.array([3])),
               "blk.0.a.weight": ImatrixEntry(np.array([[1.0, 2.0]], np.float32), np.array([0]))}
    blob = legacy_bytes(ImatrixData(entries, chunk_count=5, chunk_size=2, datasets=("t.txt",)))
    name = b"blk.0.b.weight"
    # one entry (no data: left out); ncall = ceil(3 / 2) = 2; values = sum / count * ncall; chunks; dataset
    assert blob == (struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii2f", 2, 2, 4.0, 8.0)
                    + struct.pack("<ii", 5, 5) + b"t.txt")


def test_writer_refuses_existing_output_and_empty_data(f32_run: tuple, tmp_path: Path) -> None:
    out = tmp_path / "i.gguf"
    out.write_bytes(b"old")
    with pytest.raises(OutputExists):
        write_imatrix(out, f32_run[0])
    assert out.read_bytes() == b"old"
    write_imatrix(out, f32_run[0], force=True)
    assert load_imatrix(out).chunk_count == N_CHUNKS
    with pytest.raises(UsageError, match="no importance-matrix data"):
        write_imatrix(tmp_path / "e.gguf", ImatrixData({}, 0, N_CTX, ("x",)))
    assert not (tmp_path / "e.gguf").exists() and not [p for p in tmp_path.iterdir() if "corral-tmp" in p.name]


@pytest.mark.slow
def test_quantize_to_iq2_xxs_with_it(mini_gguf_f32: Path, f32_run: tuple, tmp_path: Path) -> None:
    imat = write_imatrix(tmp_path / "mini.imatrix.gguf", f32_run[0])
    out = tmp_path / "mini-iq2_xxs.gguf"
    res = CliRunner().invoke(cli, ["quantize", str(mini_gguf_f32), str(out), "-t", "IQ2_XXS", "--imatrix", str(imat),
                                   "--threads", "2"])
    assert res.exit_code == 0, res.output
    model = read_gguf(out)
    assert model.get("quantize.imatrix.entries_count") == len(f32_run[0].entries)
    assert model.get("quantize.imatrix.chunks_count") == N_CHUNKS
    types = {t.name: t.ggml_type for t in model.tensors}
    assert types["blk.0.ffn_gate.weight"] == gguf.GGMLQuantizationType.IQ2_XXS


# ---------------------------------------------------------------- (c) a quantized model, (e) streaming

def test_q8_0_model_gives_nearly_the_f32_matrix(mini_gguf_f32: Path, f32_run: tuple, tmp_path: Path) -> None:
    q8 = tmp_path / "mini-q8_0.gguf"
    quantize_gguf(mini_gguf_f32, q8, ftype="Q8_0", threads=2)
    data, tokens, _ = _collect(q8)
    assert tokens == f32_run[1] and sorted(data.entries) == sorted(f32_run[0].entries)
    ref = f32_run[0].entries
    # measured: per matrix ‖Δ‖/‖ref‖ <= 1.0e-2, median per-column error 1.1e-3 (8-bit weights, random model)
    norm_err = max(float(np.linalg.norm(e.sums - ref[n].sums) / np.linalg.norm(ref[n].sums))
                   for n, e in data.entries.items())
    median_err = float(np.median([np.median(np.abs(e.sums - ref[n].sums) / ref[n].sums)
                                  for n, e in data.entries.items()]))
    assert 0 < norm_err <= 0.03 and median_err <= 0.005, (norm_err, median_err)


def test_streaming_engine_collects_the_same(mini_gguf_f32: Path, f32_run: tuple) -> None:
    total = sum(u.nbytes for u in units_of(read_gguf(mini_gguf_f32).tensors, 2))
    data, _, positions = _collect(mini_gguf_f32, disk_stream_bytes=total // 2)
    assert positions >= N_CHUNKS * 3  # the streamer's callback still saw every layer boundary it asked for
    assert _rel_err(data, f32_run[0]) <= 1e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("imatrix-cli") / "tiny.gguf", layer_dtype=np.float32)


def test_activations_copied_off_a_device_are_the_same(tiny: Path) -> None:
    """The path for activations in GPU memory (ggml_backend_tensor_get), exercised on CPU buffers."""
    direct, _, _ = _collect(tiny, n_chunks=1)
    copying = ImatrixCollector(process_output=True)
    copying._ggml.buffer_is_host = lambda _buffer: False
    copied, _, _ = _collect(tiny, collector=copying, n_chunks=1)
    assert copying._copy.size > 0  # the copy path ran
    assert _rel_err(copied, direct) == 0.0


def test_an_error_inside_the_callback_is_raised_after_the_decode(tiny: Path) -> None:
    collector = ImatrixCollector()

    def broken(name: str, node: Any) -> None:
        raise RuntimeError(f"cannot read {name}")

    collector._add = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match=r"cannot read blk\.0\.attn_"):
        _collect(tiny, collector=collector, n_chunks=1)
    assert collector.chunks == 0 and collector.data(N_CTX, ("x",)).entries == {}


# ---------------------------------------------------------------- (d) the command line


@pytest.fixture()
def text(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(calibration_text()[:6000], encoding="utf-8")
    return path


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, ["imatrix", *args, "--threads", "2"])


def test_cli_json_and_both_formats(tiny: Path, text: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.imatrix.gguf"
    res = _run(str(tiny), "-o", str(out), "-f", str(text), "--ctx", "32", "--chunks", "3", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc == {**doc, "output": str(out), "format": "gguf", "entries": 14, "chunks": 3, "chunks_total": 3,
                   "chunk_size": 32, "tokens": 96, "datasets": [str(text)], "process_output": False,
                   "complete": True}
    imat = load_imatrix(out)
    assert len(imat) == 14 and imat.chunk_count == 3 and imat.datasets == (str(text),)
    dat = tmp_path / "tiny.dat"
    res = _run(str(tiny), "-o", str(dat), "-f", str(text), "--ctx", "32", "--chunks", "3", "--process-output")
    assert res.exit_code == 0, res.output
    legacy = load_imatrix(dat)
    assert legacy.format == "legacy" and len(legacy) == 15 and legacy.get("output.weight") is not None
    for name, values in imat.entries.items():
        np.testing.assert_allclose(legacy.get(name), values, rtol=1e-6)


def test_cli_built_in_text_is_the_default(tiny: Path, tmp_path: Path) -> None:
    res = _run(str(tiny), "-o", str(tmp_path / "i.gguf"), "--ctx", "16", "--chunks", "1", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["datasets"] == ["corral:calibration_text"]


@pytest.mark.parametrize("case", ["exists", "no-text", "short-text", "no-model", "not-utf8"])
def test_cli_errors(tiny: Path, text: Path, tmp_path: Path, case: str) -> None:
    out, model, text_arg = tmp_path / "o.gguf", str(tiny), str(text)
    expect = {"exists": "already exists (use --force", "no-text": "text file not found",
              "short-text": "fewer than one chunk", "no-model": "model file not found", "not-utf8": "not UTF-8"}
    if case == "exists":
        out.write_bytes(b"mine")
    elif case == "no-text":
        text_arg = str(tmp_path / "missing.txt")
    elif case == "short-text":
        text.write_text("Just a few words.", encoding="utf-8")
    elif case == "no-model":
        model = str(tmp_path / "missing.gguf")
    else:
        text.write_bytes(b"\xff\xfe bad")
    res = _run(model, "-o", str(out), "-f", text_arg, "--ctx", "32")
    assert res.exit_code == 2, res.output
    assert expect[case] in res.output
    assert (out.read_bytes() == b"mine") if case == "exists" else not out.exists()
    if case == "exists":
        res = _run(model, "-o", str(out), "-f", text_arg, "--ctx", "32", "--chunks", "1", "--force")
        assert res.exit_code == 0, res.output
        assert load_imatrix(out).chunk_count == 1


def _interrupt_after(chunks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (a real SIGINT to this process) once `chunks` chunks are complete."""
    real = imatrix_collect.compute_imatrix

    def compute(*args: Any, progress: Callable[[int, int], None] | None = None, **kwargs: Any) -> Any:
        def on_progress(done: int, total: int) -> None:
            if progress is not None:
                progress(done, total)
            if done == chunks:
                os.kill(os.getpid(), signal.SIGINT)

        return real(*args, progress=on_progress, **kwargs)

    monkeypatch.setattr(imatrix_collect, "compute_imatrix", compute)


def test_cli_ctrl_c_saves_the_complete_chunks(tiny: Path, text: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "partial.gguf"
    _interrupt_after(2, monkeypatch)
    res = _run(str(tiny), "-o", str(out), "-f", str(text), "--ctx", "32", "--chunks", "5", "--json")
    assert res.exit_code == 130, res.output
    doc = json.loads(res.stdout)
    assert doc["complete"] is False and doc["chunks"] == 2 and doc["chunks_total"] == 5
    assert "saved the 2 complete chunks of 5" in res.stderr
    assert load_imatrix(out).chunk_count == 2


def test_cli_ctrl_c_before_a_chunk_writes_nothing(tiny: Path, text: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "none.gguf"
    _interrupt_after(0, monkeypatch)
    res = _run(str(tiny), "-o", str(out), "-f", str(text), "--ctx", "32", "--chunks", "5")
    assert res.exit_code == 130, res.output
    assert "nothing written" in res.stderr and not out.exists()
