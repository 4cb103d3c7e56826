"""ModelProfile: every tensor (name, shape, type, bytes, file offset) plus the shapes the memory model needs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf import GGMLQuantizationType, Keys, LlamaFileType

from corral.convert.errors import InputNotFound, InvalidGGUF, UnsupportedModel
from corral.convert.llama_family import ROPE_FREQS_NAME, LlamaHParams, RopeScaling, gguf_tensor_specs
from corral.convert.tensor_specs import TensorSpec

from . import catalog

if TYPE_CHECKING:
    from corral.convert.quant_types import FileTypeInfo

T = GGMLQuantizationType
# Tensor names (gguf MODEL_TENSOR names for LLM_ARCH_LLAMA) grouped by what the solver moves.
_ATTN = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv", "attn_norm", "attn_q_norm", "attn_k_norm")
_FFN = ("ffn_gate", "ffn_up", "ffn_down", "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
        "ffn_down_exps")
# Metadata of a Llama 3 GGUF apart from tensor infos: general.*, llama.*, the 128256-token vocab, its
# token types and 280147 merges, chat template. Measured on our converter's output (bench/bench_plan.py).
LLAMA3_METADATA_BYTES = 7_600_000


@dataclass(frozen=True)
class TensorInfo(TensorSpec):
    """A weight tensor as the planner sees it: offset -1 when there is no file (a predicted model)."""

    offset: int = -1
    file_index: int = 0

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


@dataclass(frozen=True)
class ModelProfile:
    """What the planner knows about a model, from a GGUF header, an HF config, or the catalog."""

    name: str
    source: str  # "gguf" | "hf" | "catalog"
    architecture: str
    quant: str  # file type name, e.g. Q4_K_M
    hparams: LlamaHParams
    tensors: tuple[TensorInfo, ...]
    file_bytes: int
    files: tuple[Path, ...] = ()

    # The hyper-parameters, read through: the memory model and the solver use these names.
    @property
    def n_layer(self) -> int:
        return self.hparams.n_layer

    @property
    def n_embd(self) -> int:
        return self.hparams.n_embd

    @property
    def n_head(self) -> int:
        return self.hparams.n_head

    @property
    def n_head_kv(self) -> int:
        return self.hparams.n_head_kv

    @property
    def head_dim(self) -> int:
        return self.hparams.head_dim

    @property
    def n_ff(self) -> int:
        return self.hparams.n_ff

    @property
    def n_vocab(self) -> int:
        return self.hparams.n_vocab

    @property
    def n_ctx_train(self) -> int:
        return self.hparams.n_ctx_train

    @property
    def n_embd_kv(self) -> int:
        return self.hparams.n_embd_kv

    @property
    def tie_embeddings(self) -> bool:
        return self.hparams.tie_embeddings

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

    return profile_of(read_gguf(path), path)


def profile_of(model: Any, path: str | Path) -> ModelProfile:
    """Profile of an already parsed GGUF (`convert.gguf_file.GGUFModelFile`) read from `path`."""
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
    n_vocab = key(Keys.LLM.VOCAB_SIZE) or model.n_tokens
    if not n_vocab:
        embd = next((t for t in model.tensors if t.name == "token_embd.weight"), None)
        n_vocab = embd.shape[1] if embd is not None and len(embd.shape) > 1 else 32000
    files = tuple(model.files)
    index = {f: i for i, f in enumerate(files)}
    tensors = tuple(TensorInfo(t.name, t.shape, t.ggml_type, t.offset, index.get(t.file, 0)) for t in model.tensors)
    names = {t.name for t in tensors}
    hparams = LlamaHParams(
        n_embd=int(n_embd), n_layer=int(n_layer), n_head=int(n_head), n_head_kv=int(n_head_kv), n_ff=int(n_ff),
        n_vocab=int(n_vocab), head_dim=int(head_dim), n_ctx_train=int(key(Keys.LLM.CONTEXT_LENGTH, 4096)),
        rope_theta=float(key(Keys.Rope.FREQ_BASE, 10000.0)),
        rms_eps=float(key(Keys.Attention.LAYERNORM_RMS_EPS, 1e-5)),
        # the factors themselves are in the file; the planner only needs to know the tensor is there
        rope_scaling=RopeScaling() if ROPE_FREQS_NAME in names else None,
        tie_embeddings="output.weight" not in names,
    )
    ftype = model.get(Keys.General.FILE_TYPE)
    quant = _ftype_name(ftype) if ftype is not None else _dominant_type(tensors)
    name = str(model.get(Keys.General.NAME) or Path(path).stem)
    return ModelProfile(name=name, source="gguf", architecture=arch, quant=quant, hparams=hparams, tensors=tensors,
                        file_bytes=int(model.file_bytes), files=files)


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
    specs = gguf_tensor_specs(shape.hparams, base_type)
    if info.default_type in _FLOAT_TYPES:
        types = {s.name: (s.ggml_type if len(s.shape) == 1 else info.default_type) for s in specs}
    else:
        types = quant_rules.target_types(specs, info.ftype, has_imatrix=info.needs_imatrix)
    return info, specs, types


def profile_from_shape(shape: catalog.ModelShape, quant: str, *, source: str = "catalog",
                       base_type: GGMLQuantizationType = T.BF16) -> ModelProfile:
    """Profile of a model not yet quantized: llama.cpp's per-tensor type rules for `quant` on these shapes."""
    from corral.convert.gguf_writer import pad_to
    from corral.convert.quant_rules import tensor_info_bytes

    info, specs, types = shape_tensor_types(shape, quant, base_type)
    tensors = tuple(TensorInfo(s.name, s.shape, types[s.name]) for s in specs)
    # The file as quant_rules.predict_file_bytes sizes it (metadata + tensor infos, padded tensor data), from
    # the types above rather than running the type rules again; float files leave the header unpadded.
    header = LLAMA3_METADATA_BYTES + sum(tensor_info_bytes(s.name, s.shape) for s in specs)
    if info.default_type not in _FLOAT_TYPES:
        header = pad_to(header)
    file_bytes = header + sum(pad_to(t.nbytes) for t in tensors)
    return ModelProfile(name=shape.name, source=source, architecture="llama", quant=info.name, hparams=shape.hparams,
                        tensors=tensors, file_bytes=file_bytes)


def shape_from_hf(folder: str | Path) -> catalog.ModelShape:
    """Name and hyper-parameters of a Hugging Face folder, by the converter's own config.json rules."""
    from corral.convert.hf_checkpoint import load_config

    config = load_config(Path(folder))
    return catalog.ModelShape(str(config.raw.get("_name_or_path") or Path(folder).name), config.hparams)


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
