"""ModelProfile: every tensor (name, shape, type, bytes, file offset) plus the shapes the memory model needs."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf import GGMLQuantizationType, Keys, LlamaFileType

from corral.convert.errors import InputNotFound, InvalidConfig, InvalidGGUF, UnsupportedModel

from . import catalog

if TYPE_CHECKING:
    from corral.convert.quant_types import FileTypeInfo
    from corral.convert.tensor_specs import TensorSpec

T = GGMLQuantizationType
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
# Tensor names (gguf MODEL_TENSOR names for LLM_ARCH_LLAMA) grouped by what the solver moves.
_ATTN = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv", "attn_norm", "attn_q_norm", "attn_k_norm")
_FFN = ("ffn_gate", "ffn_up", "ffn_down", "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
        "ffn_down_exps")
# Metadata of a Llama 3 GGUF apart from tensor infos: general.*, llama.*, the 128256-token vocab, its
# token types and 280147 merges, chat template. Measured on our converter's output (bench/bench_plan.py).
LLAMA3_METADATA_BYTES = 7_600_000


@dataclass(frozen=True)
class TensorInfo:
    """One weight tensor. `shape` is GGUF order (ne0 = row length first); offset -1 when there is no file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    nbytes: int
    offset: int = -1
    file_index: int = 0

    @cached_property
    def layer(self) -> int | None:
        m = _LAYER_RE.match(self.name)
        return int(m.group(1)) if m else None

    @cached_property
    def kind(self) -> str:
        """'embd', 'output', 'output_norm', 'rope', 'attn', 'ffn' or 'other'."""
        base = self.name.rsplit(".", 1)[0]
        if self.layer is not None:
            stem = base.split(".", 2)[2]
            if stem in _ATTN:
                return "attn"
            if stem in _FFN:
                return "ffn"
            return "other"
        return {"token_embd": "embd", "output": "output", "output_norm": "output_norm",
                "rope_freqs": "rope"}.get(base, "other")

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelProfile:
    """What the planner knows about a model, from a GGUF header, an HF config, or the catalog."""

    name: str
    source: str  # "gguf" | "hf" | "catalog"
    architecture: str
    quant: str  # file type name, e.g. Q4_K_M
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    tensors: tuple[TensorInfo, ...]
    file_bytes: int
    files: tuple[Path, ...] = ()
    tie_embeddings: bool = False

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    @cached_property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @cached_property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @cached_property
    def by_layer(self) -> tuple[tuple[TensorInfo, ...], ...]:
        layers: list[list[TensorInfo]] = [[] for _ in range(self.n_layer)]
        for t in self.tensors:
            if t.layer is not None and t.layer < self.n_layer:
                layers[t.layer].append(t)
        return tuple(tuple(x) for x in layers)

    @cached_property
    def globals(self) -> tuple[TensorInfo, ...]:
        return tuple(t for t in self.tensors if t.layer is None)


# ---------------------------------------------------------------- GGUF

