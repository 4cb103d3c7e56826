"""`corral quantize` / quantize_gguf: same bytes as llama_model_quantize, imatrix, dry run, splits, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from corral.app.cli.main import cli
from corral.convert import quant_types as QT
from corral.convert.errors import Cancelled, ImatrixRequired, UsageError
from corral.convert.gguf_file import read_gguf
from corral.convert.imatrix import load_imatrix
from corral.convert.quantize import imatrix_kv_overrides, quantize_gguf
from tests.helpers.quantize import (
    Shape,
    llama_quantize,
    random_imatrix,
    write_gguf_imatrix,
    write_legacy_imatrix,
    write_mini_gguf,
)

SHAPE = Shape(hidden=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn=512)
SMALL = Shape(hidden=256, n_layers=2, n_heads=8, n_kv_heads=2, ffn=256, vocab=256)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mini_gguf(tmp_path_factory.mktemp("q") / "mini-bf16.gguf", SHAPE)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "corral-tmp" in p.name)


def test_mini_gguf_is_readable(tmp_path: Path) -> None:
    """The test builder itself: a miniature GGUF with every Llama tensor, 1-D ones F32, weights BF16."""
    path = write_mini_gguf(tmp_path / "m.gguf", Shape(n_layers=3))
    model = read_gguf(path)
    assert len(model.tensors) == 4 + 3 * 9
    assert {t.ggml_type for t in model.tensors} == {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.BF16}


def test_same_bytes_as_llama_model_quantize(model: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    res = quantize_gguf(model, tmp_path / "ours.gguf", ftype="Q4_K_M", threads=2,
                        progress=lambda d, t, w="": calls.append((d, t, w)))
    rc, _ = llama_quantize(model, tmp_path / "ref.gguf", int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    assert rc == 0
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    assert res.output_bytes == (tmp_path / "ref.gguf").stat().st_size
    n = len(read_gguf(model).tensors)
    assert calls[-1][:2] == (n, n) and [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["legacy", "gguf"])
def test_imatrix_both_formats_same_bytes_as_llama(tmp_path: Path, fmt: str) -> None:
    src = write_mini_gguf(tmp_path / "small.gguf", SMALL)
    means = random_imatrix(SMALL)
    if fmt == "legacy":
        path = write_legacy_imatrix(tmp_path / "i.dat", means, ncall=4)
    else:
        counts = {k: np.array([5.0], np.float32) for k in means}
        path = write_gguf_imatrix(tmp_path / "i.gguf", {k: v * 5 for k, v in means.items()}, counts)
    imat = load_imatrix(path)
    quantize_gguf(src, tmp_path / "ours.gguf", ftype="IQ2_XXS", imatrix=path, threads=2)
    rc, log = llama_quantize(src, tmp_path / "ref.gguf", int(gguf.LlamaFileType.MOSTLY_IQ2_XXS),
                             imatrix=imat.entries, overrides=imatrix_kv_overrides(imat))
    assert rc == 0, log[-300:]
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    meta = read_gguf(tmp_path / "ours.gguf").metadata
    assert meta["quantize.imatrix.file"] == str(path) and meta["quantize.imatrix.entries_count"] == len(imat)


def test_imatrix_required_is_refused_without_output(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    with pytest.raises(ImatrixRequired):
        quantize_gguf(model, out, ftype="IQ1_M")
    result = CliRunner().invoke(cli, ["quantize", str(model), str(out), "--type", "IQ2_XXS"])
    assert result.exit_code == 2
    message = result.output.strip()
    assert len(message.splitlines()) == 1
    assert "IQ2_XXS needs an importance matrix" in message and "--imatrix" in message
    assert "llama-imatrix" in message and "Hugging Face" in message
    assert not out.exists() and _leftovers(tmp_path) == []


def test_imatrix_for_another_model_is_refused(model: Path, tmp_path: Path) -> None:
    wrong = write_legacy_imatrix(tmp_path / "w.dat", {"blk.0.attn_q.weight": np.ones(64, np.float32)})
    with pytest.raises(ImatrixRequired, match="no entry for"):
        quantize_gguf(model, tmp_path / "o.gguf", ftype="IQ2_XXS", imatrix=wrong)
    assert not (tmp_path / "o.gguf").exists()


def test_dry_run_json_matches_real_output(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    runner = CliRunner()
    dry = runner.invoke(cli, ["quantize", str(model), str(out), "-t", "Q3_K_M", "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert not out.exists()
    real = runner.invoke(cli, ["quantize", str(model), str(out), "-t", "Q3_K_M", "--json"])
    assert real.exit_code == 0, real.output
    size = out.stat().st_size
    assert abs(plan["output_bytes"] - size) <= 0.01 * size
    assert plan["output_bytes"] == size
    written = {t.name: t.ggml_type.name for t in read_gguf(out).tensors}
    assert {t["name"]: t["type_out"] for t in plan["tensors"]} == written
    assert json.loads(real.stdout)["output_bytes"] == size


def test_dry_run_text_and_help(model: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["quantize", str(model), "-t", "IQ2_XXS", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "blk.0.ffn_down.weight" in res.stdout and "output size:" in res.stdout
    help_text = runner.invoke(cli, ["quantize", "--help"]).output
    for name in ("Q8_0", "Q6_K", "Q4_K_M", "IQ2_XXS", "IQ1_M", "TQ1_0"):
        assert name in help_text
    assert "practically lossless" in help_text and "needs an importance matrix" in help_text


def test_unknown_type_and_missing_out(model: Path) -> None:
    res = CliRunner().invoke(cli, ["quantize", str(model), "x.gguf", "-t", "Q9_K"])
    assert res.exit_code == 2 and "unknown quantization type" in res.output
    res = CliRunner().invoke(cli, ["quantize", str(model), "-t", "Q4_K_M"])
    assert res.exit_code == 2 and "missing OUT" in res.output
    with pytest.raises(UsageError):
        QT.file_type("Q4_K_XL")


def test_requantize_needs_flag_and_warns(model: Path, tmp_path: Path) -> None:
    q8 = tmp_path / "q8.gguf"
    quantize_gguf(model, q8, ftype="Q8_0")
    out = tmp_path / "q4.gguf"
    res = CliRunner().invoke(cli, ["quantize", str(q8), str(out), "-t", "Q4_K_M"])
    assert res.exit_code == 2 and "already quantized (Q8_0)" in res.output and not out.exists()
    res = CliRunner().invoke(cli, ["quantize", str(q8), str(out), "-t", "Q4_K_M", "--allow-requantize"])
    assert res.exit_code == 0, res.output
    assert "requantizing" in res.output
    assert {t.ggml_type.name for t in read_gguf(out).tensors} == {"F32", "Q4_K", "Q6_K"}


def test_existing_output_needs_force(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    res = CliRunner().invoke(cli, ["quantize", str(model), str(out), "-t", "Q8_0"])
    assert res.exit_code == 2 and out.read_bytes() == b"keep me"
    res = CliRunner().invoke(cli, ["quantize", str(model), str(out), "-t", "Q8_0", "--force"])
    assert res.exit_code == 0 and out.read_bytes()[:4] == b"GGUF"


def test_split_input_keep_split(tmp_path: Path) -> None:
    src = write_mini_gguf(tmp_path / "whole.gguf", SHAPE)
    shards = _split(src, tmp_path / "split", 3)
    n = len(shards)
    res = quantize_gguf(shards[0], tmp_path / "q.gguf", ftype="Q4_K_M", keep_split=True, threads=2)
    outs = [tmp_path / f"q-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert [Path(p) for p in res.output] == outs and all(p.exists() for p in outs)
    rc, _ = llama_quantize(shards[0], tmp_path / "ref", 15, keep_split=True)
    assert rc == 0
    for i, ours in enumerate(outs, 1):
        assert ours.read_bytes() == (tmp_path / f"ref-{i:05d}-of-{n:05d}.gguf").read_bytes()
    assert res.output_bytes == sum(p.stat().st_size for p in outs)
    merged = quantize_gguf(shards[0], tmp_path / "merged.gguf", ftype="Q4_K_M")
    assert len(merged.output) == 1 and len(read_gguf(tmp_path / "merged.gguf").tensors) == len(read_gguf(src).tensors)
    assert _leftovers(tmp_path) == []


def _split(src: Path, folder: Path, n: int) -> list[Path]:
    """Re-write a GGUF as a llama.cpp split with corral's streaming writer (split by size)."""
    from corral.convert.gguf_writer import GGUFStreamWriter
    from corral.convert.tensor_specs import TensorSpec

    folder.mkdir()
    reader = gguf.GGUFReader(src)
    kvs = [(f.name, f.contents(), f.types[0]) for f in reader.fields.values() if not f.name.startswith("GGUF.")]
    specs = [TensorSpec(t.name, tuple(int(x) for x in t.shape), t.tensor_type) for t in reader.tensors]
    assert [s.nbytes for s in specs] == [int(t.n_bytes) for t in reader.tensors]  # our size rule is gguf-py's
    limit = sum(s.nbytes for s in specs) // n + 1
    with GGUFStreamWriter(folder / "m.gguf", kvs, specs, split_max_size=limit) as w:
        for t in reader.tensors:
            w.begin_tensor(t.name)
            w.write(np.ascontiguousarray(t.data).view(np.uint8))
            w.end_tensor()
    shards = sorted(folder.glob("m-*-of-*.gguf"))
    assert len(shards) >= 2
    return shards


