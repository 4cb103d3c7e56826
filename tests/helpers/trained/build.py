"""The cache of trained models: `${CORRAL_TRAINED_CACHE:-~/.cache/corral-tests/trained}/<name>-<key>/`.

The key hashes what decides the weights: this package's sources and the checkpoint writer, the hyper-parameters,
the texts and tokenizer, and torch's version. A model is built in a temporary folder beside its final place and
renamed into it when complete, so a killed build leaves nothing that looks finished. Each folder holds the Hugging Face
checkpoint (`Llama-3-Trained-<name>/`), `quality.json` and, once asked for, `gguf/` conversions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from corral.app.runtime.texts import eval_text, training_text
from corral.convert import llama3_tokenizer
from corral.convert.minimodel import build_checkpoint

from .corpus import eval_tokens, unigram_quality, vocab
from .model import Shape, export_weights
from .pad import pad_layers
from .train import TrainConfig, class_eval, train

EVAL_CTX = 256  # the held-out text is scored in windows of this many tokens (the training length)
_HERE = Path(__file__).resolve().parent
_CONVERT = _HERE.parents[2] / "convert"


@dataclass(frozen=True)
class Padded:
    """A trained model with inert layers appended (see pad.pad_layers)."""

    base: str
    extra_layers: int
    n_ff: int | None = None
    seed: int = 0


MODELS: dict[str, TrainConfig] = {
    "small": TrainConfig(Shape(n_embd=64, n_layer=2, n_head=2, n_head_kv=1, n_ff=192), steps=300, seed=1),
    "base": TrainConfig(Shape(n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=768), steps=300, seed=2),
    # bench only: a draft between the two (bench_spec_streamed)
    "medium": TrainConfig(Shape(n_embd=192, n_layer=3, n_head=3, n_head_kv=1, n_ff=576), steps=300, seed=6),
}
PADDED: dict[str, Padded] = {
    "base-padded": Padded("base", extra_layers=8, n_ff=1536, seed=3),
    "base-large": Padded("base", extra_layers=40, n_ff=4096, seed=4),  # bench_speculative's slow target
    "base-huge": Padded("base", extra_layers=40, n_ff=16384, seed=5),  # bench_spec_streamed's streamed target
}
BENCH_ONLY = ("medium", "base-large", "base-huge")
NAMES = tuple(name for name in (*MODELS, *PADDED) if name not in BENCH_ONLY)  # what the tests use


def cache_root() -> Path:
    return Path(os.environ.get("CORRAL_TRAINED_CACHE") or Path.home() / ".cache" / "corral-tests" / "trained")


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


TRAIN_SOURCES = ("corpus.py", "model.py", "train.py")
CONVERT_SOURCES = ("minimodel.py", "llama_family.py")  # the checkpoint writer, the rope factors


def source_digest(extra: tuple[str, ...] = ()) -> str:
    """The sources that decide a trained model's files (`extra`: more of this package's files)."""
    files = [*(_HERE / f for f in (*TRAIN_SOURCES, *extra)), *(_CONVERT / f for f in CONVERT_SOURCES)]
    return _digest([f.name.encode() + b"\0" + f.read_bytes() for f in files])


def cache_key(cfg: TrainConfig | Padded) -> str:
    """The key of a model's folder (a Padded model's includes its base's)."""
    import torch

    if isinstance(cfg, Padded):
        spec = {"padded": asdict(cfg), "base": cache_key(MODELS[cfg.base])}
    else:
        spec = {"train": asdict(cfg), "eval_ctx": EVAL_CTX}
    texts = [training_text().encode(), eval_text().encode(), llama3_tokenizer.tokenizer_json().encode()]
    sources = source_digest(("pad.py",) if isinstance(cfg, Padded) else ())
    doc = json.dumps({"sources": sources, "torch": torch.__version__, **spec}, sort_keys=True)
    return _digest([doc.encode(), *texts])


def model_dir(name: str) -> Path:
    cfg = MODELS.get(name) or PADDED.get(name)
    if cfg is None:
        raise KeyError(f"no trained model {name!r} (have {', '.join([*MODELS, *PADDED])})")
    return cache_root() / f"{name}-{cache_key(cfg)}"


def hf_dir(folder: Path, name: str) -> Path:
    """The Hugging Face checkpoint inside a model's cache folder (named as a published repository would be)."""
    return folder / f"Llama-3-Trained-{name}"


def _remove_abandoned(folder: Path) -> None:
    """Delete the temporary folders in `folder` of builds whose process is gone (killed mid-build)."""
    for tmp in folder.glob(".tmp-*-*-*"):
        pid = int(tmp.name.rsplit("-", 2)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def _publish(final: Path, fill: Callable[[Path], None]) -> Path:
    """Run `fill(tmp)` on a fresh temporary folder beside `final` and rename it to `final` (first one wins)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final.parent)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        tmp.mkdir()
        fill(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _train_into(cfg: TrainConfig, name: str, out: Path) -> None:
    t0 = time.monotonic()
    model = train(cfg)
    seconds = time.monotonic() - t0
    voc = vocab()
    build_checkpoint(hf_dir(out, name), cfg.shape.mini_spec(), weights=export_weights(model, voc))
    quality = class_eval(model, voc, eval_tokens(), EVAL_CTX)
    doc = {"name": name, "train_seconds": round(seconds, 1), "eval_ctx": EVAL_CTX, "config": asdict(cfg),
           "model": asdict(quality), "unigram": asdict(unigram_quality(EVAL_CTX)),
           "vocab": {"seen": len(voc.seen), "n_unseen": voc.n_unseen}}
    (out / "quality.json").write_text(json.dumps(doc, indent=2) + "\n")


def _pad_into(spec: Padded, name: str, out: Path) -> None:
    base = build(spec.base)
    pad_layers(hf_dir(base, spec.base), hf_dir(out, name), spec.extra_layers, n_ff=spec.n_ff, seed=spec.seed)
    doc = json.loads((base / "quality.json").read_text())
    doc["padded"] = asdict(spec)
    (out / "quality.json").write_text(json.dumps(doc, indent=2) + "\n")


def build(name: str) -> Path:
    """The model's cache folder, trained (or padded) first when it is not there yet."""
    final = model_dir(name)
    if final.is_dir():
        return final
    if name in MODELS:
        return _publish(final, lambda tmp: _train_into(MODELS[name], name, tmp))
    return _publish(final, lambda tmp: _pad_into(PADDED[name], name, tmp))


def quality(name: str) -> dict[str, object]:
    return json.loads((build(name) / "quality.json").read_text())


def converter_digest() -> str:
    return _digest([f.name.encode() + b"\0" + f.read_bytes() for f in sorted(_CONVERT.glob("*.py"))])


def gguf(name: str, outtype: str = "f32") -> Path:
    """The model converted by corral to a GGUF of `outtype` (cached beside it, keyed by corral's converter too)."""
    from corral.convert.converter import convert_checkpoint

    folder = build(name)
    final = folder / "gguf" / f"{name}-{outtype}-{converter_digest()}.gguf"
    if final.is_file():
        return final
    final.parent.mkdir(exist_ok=True)
    tmp = final.parent / f"tmp-{os.getpid()}-{time.monotonic_ns()}.gguf"
    try:
        convert_checkpoint(hf_dir(folder, name), tmp, outtype=outtype)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final