def profile_from_gguf(path: str | Path) -> ModelProfile:
    """Profile from a GGUF header (single or split; weights are never read)."""
    from corral.convert.gguf_file import read_gguf

    model = read_gguf(path)
    arch = model.architecture

    def key(template: str, default: Any = None) -> Any:
        return model.arch_key(template, default)

    n_layer = key(Keys.LLM.BLOCK_COUNT)
    n_embd = key(Keys.LLM.EMBEDDING_LENGTH)
    n_head = key(Keys.Attention.HEAD_COUNT)
    if n_layer is None or n_embd is None or n_head is None:
        raise InvalidGGUF(f"architecture {arch!r} lacks block_count/embedding_length/head_count", path=path)
    n_head_kv = key(Keys.Attention.HEAD_COUNT_KV, n_head)
    if isinstance(n_head_kv, list):
        raise UnsupportedModel(f"per-layer KV head counts ({arch}) are not supported", path=path)
    head_dim = key(Keys.Attention.KEY_LENGTH) or int(n_embd) // int(n_head)
    n_ff = key(Keys.LLM.FEED_FORWARD_LENGTH, 4 * int(n_embd))
    if isinstance(n_ff, list):
        n_ff = max(n_ff)
    tokens = model.get(Keys.Tokenizer.LIST)
    n_vocab = key(Keys.LLM.VOCAB_SIZE) or (len(tokens) if isinstance(tokens, list) else 0)
    if not n_vocab:
        embd = next((t for t in model.tensors if t.name == "token_embd.weight"), None)
        n_vocab = embd.shape[1] if embd is not None and len(embd.shape) > 1 else 32000
    files = tuple(model.files)
    index = {f: i for i, f in enumerate(files)}
    tensors = tuple(TensorInfo(t.name, tuple(int(d) for d in t.shape), T(t.ggml_type), int(t.nbytes),
                               int(t.offset), index.get(t.file, 0)) for t in model.tensors)
    ftype = model.get(Keys.General.FILE_TYPE)
    quant = _ftype_name(ftype) if ftype is not None else _dominant_type(tensors)
    name = str(model.get(Keys.General.NAME) or Path(path).stem)
    return ModelProfile(
        name=name, source="gguf", architecture=arch, quant=quant, n_layer=int(n_layer), n_embd=int(n_embd),
        n_head=int(n_head), n_head_kv=int(n_head_kv), head_dim=int(head_dim), n_ff=int(n_ff),
        n_vocab=int(n_vocab), n_ctx_train=int(key(Keys.LLM.CONTEXT_LENGTH, 4096)), tensors=tensors,
        file_bytes=int(model.file_bytes), files=files,
        tie_embeddings=not any(t.name == "output.weight" for t in tensors),
    )


def _ftype_name(ftype: int) -> str:
    try:
        return LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"ftype {ftype}"


def _dominant_type(tensors: tuple[TensorInfo, ...]) -> str:
    by: dict[str, int] = {}
    for t in tensors:
        by[t.ggml_type.name] = by.get(t.ggml_type.name, 0) + t.nbytes
    return max(by, key=by.__getitem__) if by else "unknown"


# ---------------------------------------------------------------- shapes + target quant

_FLOAT_TYPES = (T.F32, T.F16, T.BF16)


def shape_tensor_types(shape: catalog.ModelShape, quant: str, base_type: GGMLQuantizationType = T.BF16
                       ) -> tuple[FileTypeInfo, list[TensorSpec], dict[str, GGMLQuantizationType]]:
    """(file type info, tensor specs, name -> type) of a Llama model with `shape` quantized to `quant`, by
    llama.cpp's per-tensor type rules (float types: every matrix in that type, vectors as they are)."""
    from corral.convert import quant_rules, quant_types

    info = quant_types.file_type(quant)
    specs = quant_rules.llama_tensor_specs(
        hidden=shape.n_embd, n_layers=shape.n_layer, n_heads=shape.n_head, n_kv_heads=shape.n_head_kv,
        ffn=shape.n_ff, vocab=shape.n_vocab, head_dim=shape.head_dim, tied_embeddings=shape.tie_embeddings,
        rope_freqs=shape.rope_freqs, dtype=base_type)
    if info.default_type in _FLOAT_TYPES:
        types = {s.name: (s.ggml_type if len(s.shape) == 1 else info.default_type) for s in specs}
    else:
        types = quant_rules.target_types(specs, info.ftype, has_imatrix=info.needs_imatrix)
    return info, specs, types


