"""The trained miniature models: they predict held-out text (through corral's GGUF and llama.cpp as through torch),
the reduced-vocabulary training is exact for the full-vocabulary export, padding keeps the function, and the
cache is keyed, atomic and deterministic."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from corral.app.runtime.api import SamplingSettings
from corral.app.runtime.chunks import decode_chunk
from corral.app.runtime.engine import load_engine
from corral.app.runtime.texts import eval_text
from corral.convert.minimodel import VOCAB_SIZE, build_checkpoint
from tests.helpers.engine import cpu_plan
from tests.helpers.trained import MODELS, NAMES, PADDED, cache_key, pad_layers, quality
from tests.helpers.trained.build import EVAL_CTX, _publish, build, model_dir
from tests.helpers.trained.corpus import eval_tokens, eval_windows, scored, unigram_quality, vocab
from tests.helpers.trained.model import Shape, class_log_softmax, export_weights, from_weights
from tests.helpers.trained.pad import read_shape, read_weights
from tests.helpers.trained.train import TrainConfig, train

TINY = TrainConfig(Shape(n_embd=32, n_layer=1, n_head=2, n_head_kv=1, n_ff=64), steps=3, batch=2, seq=32, warmup=1)


def _llama_quality(path: Path) -> tuple[float, float, int]:
    """(greedy accuracy, perplexity, scored tokens) of a GGUF on the held-out text, from llama.cpp's logits."""
    with load_engine(path, plan=cpu_plan()) as eng:
        tokens = eng.tokenize(eval_text(), add_special=True, parse_special=False)
        assert tokens == eval_tokens().tolist()  # llama.cpp tokenizes as the training did
        windows = eval_windows(np.asarray(tokens), EVAL_CTX)
        first, targets = scored(windows)
        logp, right = [], []
        for row, target in zip(windows, targets):
            logits = decode_chunk(eng, row.tolist(), first)[:-1].astype(np.float64)
            top = logits.max(-1, keepdims=True)
            lse = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
            logp.append(logits[np.arange(len(target)), target] - lse)
            right.append(logits.argmax(-1) == target)
    lp = np.concatenate(logp)
    return float(np.mean(np.concatenate(right))), math.exp(-lp.mean()), lp.size


@pytest.mark.parametrize("name", sorted(n for n in MODELS if n in NAMES))  # not the bench-only ones
def test_trained_model_beats_unigram_through_llama_cpp(name: str, trained_gguf) -> None:  # type: ignore[no-untyped-def]
    q = quality(name)
    acc, ppl, n = _llama_quality(trained_gguf(name, "f32"))
    uni = asdict(unigram_quality(EVAL_CTX))
    assert uni == q["unigram"]
    assert n == q["model"]["tokens"] == uni["tokens"] > 5000
    assert ppl == pytest.approx(q["model"]["ppl"], rel=0.01)  # llama.cpp on the GGUF == torch while training
    assert acc == pytest.approx(q["model"]["accuracy"], abs=0.005)
    assert ppl * 2 < uni["ppl"]
    assert acc > uni["accuracy"] + 0.1


def test_the_larger_model_is_the_better_one() -> None:
    assert quality("base")["model"]["ppl"] < quality("small")["model"]["ppl"]


def test_reduced_vocabulary_export_is_exact(tmp_path: Path) -> None:
    """The full-vocabulary log-softmax of the exported checkpoint equals the training-time log-probabilities:
    at every seen id its class's, at every unseen id the unseen class's."""
    voc = vocab()
    model = train(TINY)
    build_checkpoint(tmp_path / "ckpt", TINY.shape.mini_spec(), weights=export_weights(model, voc))
    full = from_weights(read_shape(tmp_path / "ckpt"), read_weights(tmp_path / "ckpt"))
    windows = eval_windows(eval_tokens(), 64)[:3]
    assert np.isin(windows, voc.seen, invert=True).any()  # held-out text has ids the training never saw
    with torch.no_grad():  # in float64, so that what is compared is the arithmetic, not float32's rounding
        want = class_log_softmax(model(torch.from_numpy(voc.class_of()[windows])).double(), voc)
        got = torch.log_softmax(full(torch.from_numpy(windows)).double(), dim=-1)
    assert got.shape[-1] == VOCAB_SIZE
    seen = torch.tensor(voc.seen)
    unseen = torch.from_numpy(np.setdiff1d(np.arange(VOCAB_SIZE), voc.seen))
    assert torch.allclose(got[..., seen], want[..., :-1], atol=2e-5, rtol=0)
    assert torch.allclose(got[..., unseen], want[..., -1:].expand(*want.shape[:-1], len(unseen)), atol=2e-5, rtol=0)
    assert torch.allclose(torch.logsumexp(got, -1), torch.zeros(got.shape[:-1], dtype=got.dtype), atol=1e-9)


