"""Reading and validating a Hugging Face Llama checkpoint folder (config, index, safetensors headers)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, Keys

from .errors import InputNotFound, InvalidConfig, InvalidSafetensors, UnsupportedModel
from .safetensors_io import TensorInfo, read_header

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
FLOAT_DTYPES = ("BF16", "F16", "F32")
# Tensors a checkpoint may carry that the GGUF file does not need.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias", ".input_scale_ub", ".input_scale")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 rope scaling parameters (rope_type llama3)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    """The hyperparameters corral needs from config.json, validated."""

    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab_size: int
    max_position: int
    rms_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_embeddings: bool
    fp8: bool = False
    fp8_skip_modules: tuple[str, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InvalidConfig("file is missing", path=path) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidConfig(f"not valid JSON ({exc})", path=path) from exc


def _int(cfg: dict[str, Any], key: str, path: Path, *, positive: bool = True) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or (positive and value <= 0):
        raise InvalidConfig(f"{key} must be a positive integer, got {value!r}", path=path)
    return value


def _float(value: Any, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidConfig(f"{key} must be a positive number, got {value!r}", path=path)
    return float(value)


def _opt_token_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def parse_config(cfg: dict[str, Any], path: Path) -> LlamaConfig:
    """Validate a config.json document (old rope_scaling + rope_theta style or newer rope_parameters)."""
    if not isinstance(cfg, dict):
        raise InvalidConfig("config is not a JSON object", path=path)
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else cfg.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"unsupported architecture {arch!r} (corral converts {', '.join(SUPPORTED_ARCHITECTURES)})", path=path
        )
    if "text_config" in cfg and isinstance(cfg["text_config"], dict):
        cfg = {**cfg, **cfg["text_config"]}
    hidden = _int(cfg, "hidden_size", path)
    n_layers = _int(cfg, "num_hidden_layers", path)
    n_heads = _int(cfg, "num_attention_heads", path)
    n_kv = cfg.get("num_key_value_heads", n_heads)
    if isinstance(n_kv, bool) or not isinstance(n_kv, int) or n_kv <= 0:
        raise InvalidConfig(f"num_key_value_heads must be a positive integer, got {n_kv!r}", path=path)
    if n_heads % n_kv:
        raise InvalidConfig(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}", path=path)
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % n_heads:
            raise InvalidConfig(f"hidden_size {hidden} is not a multiple of num_attention_heads {n_heads}", path=path)
        head_dim = hidden // n_heads
    elif isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise InvalidConfig(f"head_dim must be a positive integer, got {head_dim!r}", path=path)
    if head_dim % 2:
        raise InvalidConfig(f"head_dim {head_dim} must be even", path=path)
    ffn = _int(cfg, "intermediate_size", path)
    vocab = _int(cfg, "vocab_size", path)
    max_pos = _int(cfg, "max_position_embeddings", path)
    rms_eps = _float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", path)
    params = cfg.get("rope_parameters")
    if params is None:
        params = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise InvalidConfig("rope_scaling / rope_parameters must be an object", path=path)
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    theta = _float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)), "rope_theta", path)
    rope_type = str(params.get("rope_type", params.get("type", "default")) or "default").lower()
    scaling: RopeScaling | None = None
    if rope_type == "llama3":
        try:
            scaling = RopeScaling(
                factor=float(params.get("factor", 8.0)),
                low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
            )
        except (TypeError, ValueError) as exc:
            raise InvalidConfig(f"bad llama3 rope scaling parameters ({exc})", path=path) from exc
    elif rope_type != "default":
        raise UnsupportedModel(f"unsupported rope type {rope_type!r} (corral handles default and llama3)", path=path)
    qcfg = cfg.get("quantization_config") or {}
    fp8 = False
    skip: tuple[str, ...] = ()
    if qcfg:
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
        if method != "fbgemm_fp8":
            raise UnsupportedModel(
                f"unsupported quantization_config.quant_method {method!r} (corral reads bf16/f16/f32 and fbgemm_fp8)",
                path=path,
            )
        fp8 = True
        skip = tuple(str(m) for m in (qcfg.get("modules_to_not_convert") or []))
    return LlamaConfig(
        hidden_size=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn=ffn,
        vocab_size=vocab,
        max_position=max_pos,
        rms_eps=rms_eps,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        fp8=fp8,
        fp8_skip_modules=skip,
        bos_token_id=_opt_token_id(cfg.get("bos_token_id")),
        eos_token_id=_opt_token_id(cfg.get("eos_token_id")),
        pad_token_id=_opt_token_id(cfg.get("pad_token_id")),
        raw=cfg,
    )


def load_config(folder: Path) -> LlamaConfig:
    """Read and validate `folder/config.json`."""
    path = folder / "config.json"
    if not path.is_file():
        raise InvalidConfig("config.json is missing (not a Hugging Face checkpoint folder?)", path=path)
    return parse_config(_load_json(path), path)


def check_tokenizer_config(folder: Path) -> None:
    """Refuse a folder without tokenizer_config.json (BOS/EOS settings; the chat template may be in chat_template.jinja)."""
    path = folder / TOKENIZER_CONFIG_NAME
    if not path.is_file():
        raise InvalidConfig(
            f"{TOKENIZER_CONFIG_NAME} is missing (needed for the BOS/EOS settings and the chat template)", path=path
        )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, sorted by name (from the index when there is one)."""
    index = folder / INDEX_NAME
    if index.is_file():
        doc = _load_json(index)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidConfig("no weight_map in the index", path=index)
        names = sorted({str(v) for v in weight_map.values()})
        for name in names:
            if "/" in name or "\\" in name or name.startswith("."):
                raise InvalidConfig(f"weight_map names a file outside the folder: {name!r}", path=index)
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InvalidConfig(f"index names missing weight files: {', '.join(missing[:5])}", path=index)
        return files
    files = sorted(p for p in folder.iterdir() if p.name.startswith("model") and p.name.endswith(".safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
            raise UnsupportedModel("only safetensors weights are supported (found .bin/.pth files)", path=folder)
        raise InvalidConfig("no model*.safetensors weight files found", path=folder)
    return files


@dataclass
class Checkpoint:
    """An opened, validated HF checkpoint: config plus every tensor's location, in reference order."""

    folder: Path
    config: LlamaConfig
    files: list[Path]
    tensors: dict[str, TensorInfo]

    @property
    def source_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def first_matrix_dtype(self) -> str | None:
        """The dtype of the first 2-D tensor (what `--outtype auto` follows)."""
        for info in self.tensors.values():
            if len(info.shape) >= 2:
                return info.dtype
        return None


def open_checkpoint(src: str | Path) -> Checkpoint:
    """Open a checkpoint folder: validate config.json, the index and every safetensors header."""
    folder = Path(src)
    if not folder.exists():
        raise InputNotFound("no such checkpoint folder", path=folder)
    if not folder.is_dir():
        raise InvalidConfig("expected a Hugging Face checkpoint folder", path=folder)
    config = load_config(folder)
    check_tokenizer_config(folder)
    files = weight_files(folder)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        header = read_header(file)
        # Each file's tensors in name order, files in name order: the order llama.cpp's converter uses.
        for name in sorted(header.tensors):
            if name in tensors:
                raise InvalidSafetensors(f"tensor {name!r} also appears in {tensors[name].file.name}", path=file)
            tensors[name] = header.tensors[name]
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = _load_json(index)["weight_map"]
        missing = sorted(set(weight_map) - set(tensors))
        extra = sorted(set(tensors) - set(weight_map))
        if missing or extra:
            detail = f"missing {missing[:3]}" if missing else f"unlisted {extra[:3]}"
            raise InvalidConfig(f"index and weight files disagree: {detail}", path=index)
        for name, fname in weight_map.items():
            if tensors[name].file.name != fname:
                raise InvalidConfig(f"index puts {name!r} in {fname}, found in {tensors[name].file.name}", path=index)
    return Checkpoint(folder, config, files, tensors)


# generation_config.json field -> (GGUF key, type), in the order llama.cpp writes them.
_SAMPLING = (
    ("sequence", Keys.General.SAMPLING_SEQUENCE, GGUFValueType.STRING),
    ("top_k", Keys.General.SAMPLING_TOP_K, GGUFValueType.INT32),
    ("top_p", Keys.General.SAMPLING_TOP_P, GGUFValueType.FLOAT32),
    ("min_p", Keys.General.SAMPLING_MIN_P, GGUFValueType.FLOAT32),
    ("xtc_probability", Keys.General.SAMPLING_XTC_PROBABILITY, GGUFValueType.FLOAT32),
    ("xtc_threshold", Keys.General.SAMPLING_XTC_THRESHOLD, GGUFValueType.FLOAT32),
    ("temperature", Keys.General.SAMPLING_TEMP, GGUFValueType.FLOAT32),
    ("penalty_last_n", Keys.General.SAMPLING_PENALTY_LAST_N, GGUFValueType.INT32),
    ("penalty_repeat", Keys.General.SAMPLING_PENALTY_REPEAT, GGUFValueType.FLOAT32),
    ("mirostat", Keys.General.SAMPLING_MIROSTAT, GGUFValueType.INT32),
    ("mirostat_tau", Keys.General.SAMPLING_MIROSTAT_TAU, GGUFValueType.FLOAT32),
    ("mirostat_eta", Keys.General.SAMPLING_MIROSTAT_ETA, GGUFValueType.FLOAT32),
)


def sampling_kvs(folder: Path) -> list[tuple[str, Any, GGUFValueType]]:
    """general.sampling.* defaults from generation_config.json (ignored when missing or unreadable)."""
    try:
        gen = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(gen, dict):
        return []
    out: list[tuple[str, Any, GGUFValueType]] = []
    for name, key, vtype in _SAMPLING:
        value = gen.get("repetition_penalty") if name == "penalty_repeat" and name not in gen else gen.get(name)
        if value is None or isinstance(value, bool):
            continue
        if vtype == GGUFValueType.STRING and isinstance(value, str) and value:
            out.append((key, value, vtype))
        elif vtype == GGUFValueType.INT32 and isinstance(value, int):
            out.append((key, value, vtype))
        elif vtype == GGUFValueType.FLOAT32 and isinstance(value, (int, float)):
            out.append((key, float(value), vtype))
    return out
