"""A loaded model's vocabulary through llama.cpp: text ↔ tokens, token pieces, special-token ids."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from typing import Any

from corral.app.runtime.native import lc as _lc
from corral.convert.errors import EngineError


class Vocab:
    """llama.cpp's `llama_vocab` of a loaded model (valid while the model is)."""

    def __init__(self, vocab: Any) -> None:
        self._vocab = vocab
        self._piece_buf = ctypes.create_string_buffer(256)

    def token_text(self, token: int) -> str:
        return (_lc.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (_lc.llama_token * size)()
        n = _lc.llama_tokenize(self._vocab, data, len(data), buf, size, add_special, parse_special)
        if n < 0:
            size = -n
            buf = (_lc.llama_token * size)()
            n = _lc.llama_tokenize(self._vocab, data, len(data), buf, size, add_special, parse_special)
            if n < 0:
                raise EngineError(f"llama.cpp could not tokenize {len(data)} bytes of text")
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        buf = self._piece_buf
        n = _lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = _lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return ctypes.string_at(buf, n)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="ignore")

    def special_id(self, text: str) -> int:
        """The id of a special token written as text, or -1 if the vocabulary has no such single token."""
        found = self.tokenize(text, parse_special=True)
        return found[0] if len(found) == 1 else -1

    def stop_ids(self, eos_id: int, stop_texts: Iterable[str]) -> frozenset[int]:
        """EOS, EOT and every stop text that is one token."""
        ids = {t for t in (eos_id, int(_lc.llama_vocab_eot(self._vocab))) if t >= 0}
        ids.update(i for i in map(self.special_id, stop_texts) if i >= 0)
        return frozenset(ids)
