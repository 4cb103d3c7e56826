"""Resuming from a saved KV state through llama.cpp: same greedy tokens, only the new part decoded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.app.chats.kv_states import KVStateStore, restore_conversation, save_conversation
from corral.app.runtime.api import Message, SamplingSettings
from corral.app.runtime.engine import LlamaEngine, load_engine
from tests.helpers.engine import cpu_plan, shared_tiny_gguf

GREEDY = SamplingSettings(temperature=0.0, max_tokens=12, seed=0)
HISTORY = [Message("system", "You answer briefly."),
           *[Message("user" if i % 2 == 0 else "assistant", f"Turn {i}: " + "llamas graze on the hill " * 12)
             for i in range(6)]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_gguf(tmp_path_factory)


@pytest.fixture
def fresh(tiny: Path) -> Iterator[list[LlamaEngine]]:
    engines: list[LlamaEngine] = []
    yield engines
    for e in engines:
        e.close()


def _load(tiny: Path, engines: list[LlamaEngine]) -> LlamaEngine:
    engine = load_engine(tiny, plan=cpu_plan())
    engines.append(engine)
    return engine


def test_restored_state_gives_the_same_tokens_and_skips_the_history(tiny: Path, fresh: list, tmp_path: Path) -> None:
    store = KVStateStore(tmp_path, max_bytes=1 << 30)
    first = _load(tiny, fresh)
    reply = first.generate([*HISTORY, Message("user", "And the llamas?")], GREEDY)
    assert save_conversation(first, store, 5) > 0
    saved_tokens = list(first._cached)
    nxt = [*HISTORY, Message("user", "And the llamas?"), Message("assistant", reply.text),
           Message("user", "Say it again.")]

    cold = _load(tiny, fresh)
    cold.generate(nxt, GREEDY)
    assert cold.last_cached_tokens == 0

    warm = _load(tiny, fresh)
    restored, problem = restore_conversation(warm, store, 5)
    assert (restored, problem) == (len(saved_tokens), "")
    warm.generate(nxt, GREEDY)
    assert warm.last_completion_tokens == cold.last_completion_tokens
    assert warm.last_prompt_tokens == cold.last_prompt_tokens
    # everything up to where the saved tokens and the new prompt part ways was restored, not decoded again
    common = next((i for i, (a, b) in enumerate(zip(saved_tokens, warm.last_prompt_tokens)) if a != b),
                  min(len(saved_tokens), len(warm.last_prompt_tokens)))
    assert warm.last_cached_tokens == common
    assert common > len(cold.last_prompt_tokens) // 2


def test_state_of_another_context_size_is_ignored(tiny: Path, fresh: list, tmp_path: Path) -> None:
    store = KVStateStore(tmp_path, max_bytes=1 << 30)
    a = _load(tiny, fresh)
    a.generate(HISTORY, GREEDY)
    save_conversation(a, store, 1)
    other = load_engine(tiny, plan=cpu_plan(n_ctx=a.n_ctx * 2))
    fresh.append(other)
    restored, problem = restore_conversation(other, store, 1)
    assert restored == 0 and "other model or context settings" in problem
    other.generate(HISTORY, GREEDY)  # and the engine works as if nothing was there
    assert other.last_cached_tokens == 0
