"""Miniature checkpoints: published-repo layout and the real Llama 3 tokenizer, rebuilt offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.convert import llama3_tokenizer as tok
from corral.convert.llama_family import hparams_from_hf_config
from corral.convert.minimodel import MiniSpec, build_checkpoint, hf_tensor_shapes
from corral.convert.safetensors_io import read_header

TEXTS = [
    "Hello, world! How's it going?",
    "   leading spaces and\ttabs\n\nnew lines\r\n",
    "def f(x):\n    return x ** 2  # squares 12345678",
    "Ünïcödé — 日本語のテキスト, emojis 🦙🦙 and numbers 3.14159",
    "<|begin_of_text|> an added token inside plain text",
    "a turn ends<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nnext <|reserved_special_token_247|>",
]


def test_tokenizer_json_matches_tiktoken() -> None:
    tiktoken = pytest.importorskip("tiktoken")
    tokenizers = pytest.importorskip("tokenizers")
    ranks = tok.read_ranks(tok.tiktoken_model_path())
    specials = {name: len(ranks) + i for i, name in enumerate(tok.special_tokens())}
    reference = tiktoken.Encoding(name="llama3", pat_str=tok.LLAMA3_PATTERN, mergeable_ranks=ranks,
                                  special_tokens=specials)
    ours = tokenizers.Tokenizer.from_str(tok.tokenizer_json())
    for text in TEXTS:
        # HF matches added tokens inside any text: the reference does the same with every special allowed
        expected = reference.encode(text, allowed_special="all")
        assert ours.encode(text, add_special_tokens=False).ids == expected, text
    special_text = "<|begin_of_text|> an added token inside plain text"
    got = ours.encode(special_text, add_special_tokens=False).ids
    assert got[0] == 128000 and got.count(128000) == 1
    assert got[1:] == reference.encode(special_text.removeprefix("<|begin_of_text|>"), disallowed_special=())
    assert 128000 not in reference.encode(special_text, disallowed_special=())  # the check above is not vacuous
    # bos is prepended by the post-processor, special ids are where Llama 3.1 has them
    assert ours.encode("hi").ids[0] == 128000
    assert ours.token_to_id("<|eot_id|>") == 128009
    assert ours.token_to_id("<|eom_id|>") == 128008
    assert ours.token_to_id("<|reserved_special_token_247|>") == 128255
    assert ours.get_vocab_size() == 128256


def test_merges_count_matches_published_tokenizer() -> None:
    doc = json.loads(tok.tokenizer_json())
    assert len(doc["model"]["vocab"]) == 128000
    assert len(doc["model"]["merges"]) == 280147  # the count in the published Llama 3 tokenizer.json
    assert len(doc["added_tokens"]) == 256


@pytest.mark.parametrize(
    "spec",
    [
        MiniSpec(),
        MiniSpec(n_embd=128, n_head=4, n_head_kv=4, tie_embeddings=True, dtype="float16", shards=1),
        MiniSpec(config_style="rope_parameters", head_dim_in_config=True, instruct=False, shards=3),
    ],
)
def test_checkpoint_layout(tmp_path: Path, spec: MiniSpec) -> None:
    out = build_checkpoint(tmp_path / "ckpt", spec, seed=1)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == spec.n_head_kv
    # the family's strict config.json parser reads back exactly the hyper-parameters the spec describes
    assert hparams_from_hf_config(config, out / "config.json") == spec.hparams
    assert ("head_dim" in config) == spec.head_dim_in_config
    assert ("rope_parameters" in config) == (spec.config_style == "rope_parameters")
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert ("chat_template" in tok_config) == spec.instruct
    expected = dict(hf_tensor_shapes(spec))
    if spec.shards > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) == spec.shards
        assert set(index["weight_map"]) == set(expected)
    else:
        files = ["model.safetensors"]
    seen = {}
    for name in files:
        for tname, info in read_header(out / name).tensors.items():
            seen[tname] = tuple(info.shape)
            assert info.dtype == {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[spec.dtype]
    assert seen == expected
    assert ("lm_head.weight" in seen) != spec.tie_embeddings


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    spec = MiniSpec(n_embd=64, n_head=4, n_head_kv=2, n_ff=128, shards=1)
    a = build_checkpoint(tmp_path / "a", spec, seed=7)
    b = build_checkpoint(tmp_path / "b", spec, seed=7)
    c = build_checkpoint(tmp_path / "c", spec, seed=8)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
