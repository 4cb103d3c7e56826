"""`corral eval`: perplexity and KL divergence equal independent computations from raw logits; the CLI's
JSON, progress, errors and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from corral.app.cli.main import cli
from corral.app.runtime import evaluate as evaluate_module
from corral.app.runtime.chunks import decode_chunk, text_chunks
from corral.app.runtime.engine import load_engine
from corral.app.runtime.evaluate import evaluate, tokenize_text
from corral.app.runtime.setup import EngineOptions
from corral.app.runtime.texts import eval_text
from corral.convert.errors import EXIT_INTERRUPTED, EXIT_USAGE, InsufficientDisk, UsageError
from corral.convert.units import MiB

CTX = 128
CHUNKS = 2
OPTS = EngineOptions(n_threads=2)


@pytest.fixture(scope="module")
def quants(mini_gguf_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from corral.convert.quantize import quantize_gguf

    root = tmp_path_factory.mktemp("eval-quants")
    out = {}
    for ftype in ("Q4_K_M", "Q2_K"):
        out[ftype] = quantize_gguf(mini_gguf_f32, root / f"mini-{ftype}.gguf", ftype=ftype, threads=2).output[0]
    return {k: Path(v) for k, v in out.items()}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=1, keepdims=True))


def _raw(path: Path, n_ctx: int = CTX, chunks: int = CHUNKS) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities float64 of the scored positions, their target tokens), from full logits of every
    position of every chunk."""
    first = n_ctx // 2
    logps, targets = [], []
    with load_engine(path, EngineOptions(n_ctx=n_ctx, n_threads=2)) as engine:
        plan = text_chunks(engine, eval_text(), n_ctx, chunks)
        for i in range(plan.count):
            tokens = plan.chunk(i, engine.bos_id)
            logits = decode_chunk(engine, tokens, 0)
            logps.append(_log_softmax(logits[first:n_ctx - 1]))
            targets.append(np.asarray(tokens[first + 1:]))
    return np.concatenate(logps), np.concatenate(targets)


@pytest.fixture(scope="module")
def raw_f32(mini_gguf_f32: Path) -> tuple[np.ndarray, np.ndarray]:
    return _raw(mini_gguf_f32)


def _ppl(logp: np.ndarray, targets: np.ndarray) -> float:
    return float(np.exp(-logp[np.arange(len(targets)), targets].mean()))


