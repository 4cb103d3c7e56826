"""Saved KV caches of conversations: resume a long chat without re-reading it.

One file per conversation, `kv/<conversation id>.kvstate` beside the chat store:

    b"CORRALKV" | u32 format version | u32 header length | header (JSON) | llama.cpp sequence state

The header holds the `StateKey` (everything that makes the state valid for a model and a context), the exact
tokens whose keys and values the state holds, and the SHA-256 of the state bytes. A state is used only when
the key matches the running engine's and the checksum is right; anything else is ignored with a reason and
never handed to llama.cpp. Files are written atomically; the folder is kept under a size cap, oldest first.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from corral.app import locations
from corral.app.runtime.state import Resumable, StateKey
from corral.convert.atomic import atomic_output
from corral.convert.units import GiB

MAGIC = b"CORRALKV"
FORMAT_VERSION = 1
SUFFIX = ".kvstate"
KV_FOLDER = "kv"  # beside the chat store
DEFAULT_MAX_BYTES = 16 * GiB
MAX_HEADER_BYTES = 64 * 1024 * 1024  # a token list of ~8M tokens; anything larger is not ours
_PREFIX = struct.Struct("<8sII")


@dataclass(frozen=True)
class SavedState:
    """A validated state: the tokens it covers and llama.cpp's bytes for them."""

    tokens: tuple[int, ...]
    data: bytes
    path: Path


@dataclass(frozen=True)
class Lookup:
    """The result of looking for a conversation's state: the state, or why there is none usable."""

    state: SavedState | None
    problem: str = ""  # empty when there was simply no file


def default_folder() -> Path:
    return locations.data_dir() / KV_FOLDER


def max_bytes_from_env() -> int:
    """The size cap: CORRAL_KV_CACHE_MAX (e.g. 32GiB; 0 turns saving off), else DEFAULT_MAX_BYTES."""
    from corral.convert.units import parse_size

    value = os.environ.get("CORRAL_KV_CACHE_MAX")
    return parse_size(value) if value else DEFAULT_MAX_BYTES


class KVStateStore:
    """The folder of saved states, with a total size cap."""

    def __init__(self, folder: str | Path | None = None, *, max_bytes: int | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_folder()
        self.max_bytes = max_bytes_from_env() if max_bytes is None else max_bytes

    def path(self, conversation_id: int) -> Path:
        return self.folder / f"{int(conversation_id)}{SUFFIX}"

    def save(self, conversation_id: int, key: StateKey, tokens: list[int] | tuple[int, ...], data: bytes) -> bool:
        """Write the state atomically (replacing an older one), then drop the oldest states over the cap.
        False when the state alone is larger than the cap (nothing is written then)."""
        header = json.dumps({"key": asdict(key), "tokens": list(tokens), "size": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()}).encode()
        total = _PREFIX.size + len(header) + len(data)
        if self.max_bytes <= 0 or total > self.max_bytes:
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(conversation_id)
        with atomic_output(target) as tmp, open(tmp, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)))
            f.write(header)
            f.write(data)
        self.prune(keep=target)
        return True

    def load(self, conversation_id: int, key: StateKey) -> Lookup:
        """The conversation's state if it is valid for `key`; otherwise why not (never raises on bad files)."""
        path = self.path(conversation_id)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return Lookup(None)
        except OSError as exc:
            return Lookup(None, f"saved KV state {path.name} unreadable ({exc.strerror or exc})")
        state, problem = _parse(raw, key, path)
        return Lookup(state, problem)

    def delete(self, conversation_id: int) -> None:
        self.path(conversation_id).unlink(missing_ok=True)

    def sizes(self) -> dict[int, int]:
        """Bytes on disk per conversation id."""
        out = {}
        for p in self._files():
            try:
                out[int(p.stem)] = p.stat().st_size
            except (ValueError, OSError):
                continue
        return out

    def prune(self, *, keep: Path | None = None) -> list[Path]:
        """Delete the oldest states until the folder fits the cap; `keep` (the one just written) goes last."""
        entries = []
        for p in self._files():
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((p == keep, st.st_mtime, p, st.st_size))
        entries.sort()
        total = sum(e[3] for e in entries)
        dropped = []
        for _, _, p, size in entries:
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
            dropped.append(p)
        return dropped

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{SUFFIX}")) if self.folder.is_dir() else []


def _parse(raw: bytes, key: StateKey, path: Path) -> tuple[SavedState | None, str]:
    name = path.name
    if len(raw) < _PREFIX.size:
        return None, f"saved KV state {name} is truncated; ignored"
    magic, version, header_len = _PREFIX.unpack_from(raw)
    if magic != MAGIC or version != FORMAT_VERSION:
        return None, f"saved KV state {name} is not a corral state of this version; ignored"
    if header_len > min(MAX_HEADER_BYTES, len(raw) - _PREFIX.size):
        return None, f"saved KV state {name} is truncated; ignored"
    try:
        header = json.loads(raw[_PREFIX.size:_PREFIX.size + header_len])
        stored_key = StateKey(**header["key"])
        tokens = tuple(int(t) for t in header["tokens"])
        size, digest = int(header["size"]), str(header["sha256"])
    except (ValueError, TypeError, KeyError):
        return None, f"saved KV state {name} has a damaged header; ignored"
    if stored_key != key:
        return None, f"saved KV state {name} was made with other model or context settings; ignored"
    data = raw[_PREFIX.size + header_len:]
    if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
        return None, f"saved KV state {name} is damaged (checksum); ignored"
    if not tokens:
        return None, f"saved KV state {name} holds no tokens; ignored"
    return SavedState(tokens, data, path), ""


def restore_conversation(engine: Resumable, store: KVStateStore, conversation_id: int) -> tuple[int, str]:
    """Put the conversation's saved KV state into the engine: (tokens restored, why nothing was if so)."""
    found = store.load(conversation_id, engine.state_key())
    if found.state is None:
        return 0, found.problem
    if not engine.import_state(found.state.tokens, found.state.data):
        return 0, f"saved KV state {found.state.path.name} was refused by llama.cpp; ignored"
    return len(found.state.tokens), ""


def save_conversation(engine: Resumable, store: KVStateStore, conversation_id: int) -> int:
    """Save the engine's KV state for the conversation; bytes written (0 when over the cap or empty)."""
    tokens, data = engine.export_state()
    if not tokens or not store.save(conversation_id, engine.state_key(), tokens, data):
        return 0
    return store.path(conversation_id).stat().st_size


class EngineConversation:
    """Which saved conversation's KV cache an engine holds: switching restores the new one's saved state,
    and each finished reply is saved. Engines that cannot save their state are left alone."""

    def __init__(self, store: KVStateStore) -> None:
        self.store = store
        self.current: int | None = None

    def switch_to(self, engine: object, conversation_id: int) -> str:
        """Make `conversation_id` the engine's; why its saved state was not used, if it was not ('' if fine)."""
        if conversation_id == self.current or not isinstance(engine, Resumable):
            return ""
        self.current = conversation_id
        return restore_conversation(engine, self.store, conversation_id)[1]

    def save(self, engine: object, conversation_id: int) -> int:
        """Save the engine's state for the conversation (after a reply); bytes written."""
        if not isinstance(engine, Resumable):
            return 0
        self.current = conversation_id
        return save_conversation(engine, self.store, conversation_id)