def test_training_is_deterministic() -> None:
    a, b = train(TINY).state_dict(), train(TINY).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train(replace(TINY, seed=1)).state_dict()
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_padding_keeps_the_function_in_torch(tmp_path: Path, trained_hf) -> None:  # type: ignore[no-untyped-def]
    src = trained_hf("small")
    out = pad_layers(src, tmp_path / "padded", 2, n_ff=400, seed=5)
    shape, padded = read_shape(src), read_shape(out)
    assert (padded.n_layer, padded.n_ff) == (shape.n_layer + 2, 400)
    weights = read_weights(out)
    assert weights["model.layers.3.mlp.up_proj.weight"].any()  # the new layers do work ...
    assert not weights["model.layers.3.mlp.down_proj.weight"].any()  # ... that adds nothing
    assert not weights["model.layers.0.mlp.down_proj.weight"][:, shape.n_ff:].any()
    window = torch.from_numpy(eval_windows(eval_tokens(), 64)[:2])
    with torch.no_grad():
        want = from_weights(shape, read_weights(src))(window)
        got = from_weights(padded, weights)(window)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_padded_target_continues_as_the_base_through_llama_cpp(trained_gguf) -> None:  # type: ignore[no-untyped-def]
    name = "base-padded"
    spec = PADDED[name]
    greedy = SamplingSettings(temperature=0.0, max_tokens=40)
    prompts = [p[:200] for p in eval_text().split("\n\n")[3:9]]
    windows = eval_windows(eval_tokens(), EVAL_CTX)[:2]
    outputs, logits = {}, {}
    for model in (spec.base, name):
        with load_engine(trained_gguf(model, "f32"), plan=cpu_plan()) as eng:
            outputs[model] = [eng.complete(p, greedy).text for p in prompts]
            logits[model] = np.concatenate([decode_chunk(eng, w.tolist(), 0) for w in windows])
    assert outputs[name] == outputs[spec.base]
    assert all(len(text) > 20 for text in outputs[name])
    assert np.array_equal(logits[name].argmax(-1), logits[spec.base].argmax(-1))
    assert np.abs(logits[name] - logits[spec.base]).max() < 1e-3


def test_cache_key_follows_what_decides_the_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    base = MODELS["base"]
    key = cache_key(base)
    assert cache_key(base) == key
    assert cache_key(replace(base, lr=base.lr / 2)) != key
    assert cache_key(replace(base, steps=base.steps + 1)) != key
    assert cache_key(replace(base, shape=replace(base.shape, n_ff=base.shape.n_ff + 64))) != key
    padded = PADDED["base-padded"]
    padded_key = cache_key(padded)
    assert cache_key(replace(padded, extra_layers=padded.extra_layers + 1)) != padded_key
    monkeypatch.setitem(MODELS, "base", replace(base, seed=base.seed + 1))
    assert cache_key(padded) != padded_key  # a padded model follows its base
    monkeypatch.setenv("CORRAL_TRAINED_CACHE", str(tmp_path))
    assert model_dir("small").parent == tmp_path


def test_a_built_model_is_found_without_training(monkeypatch: pytest.MonkeyPatch, trained_hf) -> None:  # type: ignore[no-untyped-def]
    first = trained_hf("small")

    def no_training(*args: object) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr("tests.helpers.trained.build.train", no_training)
    assert trained_hf("small") == first
    assert json.loads((build("small") / "quality.json").read_text())["name"] == "small"


def test_an_interrupted_build_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "model-0123"

    def half(tmp: Path) -> None:
        (tmp / "part.safetensors").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _publish(final, half)
    assert list(tmp_path.iterdir()) == []
    killed = tmp_path / ".tmp-other-model-4194305-1"  # a build whose process died (above any pid_max)
    killed.mkdir()
    (killed / "part.safetensors").write_bytes(b"x")
    assert _publish(final, lambda tmp: (tmp / "done").write_text("ok")) == final
    assert (final / "done").read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_torch_model_is_transformers_llama(tmp_path: Path) -> None:
    """The training model computes what transformers' LlamaForCausalLM computes on the exported checkpoint."""
    from transformers import LlamaForCausalLM

    voc = vocab()
    model = train(TINY)
    build_checkpoint(tmp_path, TINY.shape.mini_spec(), weights=export_weights(model, voc))
    reference = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    windows = eval_windows(eval_tokens(), 300)[:1]
    with torch.no_grad():
        want = reference(torch.from_numpy(windows)).logits
        got = from_weights(TINY.shape, read_weights(tmp_path))(torch.from_numpy(windows))
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