def test_perplexity_equals_raw_logits(mini_gguf_f32: Path, raw_f32: tuple[np.ndarray, np.ndarray]) -> None:
    result = evaluate(mini_gguf_f32, eval_text(), n_ctx=CTX, chunks=CHUNKS, options=OPTS)
    logp, targets = raw_f32
    assert result.complete and result.chunks == result.chunks_scored == CHUNKS
    assert result.tokens_scored == len(targets) == CHUNKS * (CTX - 1 - CTX // 2)
    assert result.ppl is not None
    assert result.ppl.value == pytest.approx(_ppl(logp, targets), rel=1e-4)
    nll = -logp[np.arange(len(targets)), targets]
    assert result.ppl.stderr == pytest.approx(result.ppl.value * nll.std() / np.sqrt(len(nll) - 1), rel=1e-3)
    assert result.kld is None and result.to_json()["complete"] is True


@pytest.mark.slow
def test_perplexity_equals_transformers(mini_checkpoint: Path, mini_gguf_f32: Path) -> None:
    """Independent of llama.cpp entirely: HF's tokenizer, transformers' forward pass, float64 log-softmax."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(mini_checkpoint)
    tokens = tokenizer(eval_text(), add_special_tokens=True)["input_ids"]
    assert tokens[0] == tokenizer.bos_token_id
    assert tokens == tokenize_text(mini_gguf_f32, eval_text())[0]
    model = LlamaForCausalLM.from_pretrained(mini_checkpoint, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    first, nll = CTX // 2, []
    for i in range(CHUNKS):
        chunk = list(tokens[i * CTX:(i + 1) * CTX])
        chunk[0] = tokenizer.bos_token_id
        with torch.no_grad():
            logits = model(torch.tensor([chunk])).logits[0].double()
        logp = torch.log_softmax(logits[first:CTX - 1], dim=-1).numpy()
        nll.append(-logp[np.arange(CTX - 1 - first), chunk[first + 1:]])
    expected = float(np.exp(np.concatenate(nll).mean()))
    result = evaluate(mini_gguf_f32, eval_text(), n_ctx=CTX, chunks=CHUNKS, options=OPTS)
    assert result.ppl is not None
    assert result.ppl.value == pytest.approx(expected, rel=1e-3)


def test_kld_of_a_model_against_itself_is_zero(mini_gguf_f32: Path, tmp_path: Path) -> None:
    result = evaluate(mini_gguf_f32, eval_text(), n_ctx=CTX, chunks=CHUNKS, base=mini_gguf_f32, options=OPTS,
                      work_dir=tmp_path)
    assert result.complete and result.kld is not None
    assert abs(result.kld.mean.value) < 1e-6 and result.kld.maximum < 1e-5
    assert result.kld.top1.value == 1.0
    assert result.kld.delta_ppl.value == 0.0 and result.ppl is not None
    assert result.kld.ppl_base.value == result.ppl.value
    assert list(tmp_path.iterdir()) == []  # the base's log-probabilities are gone


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q2_K"])
def test_kld_of_a_quant_equals_numpy(mini_gguf_f32: Path, quants: dict[str, Path], ftype: str, tmp_path: Path,
                                     raw_f32: tuple[np.ndarray, np.ndarray]) -> None:
    seen: list[tuple[int, int, str]] = []
    result = evaluate(quants[ftype], eval_text(), n_ctx=CTX, chunks=CHUNKS, base=mini_gguf_f32, options=OPTS,
                      work_dir=tmp_path, progress=lambda d, t, w="": seen.append((d, t, w)))
    base_logp, targets = raw_f32
    model_logp, _ = _raw(quants[ftype])
    kl = (np.exp(base_logp) * (base_logp - model_logp)).sum(axis=1)
    assert result.complete and result.kld is not None and result.ppl is not None
    k = result.kld
    assert k.mean.value > 1e-4  # the quant really differs from the base
    assert k.mean.value == pytest.approx(kl.mean(), rel=0.01)
    assert k.mean.stderr == pytest.approx(kl.std() / np.sqrt(len(kl) - 1), rel=0.02)
    assert k.median == pytest.approx(np.median(kl), rel=0.02)
    assert k.p99 == pytest.approx(np.percentile(kl, 99), rel=0.02)
    agree = (base_logp.argmax(axis=1) == model_logp.argmax(axis=1)).mean()
    assert abs(k.top1.value - agree) <= 1.5 / len(kl)  # at most one near-tie decided differently
    assert k.ppl_base.value == pytest.approx(_ppl(base_logp, targets), rel=1e-4)
    assert result.ppl.value == pytest.approx(_ppl(model_logp, targets), rel=1e-4)
    delta = _ppl(model_logp, targets) - _ppl(base_logp, targets)
    assert k.delta_ppl.value == pytest.approx(delta, abs=1e-4 * k.ppl_base.value)
    assert seen[0] == (0, 2 * CHUNKS, "base") and seen[-1] == (2 * CHUNKS, 2 * CHUNKS, "model")
    keys = result.to_json()
    assert {"kld_mean", "kld_median", "kld_p99", "top1_agreement", "delta_ppl", "ppl_base"} <= set(keys)


def _cancel_at(step: int, cancel: threading.Event):  # noqa: ANN202
    def progress(done: int, total: int, what: str = "") -> None:
        if done == step:
            cancel.set()
    return progress


def test_cancel_during_the_model_keeps_what_was_scored(mini_gguf_f32: Path, quants: dict[str, Path],
                                                       tmp_path: Path) -> None:
    cancel = threading.Event()
    result = evaluate(quants["Q4_K_M"], eval_text(), n_ctx=CTX, chunks=3, base=mini_gguf_f32, options=OPTS,
                      cancel=cancel, progress=_cancel_at(4, cancel), work_dir=tmp_path)  # 3 base + 1 model chunk
    assert not result.complete and result.chunks == 3 and result.chunks_scored == 1
    assert result.tokens_scored == CTX - 1 - CTX // 2 and result.kld is not None and result.ppl is not None
    data = result.to_json()
    assert data["complete"] is False and data["chunks_scored"] == 1 and data["kld_mean"] > 0
    assert "interrupted after 1 of 3" in data["note"]
    assert list(tmp_path.iterdir()) == []


def test_cancel_during_the_base_gives_no_kld(mini_gguf_f32: Path, quants: dict[str, Path], tmp_path: Path) -> None:
    cancel = threading.Event()
    loaded: list[Path] = []

    def load(path: Path, options: EngineOptions):  # noqa: ANN202
        loaded.append(path)
        return load_engine(path, options)

    result = evaluate(quants["Q4_K_M"], eval_text(), n_ctx=CTX, chunks=3, base=mini_gguf_f32, options=OPTS,
                      cancel=cancel, progress=_cancel_at(1, cancel), work_dir=tmp_path, load=load)
    assert loaded == [mini_gguf_f32]  # the model never loaded
    assert not result.complete and result.kld is None and result.ppl is None and result.chunks_scored == 0
    assert "base" in result.note and "no KL divergence" in result.note
    assert result.to_json()["kld_mean"] is None
    assert list(tmp_path.iterdir()) == []


def test_single_model_cancel(mini_gguf_f32: Path) -> None:
    cancel = threading.Event()
    result = evaluate(mini_gguf_f32, eval_text(), n_ctx=CTX, chunks=3, options=OPTS, cancel=cancel,
                      progress=_cancel_at(2, cancel))
    assert (result.complete, result.chunks_scored) == (False, 2) and result.ppl is not None


def test_not_enough_disk_for_the_base_is_refused_before_loading(mini_gguf_f32: Path, quants: dict[str, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluate_module.shutil, "disk_usage", lambda p: SimpleNamespace(free=10 * MiB))

    def load(path: Path, options: EngineOptions):  # noqa: ANN202
        raise AssertionError("loaded a model")

    with pytest.raises(InsufficientDisk, match="TMPDIR"):
        evaluate(quants["Q4_K_M"], eval_text(), n_ctx=CTX, chunks=2, base=mini_gguf_f32, load=load)


def test_different_vocabularies_are_refused(mini_gguf_f32: Path, tmp_path: Path) -> None:
    from tests.helpers.quantize import Shape, write_mini_gguf

    other = write_mini_gguf(tmp_path / "other.gguf", Shape(), dtype="f32")
    with pytest.raises(UsageError, match="different vocabularies"):
        evaluate(mini_gguf_f32, eval_text(), n_ctx=CTX, base=other)


def test_text_shorter_than_a_chunk(mini_gguf_f32: Path) -> None:
    with pytest.raises(UsageError, match="fewer than one chunk of 512"):
        evaluate(mini_gguf_f32, "a short text", n_ctx=512)


# ---------------------------------------------------------------- the command


def test_cli_json(mini_gguf_f32: Path, quants: dict[str, Path]) -> None:
    result = CliRunner().invoke(cli, ["eval", str(quants["Q4_K_M"]), "--base", str(mini_gguf_f32), "--ctx",
                                      str(CTX), "--chunks", "1", "--threads", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["complete"] is True and data["chunks_scored"] == 1 and data["n_ctx"] == CTX
    assert data["tokens_scored"] == CTX - 1 - CTX // 2
    for key in ("ppl", "ppl_stderr", "ppl_base", "delta_ppl", "kld_mean", "kld_mean_stderr", "kld_median", "kld_p99",
                "kld_max", "top1_agreement", "seconds"):
        assert isinstance(data[key], float), key
    assert "scoring base" in result.stderr and "scoring model" in result.stderr and "2/2" in result.stderr


def test_cli_text_and_human_output(mini_gguf_f32: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(eval_text()[:4000])
    result = CliRunner().invoke(cli, ["eval", str(mini_gguf_f32), "--text", str(text), "--ctx", "64", "--chunks",
                                      "2", "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("perplexity ") and "chunks of 64" in result.stdout
    assert "t.txt" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["missing.gguf"], "model file not found"),
    (["{model}", "--text", "missing.txt"], "text file not found"),
    (["{model}", "--text", "{short}"], "fewer than one chunk"),
    (["{model}", "--base", "{other}"], "different vocabularies"),
])
def test_cli_errors(mini_gguf_f32: Path, tmp_path: Path, args: list[str], message: str) -> None:
    from tests.helpers.quantize import Shape, write_mini_gguf

    short = tmp_path / "short.txt"
    short.write_text("too short")
    other = write_mini_gguf(tmp_path / "other.gguf", Shape(), dtype="f32")
    values = {"model": str(mini_gguf_f32), "short": str(short), "other": str(other)}
    result = CliRunner().invoke(cli, ["eval", *(a.format(**values) for a in args)])
    assert result.exit_code == EXIT_USAGE
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_cli_sigint_prints_the_partial_json(mini_gguf_f32: Path, quants: dict[str, Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGINT to this process while the model runs: the chunks so far are printed, then exit 130."""
    calls = []
    real = evaluate_module.decode_chunk

    def decode(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # 2 base chunks, then the model's first
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(evaluate_module, "decode_chunk", decode)
    result = CliRunner().invoke(cli, ["eval", str(quants["Q2_K"]), "--base", str(mini_gguf_f32), "--ctx", str(CTX),
                                      "--chunks", "2", "--threads", "2", "--json"])
    assert result.exit_code == EXIT_INTERRUPTED
    data = json.loads(result.stdout)
    assert data["complete"] is False and data["chunks"] == 2 and data["chunks_scored"] == 1
    assert data["kld_mean"] > 0 and "interrupted" in result.stderr


def test_sigint_on_a_subprocess(mini_gguf_f32: Path, tmp_path: Path) -> None:
    env = {**os.environ, "CORRAL_CPU_RATES": "off"}
    proc = subprocess.Popen([sys.executable, "-m", "corral.app.cli.main", "eval", str(mini_gguf_f32), "--ctx", "64",
                             "--threads", "2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("scoring the model"):
                break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED
    data = json.loads(out)
    assert data["complete"] is False and data["chunks_scored"] < data["chunks"]


def test_a_trained_model_has_a_far_lower_perplexity(trained_gguf, mini_gguf_f32: Path) -> None:  # type: ignore[no-untyped-def]
    """On the held-out text a trained model's perplexity is far below a random-weight model's and below the
    unigram baseline's."""
    from tests.helpers.trained import quality

    trained = trained_gguf("small", "f32")
    mine = evaluate(trained, eval_text(), n_ctx=256, chunks=4, options=OPTS)
    random = evaluate(mini_gguf_f32, eval_text(), n_ctx=256, chunks=4, options=OPTS)
    assert mine.ppl is not None and random.ppl is not None
    assert mine.ppl.value * 100 < random.ppl.value
    assert mine.ppl.value < quality("small")["unigram"]["ppl"] / 2


def test_kld_of_a_near_lossless_quant_of_a_trained_model(trained_gguf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A trained model's distributions are peaked, with most of the vocabulary far below the 16-nat range the
    compact form keeps: the tail still counts, so Q8_0's tiny KL divergence is right (and not negative)."""
    from corral.convert.quantize import quantize_gguf

    base = trained_gguf("small", "f32")
    q8 = Path(quantize_gguf(base, tmp_path / "small-Q8_0.gguf", ftype="Q8_0", threads=2).output[0])
    result = evaluate(q8, eval_text(), n_ctx=256, chunks=3, base=base, options=OPTS)
    base_logp, _ = _raw(base, 256, 3)
    model_logp, _ = _raw(q8, 256, 3)
    kl = (np.exp(base_logp) * (base_logp - model_logp)).sum(axis=1)
    assert result.kld is not None and 0 < kl.mean() < 1e-3
    assert result.kld.mean.value == pytest.approx(kl.mean(), rel=0.01)
    assert result.kld.median == pytest.approx(np.median(kl), rel=0.02)
