"""Reading and validating a Hugging Face Llama checkpoint folder (config, index, safetensors headers)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, Keys

from .errors import InputNotFound, InvalidConfig, InvalidSafetensors, UnsupportedModel
from .llama_family import LlamaHParams, hparams_from_hf_config, text_config
from .safetensors_io import SafetensorsTensor, read_header

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
FLOAT_DTYPES = ("BF16", "F16", "F32")
# Tensors a checkpoint may carry that the GGUF file does not need.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias", ".input_scale_ub", ".input_scale")


@dataclass(frozen=True)
class LlamaConfig:
    """A checkpoint's config.json, validated: the hyper-parameters plus what conversion needs besides."""

    hparams: LlamaHParams
    fp8: bool = False
    fp8_skip_modules: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InvalidConfig("file is missing", path=path) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidConfig(f"not valid JSON ({exc})", path=path) from exc


def parse_config(doc: Any, path: Path) -> LlamaConfig:
    """Validate a config.json document: the family's hyper-parameter rules, then the quantization config."""
    hparams = hparams_from_hf_config(doc, path)
    cfg = text_config(doc, path)
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
    return LlamaConfig(hparams=hparams, fp8=fp8, fp8_skip_modules=skip, raw=cfg)


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
    tensors: dict[str, SafetensorsTensor]

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
    tensors: dict[str, SafetensorsTensor] = {}
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
