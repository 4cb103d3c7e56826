"""GGUF files for the fault suite, serialised byte by byte so that any field can be broken on purpose.

They are written here independently of corral's writer (and of its size tables); `GGUFImage.pos` records
where each field lives. Each corpus entry is a `Case`: a name, the bytes and a regular expression the
error message must match.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

T = GGMLQuantizationType
V = GGUFValueType

SCALAR_FMT: dict[GGUFValueType, str] = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
}  # fmt: skip

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def pack_str(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack("<Q", len(raw)) + raw


def pack_value(vtype: GGUFValueType, value: Any, etype: GGUFValueType | None = None) -> bytes:
    """The bytes of one GGUF value (without its type tag, which `KV` writes)."""
    if vtype == V.STRING:
        return pack_str(value)
    if vtype == V.ARRAY:
        assert etype is not None
        body = b"".join(pack_value(etype, v) for v in value)
        return struct.pack("<IQ", int(etype), len(value)) + body
    return struct.pack(SCALAR_FMT[vtype], value)




@dataclass(frozen=True)
class KV:
    key: str
    vtype: GGUFValueType
    value: Any
    etype: GGUFValueType | None = None


def pack_kv(kv: KV) -> bytes:
    """One whole key/value entry: key, type tag, value."""
    return pack_str(kv.key) + struct.pack("<I", int(kv.vtype)) + pack_value(kv.vtype, kv.value, kv.etype)


@dataclass(frozen=True)
class RawTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order (ne0 first)
    ggml_type: GGMLQuantizationType
    data: bytes


@dataclass
class GGUFImage:
    """A serialised GGUF file and the byte position of each field (for targeted corruption)."""

    data: bytes
    pos: dict[str, int] = field(default_factory=dict)

    def patch(self, at: int, raw: bytes) -> bytes:
        return self.data[:at] + raw + self.data[at + len(raw) :]


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    return int(np.prod(shape)) // block * size


def build_gguf(
    kvs: list[KV],
    tensors: list[RawTensor],
    *,
    alignment: int = 32,
    version: int = 3,
    offsets: dict[str, int] | None = None,
) -> GGUFImage:
    """Serialise a GGUF file; `offsets` overrides tensors' relative data offsets (to break them)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)))
    pos = {"n_tensors": 8, "n_kv": 16}
    for kv in kvs:
        pos[f"kv:{kv.key}"] = len(out)
        out += pack_str(kv.key)
        pos[f"type:{kv.key}"] = len(out)
        out += struct.pack("<I", int(kv.vtype))
        pos[f"val:{kv.key}"] = len(out)
        out += pack_value(kv.vtype, kv.value, kv.etype)
    rel = 0
    layout: list[int] = []
    for t in tensors:
        layout.append(rel)
        rel += -(-len(t.data) // alignment) * alignment
    for t, offset in zip(tensors, layout):
        pos[f"ti:{t.name}"] = len(out)
        out += pack_str(t.name)
        pos[f"dims:{t.name}"] = len(out)
        out += struct.pack("<I", len(t.shape)) + b"".join(struct.pack("<Q", d) for d in t.shape)
        pos[f"ttype:{t.name}"] = len(out)
        out += struct.pack("<I", int(t.ggml_type))
        pos[f"off:{t.name}"] = len(out)
        out += struct.pack("<Q", (offsets or {}).get(t.name, offset))
    pos["info_end"] = len(out)
    out += b"\0" * (-len(out) % alignment)
    pos["data"] = len(out)
    for t, offset in zip(tensors, layout):
        assert len(out) == pos["data"] + offset
        out += t.data
        out += b"\0" * (-len(out) % alignment)
    return GGUFImage(bytes(out), pos)


def small_llama_kvs(template: str = LLAMA3_TEMPLATE) -> list[KV]:
    """Metadata of a tiny but well-formed Llama GGUF."""
    tokens = ["<|begin_of_text|>", "<|eot_id|>", "a", "b", "c", "d", "e", "f"]
    return [
        KV("general.architecture", V.STRING, "llama"),
        KV("general.name", V.STRING, "fault-mini"),
        KV("general.file_type", V.UINT32, 0),
        KV("llama.block_count", V.UINT32, 1),
        KV("llama.context_length", V.UINT32, 256),
        KV("llama.embedding_length", V.UINT32, 64),
        KV("llama.feed_forward_length", V.UINT32, 128),
        KV("llama.attention.head_count", V.UINT32, 4),
        KV("llama.attention.head_count_kv", V.UINT32, 2),
        KV("llama.rope.freq_base", V.FLOAT32, 500000.0),
        KV("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, 1e-5),
        KV("tokenizer.ggml.model", V.STRING, "gpt2"),
        KV("tokenizer.ggml.tokens", V.ARRAY, tokens, V.STRING),
        KV("tokenizer.ggml.token_type", V.ARRAY, [3, 3, 1, 1, 1, 1, 1, 1], V.INT32),
        KV("tokenizer.ggml.bos_token_id", V.UINT32, 0),
        KV("tokenizer.ggml.eos_token_id", V.UINT32, 1),
        KV("tokenizer.chat_template", V.STRING, template),
    ]


def small_llama_tensors() -> list[RawTensor]:
    rng = np.random.default_rng(0)

    def f32(name: str, *shape: int) -> RawTensor:
        return RawTensor(name, shape, T.F32, rng.standard_normal(int(np.prod(shape)), dtype=np.float32).tobytes())

    return [
        f32("token_embd.weight", 64, 8),
        f32("blk.0.attn_norm.weight", 64),
        f32("blk.0.attn_q.weight", 64, 64),
        RawTensor("blk.0.ffn_up.weight", (64, 128), T.Q8_0, bytes(tensor_nbytes((64, 128), T.Q8_0))),
        f32("output_norm.weight", 64),
    ]


def small_gguf(kvs: list[KV] | None = None, tensors: list[RawTensor] | None = None, **kw: Any) -> GGUFImage:
    return build_gguf(small_llama_kvs() if kvs is None else kvs, small_llama_tensors() if tensors is None else tensors, **kw)


@dataclass(frozen=True)
class Case:
    """One bad input: its bytes and what the error message must say (a regex, case-insensitive)."""

    name: str
    data: bytes
    expect: str


def _with_kv(kv: KV) -> list[KV]:
    """The tiny Llama's metadata with `kv` set (replaced or added)."""
    return [k for k in small_llama_kvs() if k.key != kv.key] + [kv]


def gguf_cases() -> list[Case]:
    """Every malformed-GGUF case, derived from one valid tiny Llama GGUF."""
    img = small_gguf()
    b, p = img.data, img.pos
    q = lambda v: struct.pack("<Q", v)  # noqa: E731
    i32 = lambda v: struct.pack("<I", v)  # noqa: E731
    names = [t.name for t in small_llama_tensors()]
    t0, t1 = names[0], names[2]
    dup_tensors = small_llama_tensors()
    dup_tensors[2] = replace(dup_tensors[2], name=t0)
    long_name = small_llama_tensors()
    long_name[1] = replace(long_name[1], name="blk.0." + "x" * 70)
    bad_block = small_llama_tensors()
    bad_block[3] = RawTensor("blk.0.ffn_up.weight", (33, 4), T.Q8_0, bytes(34 * 4))
    f16_norm = small_llama_tensors()  # llama.cpp's CPU MUL aborts on an F16 norm (and its threads hang)
    f16_norm[1] = RawTensor("blk.0.attn_norm.weight", (64,), T.F16, bytes(128))
    return [
        Case("empty", b"", r"not a GGUF file \(0 bytes\)"),
        Case("magic_only", b"GGUF", r"not a GGUF file"),
        Case("text_file", b"this is not a model, it is a text file\n" * 4, r"not a GGUF file \(bad magic\)"),
        Case("wrong_magic", b"GGML" + b[4:], r"bad magic"),
        Case("version_1", img.patch(4, i32(1)), r"unsupported GGUF version 1"),
        Case("version_big_endian", img.patch(4, struct.pack(">I", 3)), r"unsupported GGUF version"),
        Case("truncated_in_counts", b[:30], r"truncated"),
        Case("truncated_in_kv", b[: p["val:tokenizer.ggml.tokens"] + 20], r"truncated"),
        Case("truncated_in_tensor_table", b[: p[f"dims:{t1}"] + 6], r"truncated"),
        Case("truncated_data", b[:-70], r"past the end of the file"),
        Case("absurd_tensor_count", img.patch(p["n_tensors"], q(1 << 63)), r"absurd tensor count"),
        Case("absurd_kv_count", img.patch(p["n_kv"], q(1 << 60)), r"absurd key/value count"),
        Case("oversized_key_string", img.patch(p["kv:general.architecture"], q(1 << 62)), r"bytes long"),
        Case("string_past_end", img.patch(p["val:general.name"], q(50_000_000)), r"truncated"),
        Case("oversized_array", img.patch(p["val:tokenizer.ggml.tokens"] + 4, q(1 << 40)), r"array elements"),
        Case("array_past_end", img.patch(p["val:tokenizer.ggml.token_type"] + 4, q(1_000_000)), r"truncated"),
        Case("unknown_value_type", img.patch(p["type:general.name"], i32(99)), r"unknown value type 99"),
        Case("offset_outside_file", img.patch(p[f"off:{t1}"], q(1 << 40)), r"past the end of the file"),
        Case("offset_misaligned", img.patch(p[f"off:{t1}"], q(7)), r"not aligned"),
        Case("tensors_overlap", img.patch(p[f"off:{t1}"], q(0)), r"overlap"),
        Case("unknown_tensor_type", img.patch(p[f"ttype:{t1}"], i32(4)), r"unknown type 4"),
        Case("absurd_tensor_type", img.patch(p[f"ttype:{t1}"], i32(0xFFFF)), r"unknown type 65535"),
        Case("too_many_dims", img.patch(p[f"dims:{t1}"], i32(9)), r"9 dimensions"),
        Case("zero_dim", img.patch(p[f"dims:{t1}"] + 4, q(0)), r"has shape"),
        Case("duplicate_key", build_gguf(small_llama_kvs() + [KV("general.name", V.STRING, "x")],
                                         small_llama_tensors()).data, r"duplicate key"),
        Case("duplicate_tensor", small_gguf(tensors=dup_tensors).data, r"duplicate tensor"),
        Case("long_tensor_name", small_gguf(tensors=long_name).data, r"name is empty or 64\+ bytes"),
        Case("row_not_block_multiple", small_gguf(tensors=bad_block).data, r"not a multiple"),
        Case("alignment_not_power_of_two",
             small_gguf(kvs=_with_kv(KV("general.alignment", V.UINT32, 24))).data,
             r"not a power of two"),
        Case("architecture_not_string",
             small_gguf(kvs=_with_kv(KV("general.architecture", V.UINT32, 7))).data,
             r"general.architecture must be a string"),
        Case("absurd_block_count",
             small_gguf(kvs=_with_kv(KV("llama.block_count", V.UINT64, 1 << 40))).data,
             r"llama.block_count"),
        Case("zero_block_count",  # GGML_ASSERT(n_layer_all > 0) in llama.cpp: abort()
             small_gguf(kvs=_with_kv(KV("llama.block_count", V.UINT32, 0))).data, r"block_count is 0"),
        Case("block_count_over_llama_max",
             small_gguf(kvs=_with_kv(KV("llama.block_count", V.UINT32, 513))).data, r"1\.\.512"),
        Case("norm_not_f32", small_gguf(tensors=f16_norm).data, r"attn_norm.*F16.*F32"),
        Case("split_count_without_split_name",
             small_gguf(kvs=_with_kv(KV("split.count", V.UINT16, 3))).data, r"shard 1 of 3"),
        Case("split_count_wrong_type",
             small_gguf(kvs=_with_kv(KV("split.count", V.STRING, "three"))).data, r"split.count"),
    ]


# -------------------------------------------------------------------- real-file rewrites (big GGUF)


@dataclass(frozen=True)
class HeaderMap:
    """A real GGUF header (up to the end of its tensor table) and each key's whole KV entry in it."""

    head: bytes
    kv_spans: dict[str, tuple[int, int]]
    data_offset: int
    alignment: int


def map_header(path: Path) -> HeaderMap:
    """Walk a (valid) GGUF header and record where each KV entry and the tensor table lie."""
    with open(path, "rb") as fh:
        head = fh.read(64 * 1024 * 1024)
    at = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)

    def skip_value(vtype: int, at: int) -> int:
        if vtype == V.STRING:
            return at + 8 + struct.unpack_from("<Q", head, at)[0]
        if vtype == V.ARRAY:
            etype, count = struct.unpack_from("<IQ", head, at)
            at += 12
            if etype in SCALAR_FMT:
                return at + count * struct.calcsize(SCALAR_FMT[GGUFValueType(etype)])
            for _ in range(count):
                at = skip_value(etype, at)
            return at
        return at + struct.calcsize(SCALAR_FMT[GGUFValueType(vtype)])

    spans: dict[str, tuple[int, int]] = {}
    alignment = 32
    for _ in range(n_kv):
        start = at
        (klen,) = struct.unpack_from("<Q", head, at)
        key = head[at + 8 : at + 8 + klen].decode()
        at += 8 + klen
        (vtype,) = struct.unpack_from("<I", head, at)
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", head, at + 4)
        at = skip_value(vtype, at + 4)
        spans[key] = (start, at)
    for _ in range(n_tensors):
        (nlen,) = struct.unpack_from("<Q", head, at)
        at += 8 + nlen
        (ndims,) = struct.unpack_from("<I", head, at)
        at += 4 + 8 * ndims + 4 + 8
    return HeaderMap(head[:at], spans, -(-at // alignment) * alignment, alignment)


def rewrite_gguf(src: Path, dst: Path, set_kvs: list[KV]) -> Path:
    """Copy `src` to `dst` with KV entries replaced or added (tensor data copied, re-aligned)."""
    hmap = map_header(src)
    head = hmap.head
    replaced = {kv.key: kv for kv in set_kvs}
    entries = [pack_kv(replaced.pop(key)) if key in replaced else head[start:end]
               for key, (start, end) in hmap.kv_spans.items()]
    entries += [pack_kv(kv) for kv in replaced.values()]
    kv_end = max(end for _, end in hmap.kv_spans.values())
    new_head = head[:16] + struct.pack("<Q", len(entries)) + b"".join(entries) + head[kv_end:]
    new_head += b"\0" * (-len(new_head) % hmap.alignment)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(new_head)
        fin.seek(hmap.data_offset)
        shutil.copyfileobj(fin, fout, 16 * 1024 * 1024)
    return dst


def chat_template_gguf(src: Path, dst: Path, template: str) -> Path:
    """A copy of a real GGUF whose `tokenizer.chat_template` is `template`."""
    return rewrite_gguf(src, dst, [KV("tokenizer.chat_template", V.STRING, template)])