def test_interrupt_from_progress_leaves_nothing(model: Path, tmp_path: Path) -> None:
    def stop(done: int, total: int, what: str = "") -> None:
        raise KeyboardInterrupt

    out = tmp_path / "o.gguf"
    with pytest.raises(Cancelled):
        quantize_gguf(model, out, ftype="Q4_K_M", progress=stop)
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.slow
def test_ctrl_c_on_the_cli_exits_130_and_cleans_up(tmp_path: Path) -> None:
    shape = Shape(hidden=256, n_layers=8, n_heads=8, n_kv_heads=8, ffn=1024)
    src = write_mini_gguf(tmp_path / "m.gguf", shape)
    imat = write_legacy_imatrix(tmp_path / "i.dat", random_imatrix(shape))
    out = tmp_path / "o.gguf"
    corral = Path(sys.executable).with_name("corral")
    proc = subprocess.Popen([str(corral), "quantize", str(src), str(out), "-t", "IQ3_XXS", "--imatrix", str(imat),
                             "--threads", "1"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60  # hang guards, not speed claims
    while time.monotonic() < deadline and not _leftovers(tmp_path):
        time.sleep(0.05)
    assert _leftovers(tmp_path), "quantization never started"
    (temp,) = (tmp_path / name for name in _leftovers(tmp_path))
    first = temp.stat().st_size
    while time.monotonic() < deadline and temp.exists() and temp.stat().st_size <= first:
        time.sleep(0.05)  # until llama.cpp's quantizer is writing tensor data
    assert temp.exists() and temp.stat().st_size > first, "the quantizer never wrote tensor data"
    assert proc.poll() is None, "finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_ctrl_c_inside_popen_stops_the_child_it_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C after the quantizer child started but before Popen returned leaves no handle to stop it: it is
    found and stopped before the interrupt goes on (or it would write the output's temporary file again)."""
    import psutil

    from corral.convert import quantize_child

    started: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    def interrupted(cmd: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        started.append(real([sys.executable, "-c", "import time; time.sleep(60)", cmd[-1]]))
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize_child.subprocess, "Popen", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_child.run_child({"src": "x", "out": "y"})
    (child,) = started
    assert child.poll() is not None  # stopped and reaped
    assert child.pid not in [c.pid for c in psutil.Process().children()]


def test_write_failure_is_reported_as_disk_full_only_when_the_disk_is_full(tmp_path: Path) -> None:
    from corral.convert.quantize_child import _disk_filled

    job = {"out": str(tmp_path / ".out.gguf.tmp"), "write_chunk_bytes": 1 << 20}
    iostream = ["llama_model_quantize: failed to quantize: basic_ios::clear: iostream error"]
    assert _disk_filled(job, ["write failed: No space left on device"])
    assert not _disk_filled(job, iostream)  # plenty of room here: some other write error
    assert _disk_filled({**job, "write_chunk_bytes": 1 << 60}, iostream)  # less room than the next tensor
    assert not _disk_filled({**job, "write_chunk_bytes": 1 << 60}, ["failed to quantize: unknown model"])
    assert not _disk_filled({"out": os.devnull, "write_chunk_bytes": 1 << 60}, iostream)