def profile_from_shape(shape: catalog.ModelShape, quant: str, *, source: str = "catalog",
                       base_type: GGMLQuantizationType = T.BF16) -> ModelProfile:
    """Profile of a model not yet quantized: llama.cpp's per-tensor type rules for `quant` on these shapes."""
    from corral.convert.gguf_writer import pad_to
    from corral.convert.quant_rules import tensor_info_bytes, tensor_nbytes

    info, specs, types = shape_tensor_types(shape, quant, base_type)
    tensors = tuple(TensorInfo(s.name, tuple(s.shape), types[s.name], tensor_nbytes(s.shape, types[s.name]))
                    for s in specs)
    # The file as quant_rules.predict_file_bytes sizes it (metadata + tensor infos, padded tensor data), from
    # the types above rather than running the type rules again; float files leave the header unpadded.
    header = LLAMA3_METADATA_BYTES + sum(tensor_info_bytes(s.name, s.shape) for s in specs)
    if info.default_type not in _FLOAT_TYPES:
        header = pad_to(header)
    file_bytes = header + sum(pad_to(t.nbytes) for t in tensors)
    return ModelProfile(
        name=shape.name, source=source, architecture="llama", quant=info.name, n_layer=shape.n_layer,
        n_embd=shape.n_embd, n_head=shape.n_head, n_head_kv=shape.n_head_kv, head_dim=shape.head_size,
        n_ff=shape.n_ff, n_vocab=shape.n_vocab, n_ctx_train=shape.n_ctx_train, tensors=tensors,
        file_bytes=file_bytes, tie_embeddings=shape.tie_embeddings,
    )


def shape_from_hf(folder: str | Path) -> catalog.ModelShape:
    """Shapes from a Hugging Face folder's config.json (Llama architecture only)."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise InvalidConfig("no config.json in this folder", path=folder)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidConfig(f"config.json is not valid JSON: {exc}", path=cfg_path) from None
    archs = cfg.get("architectures") or []
    if archs and "LlamaForCausalLM" not in archs:
        raise UnsupportedModel(f"architecture {archs[0]} is not supported (Llama only)", path=cfg_path)
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        shape = catalog.ModelShape(
            name=str(cfg.get("_name_or_path") or Path(folder).name),
            n_embd=hidden, n_layer=int(cfg["num_hidden_layers"]), n_head=heads,
            n_head_kv=int(cfg.get("num_key_value_heads") or heads), n_ff=int(cfg["intermediate_size"]),
            n_vocab=int(cfg["vocab_size"]), head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
            n_ctx_train=int(cfg.get("max_position_embeddings") or 4096),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_freqs=_rope_llama3(cfg),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidConfig(f"config.json lacks or mangles {exc}", path=cfg_path) from None
    if min(shape.n_embd, shape.n_layer, shape.n_head, shape.n_head_kv, shape.n_ff, shape.n_vocab) <= 0:
        raise InvalidConfig("config.json has non-positive sizes", path=cfg_path)
    return shape


def _rope_llama3(cfg: dict[str, Any]) -> bool:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    return isinstance(rs, dict) and (rs.get("rope_type") or rs.get("type")) == "llama3"


DEFAULT_QUANT = "Q4_K_M"


def load_profile(model: str | Path, quant: str | None = None) -> tuple[ModelProfile, list[str]]:
    """A profile for a .gguf path, an HF folder or a catalog name; returns (profile, notes)."""
    notes: list[str] = []
    p = Path(model)
    if p.is_file() or str(model).endswith(".gguf"):
        if not p.exists():
            raise InputNotFound("no such file", path=p)
        if quant:
            notes.append(f"--quant {quant} ignored: a GGUF file's tensor types are already fixed")
        return profile_from_gguf(p), notes
    if p.is_dir():
        shape = shape_from_hf(p)
        source = "hf"
    else:
        looked = catalog.lookup(str(model))
        if looked is None:
            if "/" in str(model) or p.suffix:
                raise InputNotFound("no such file or folder", path=p)
            catalog.require(str(model))  # raises the helpful error
        shape = looked  # type: ignore[assignment]
        source = "catalog"
    if not quant:
        quant = DEFAULT_QUANT
        notes.append(f"no --quant given: planning for {DEFAULT_QUANT}")
    return profile_from_shape(shape, quant, source=source), notes
