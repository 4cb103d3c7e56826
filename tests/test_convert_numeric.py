"""Numeric parity: llama.cpp's logits on corral's GGUF vs transformers' LlamaForCausalLM (float32)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from corral.convert.converter import convert_checkpoint
from corral.convert.minimodel import MiniSpec, build_checkpoint

pytestmark = pytest.mark.slow

# head_dim 16, theta 10000: rotary wavelengths 6.3 ... 19869 tokens. With the llama3 scaling's
# original context set to 32 (below), all but the fastest frequency pairs are scaled, so a
# 120-token prompt depends on rope_freqs being right.
SPEC = MiniSpec(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, rope_theta=10000.0, shards=1)
N_TOKENS = 120


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sum((a.astype(np.float64) - ref) ** 2) / np.sum(ref.astype(np.float64) ** 2))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("numeric")
    src = build_checkpoint(root / "ckpt", SPEC, seed=11)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_scaling"]["original_max_position_embeddings"] = 32
    (src / "config.json").write_text(json.dumps(cfg))
    tokens = [128000, *np.random.default_rng(0).integers(0, 128000, N_TOKENS - 1).tolist()]
    return {"src": src, "root": root, "tokens": tokens, "cfg": cfg}


def _transformers_logits(folder: Path, tokens: list[int], *, no_scaling: bool = False) -> np.ndarray:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(folder)
    if no_scaling:
        config = LlamaConfig.from_dict({**json.loads((folder / "config.json").read_text()), "rope_scaling": None})
    model = LlamaForCausalLM.from_pretrained(folder, config=config, torch_dtype=torch.float32,
                                             attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([tokens]))
    return out.logits[0].float().numpy()


def _llama_cpp_logits(gguf: Path, tokens: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize(("outtype", "limit"), [("f32", 1e-4), ("bf16", 1e-4)])
def test_llama_cpp_logits_match_transformers(setup: dict, outtype: str, limit: float) -> None:
    gguf = setup["root"] / f"m-{outtype}.gguf"
    if not gguf.exists():
        convert_checkpoint(setup["src"], gguf, outtype=outtype)
    ref = _transformers_logits(setup["src"], setup["tokens"])
    ours = _llama_cpp_logits(gguf, setup["tokens"])
    assert ours.shape == ref.shape == (N_TOKENS, 128256)
    err = nmse(ours, ref)
    assert err <= limit, f"NMSE {err:.2e} > {limit:.0e}"
    # The prompt really exercises rope scaling: without it, transformers is far from llama.cpp.
    unscaled = _transformers_logits(setup["src"], setup["tokens"], no_scaling=True)
    assert nmse(unscaled, ref) > 100 * max(err, 1e-7)
