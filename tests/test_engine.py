"""LlamaEngine over real llama.cpp: exactness against llama-cpp-python, stops, cancel, context, plan application."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gguf import GGMLQuantizationType as T
from llama_cpp import Llama

from corral.app.runtime.api import Message, SamplingSettings
from corral.app.runtime.chat_format import builtin_llama3_prompt
from corral.app.runtime.engine import EngineOptions, LlamaEngine, load_engine
from corral.app.runtime.native import build_params, lc
from corral.convert.errors import Cancelled, ContextOverflow, DoesNotFit, EngineError, InvalidGGUF
from corral.offload.load_settings import LoadSettings
from tests.helpers.engine import cpu_plan, shared_tiny_gguf, write_tiny_gguf

GREEDY = SamplingSettings(temperature=0.0, max_tokens=48)
CONVERSATIONS = [
    [Message("user", "Hello there!")],
    [Message("system", "You are terse."), Message("user", "Name three colours.")],
    [Message("system", "Be kind."), Message("user", "Hi"), Message("assistant", "Hello! How can I help?"),
     Message("user", "Tell me a joke about llamas.")],
]


class RecordingLlama(Llama):
    """llama-cpp-python's Llama, remembering the prompt and every token its generate() yields."""

    def generate(self, tokens: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.seen_prompt = list(tokens)
        self.seen_tokens: list[int] = []
        for token in super().generate(tokens, **kwargs):
            self.seen_tokens.append(int(token))
            yield token


def reference_reply(ref: RecordingLlama, messages: list[Message], settings: SamplingSettings) -> str:
    out = ref.create_chat_completion(
        [{"role": m.role, "content": m.content} for m in messages],
        temperature=settings.temperature, top_p=settings.top_p, max_tokens=settings.max_tokens, seed=settings.seed,
    )
    return str(out["choices"][0]["message"]["content"])


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_gguf(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path) -> Iterator[LlamaEngine]:
    with load_engine(tiny_gguf, plan=cpu_plan()) as eng:
        yield eng


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path, engine: LlamaEngine) -> RecordingLlama:
    ref = RecordingLlama(model_path=str(tiny_gguf), verbose=False, **engine.llama_kwargs)
    yield ref
    ref.close()


def _assert_same_as_reference(engine: LlamaEngine, ref: RecordingLlama, messages: list[Message],
                              settings: SamplingSettings) -> None:
    ours = engine.generate(messages, settings)
    theirs = reference_reply(ref, messages, settings)
    assert engine.last_prompt_tokens == ref.seen_prompt
    expected = ref.seen_tokens[: len(engine.last_completion_tokens) + 1]
    got = engine.last_completion_tokens + ([engine.last_stop_token] if engine.last_stop_token is not None else [])
    assert got == expected[: len(got)] and len(got) == len(ref.seen_tokens)
    assert ours.text == engine.detokenize(engine.last_completion_tokens)
    # llama-cpp-python 0.3.36 detokenizes into a 32-byte buffer and drops longer pieces (e.g. '//-----...');
    # where no piece is that long its text must be ours exactly.
    if all(len(engine.piece(t)) <= 32 for t in engine.last_completion_tokens):
        assert ours.text == theirs
    assert ours.stats.completion_tokens == len(engine.last_completion_tokens)


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_greedy_tokens_equal_create_chat_completion(engine: LlamaEngine, reference: RecordingLlama,
                                                    conversation: int) -> None:
    _assert_same_as_reference(engine, reference, CONVERSATIONS[conversation], GREEDY)


@pytest.mark.parametrize("seed", [1, 7])
def test_seeded_sampling_equals_create_chat_completion(engine: LlamaEngine, reference: RecordingLlama,
                                                       seed: int) -> None:
    settings = SamplingSettings(temperature=0.9, top_p=0.9, max_tokens=24, seed=seed)
    _assert_same_as_reference(engine, reference, CONVERSATIONS[1], settings)


def test_prompt_is_the_gguf_template_with_one_bos(engine: LlamaEngine) -> None:
    tokens = engine.prompt_tokens(CONVERSATIONS[1])
    assert tokens[0] == engine.bos_id == 128000
    assert tokens.count(engine.bos_id) == 1
    text = "".join(engine.token_text(t) for t in tokens)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>ĊĊ")  # byte-level 'Ċ' is '\n'
    assert not engine.formatter.using_builtin


def test_llama31_stop_tokens(engine: LlamaEngine) -> None:
    assert {128001, 128008, 128009} <= engine.stop_ids


def test_repeat_generation_is_deterministic_with_kv_reuse(engine: LlamaEngine) -> None:
    first = engine.generate(CONVERSATIONS[0], GREEDY)
    tokens = list(engine.last_completion_tokens)
    second = engine.generate(CONVERSATIONS[0], GREEDY)
    assert engine.last_completion_tokens == tokens and second.text == first.text


def test_stream_pieces_concatenate_to_text(engine: LlamaEngine) -> None:
    pieces: list[str] = []
    result = engine.generate(CONVERSATIONS[2], GREEDY, on_text=pieces.append)
    assert "".join(pieces) == result.text and len(pieces) > 1
    assert result.stats.stop_reason in ("stop", "length")
    assert result.stats.tokens_per_second == pytest.approx(
        result.stats.completion_tokens / result.stats.generation_seconds)


def test_cancel_stops_between_tokens(engine: LlamaEngine) -> None:
    cancel = threading.Event()
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()

    result = engine.generate(CONVERSATIONS[0], SamplingSettings(temperature=0, max_tokens=200), on_text=on_text,
                             cancel=cancel)
    assert result.stats.stop_reason == "cancelled"
    assert 3 <= result.stats.completion_tokens <= 4
    assert result.text == "".join(pieces)


def test_cancel_before_start_aborts_prompt(engine: LlamaEngine) -> None:
    cancel = threading.Event()
    cancel.set()
    result = engine.generate(CONVERSATIONS[0], GREEDY, cancel=cancel)
    assert result.stats.stop_reason == "cancelled" and result.stats.completion_tokens == 0 and result.text == ""
    # and the engine still works afterwards
    assert engine.generate(CONVERSATIONS[0], SamplingSettings(temperature=0, max_tokens=3)).stats.completion_tokens == 3


def test_max_tokens_and_context_cap(engine: LlamaEngine) -> None:
    assert engine.generate(CONVERSATIONS[0], SamplingSettings(temperature=0, max_tokens=5)).stats.completion_tokens == 5
    long = [Message("user", "word " * 2000)]
    with pytest.raises(ContextOverflow, match=r"2\d\d\d tokens .* 1024"):
        engine.generate(long, GREEDY)


def test_fit_messages_drops_oldest_turns_then_oldest_text(engine: LlamaEngine) -> None:
    history = [Message("system", "Stay on topic."), Message("user", "alpha " * 600), Message("assistant", "ok"),
               Message("user", "beta " * 300 + "FINAL QUESTION")]
    fit = engine.fit_messages(history, reserve=256)
    assert fit.prompt_tokens <= engine.n_ctx - 256
    assert fit.messages[0].role == "system" and fit.messages[-1].content.endswith("FINAL QUESTION")
    assert fit.dropped_messages == 1 and fit.dropped_tokens == 0
    assert [m.content for m in fit.messages[1:-1]] == ["ok"]
    huge = [Message("user", "gamma " * 3000 + "THE END")]
    fit = engine.fit_messages(huge, reserve=100)
    assert fit.truncated and fit.dropped_tokens > 2000
    assert fit.prompt_tokens <= engine.n_ctx - 100 and fit.messages[0].content.endswith("THE END")


def test_load_progress_and_cancel(tiny_gguf: Path) -> None:
    seen: list[float] = []
    eng = load_engine(tiny_gguf, plan=cpu_plan(), progress=seen.append)
    eng.close()
    assert seen and seen[-1] == pytest.approx(1.0) and seen == sorted(seen)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        load_engine(tiny_gguf, plan=cpu_plan(), cancel=cancel)


def test_tensor_overrides_reach_llama_cpp(tiny_gguf: Path) -> None:
    plan = cpu_plan(tensor_overrides=((r"blk\.1\.ffn_(up|down|gate)\.weight", "CPU"),))
    with load_engine(tiny_gguf, plan=plan) as eng:
        overridden = [line for line in eng.load_log if "buffer type overridden" in line]
        assert len(overridden) == 3 and all("blk.1.ffn_" in line for line in overridden)
        assert eng.generate(CONVERSATIONS[0], SamplingSettings(temperature=0, max_tokens=4)).stats.completion_tokens == 4
    with pytest.raises(EngineError, match="CUDA7"):
        load_engine(tiny_gguf, plan=cpu_plan(tensor_overrides=((r"output\.weight", "CUDA7"),)))


def test_plan_that_does_not_fit_is_refused_unless_forced(tiny_gguf: Path) -> None:
    plan = cpu_plan(fits=False, advice=("use a smaller quant such as IQ2_XXS",), headline="needs 300 GiB")
    with pytest.raises(DoesNotFit, match="IQ2_XXS.*--force"):
        load_engine(tiny_gguf, plan=plan)
    with load_engine(tiny_gguf, EngineOptions(force=True), plan=plan) as eng:
        assert eng.n_ctx == 1024


def test_flags_override_plan_and_quantized_kv(tiny_gguf: Path) -> None:
    options = EngineOptions(n_ctx=512, n_threads=2, kv_type="q8_0")
    with load_engine(tiny_gguf, options, plan=cpu_plan()) as eng:
        assert eng.n_ctx == 512
        assert eng.settings.kv_type == "q8_0" and eng.settings.flash_attn is True
        assert eng.llama_kwargs["type_k"] == eng.llama_kwargs["type_v"] == int(T.Q8_0)
        assert eng.llama_kwargs["n_threads"] == eng.llama_kwargs["n_threads_batch"] == 2
        assert eng.plan.load.kv_type == "f16" and eng.plan.load.n_ctx == 1024  # the plan itself is unchanged
        assert any("q8_0" in line for line in eng.load_log if "KV" in line or "kv" in line)
        assert eng.generate(CONVERSATIONS[0], SamplingSettings(temperature=0, max_tokens=4)).stats.completion_tokens == 4


def test_invalid_gguf_is_rejected_before_llama_cpp(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(InvalidGGUF):
        load_engine(bad, plan=cpu_plan())


@pytest.fixture(scope="module")
def stop_at_once_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model that always predicts <|eom_id|> (Llama 3.1's end-of-message)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("eom") / "eom.gguf", dominant_token=128008, seed=3)


def test_eom_ends_the_reply_like_the_reference(stop_at_once_gguf: Path) -> None:
    with load_engine(stop_at_once_gguf, plan=cpu_plan()) as eng:
        result = eng.generate(CONVERSATIONS[1], GREEDY)
        assert result.stats.stop_reason == "stop" and result.text == "" and eng.last_stop_token == 128008
        ref = RecordingLlama(model_path=str(stop_at_once_gguf), verbose=False, **eng.llama_kwargs)
        try:
            assert reference_reply(ref, CONVERSATIONS[1], GREEDY) == "" and ref.seen_tokens == [128008]
        finally:
            ref.close()


@pytest.fixture(scope="module")
def injected_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    payload = "{{ cycler.__init__.__globals__.os.system('touch /tmp/corral-pwned') }}{% for m in messages %}x{% endfor %}"
    return write_tiny_gguf(tmp_path_factory.mktemp("evil") / "evil.gguf", chat_template=payload)


def test_template_injection_falls_back_to_builtin(injected_gguf: Path) -> None:
    marker = Path("/tmp/corral-pwned")
    marker.unlink(missing_ok=True)
    with load_engine(injected_gguf, plan=cpu_plan()) as eng:
        tokens = eng.prompt_tokens(CONVERSATIONS[1])
        assert not marker.exists()
        assert eng.formatter.using_builtin
        assert any("unsafe" in w and "built-in Llama 3" in w for w in eng.warnings)
        assert tokens == eng.tokenize(builtin_llama3_prompt(CONVERSATIONS[1]), parse_special=True)
        assert eng.generate(CONVERSATIONS[1], SamplingSettings(temperature=0, max_tokens=3)).stats.completion_tokens == 3


@pytest.mark.slow
def test_exact_on_the_converted_miniature(mini_gguf_bf16: Path) -> None:
    """The lead's converter output (real Llama 3.1 layout, BF16): still token-for-token."""
    with load_engine(mini_gguf_bf16, plan=cpu_plan()) as eng:
        ref = RecordingLlama(model_path=str(mini_gguf_bf16), verbose=False, **eng.llama_kwargs)
        try:
            _assert_same_as_reference(eng, ref, CONVERSATIONS[2], GREEDY)
        finally:
            ref.close()


def test_build_params_fills_llama_cpp_structs_from_load_settings() -> None:
    settings = LoadSettings(n_ctx=2048, n_gpu_layers=-1, n_batch=4096, n_ubatch=1024, n_threads=3, n_threads_batch=5,
                            kv_type="q4_0", flash_attn=True, use_mmap=False, use_mlock=True, use_extra_bufts=False,
                            tensor_split=(2.0, 1.0), main_gpu=1, split_mode="row",
                            tensor_overrides=((r"output\.weight", "CPU"),))
    params = build_params(settings)
    mp, cp = params.model, params.context
    assert mp.n_gpu_layers == 0x7FFFFFFF and mp.split_mode == lc.LLAMA_SPLIT_MODE_ROW and mp.main_gpu == 1
    assert list(mp.tensor_split[:2]) == [2.0, 1.0] and mp.tensor_buft_overrides
    assert mp.use_extra_bufts is False and mp.load_mode == lc.LLAMA_LOAD_MODE_MLOCK
    assert (cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch) == (2048, 2048, 1024, 3, 5)
    assert params.n_batch == 2048  # llama.cpp caps the batch at the context
    assert cp.flash_attn_type == lc.LLAMA_FLASH_ATTN_TYPE_ENABLED and cp.type_k == cp.type_v == int(T.Q4_0)

    plain = build_params(LoadSettings(n_ctx=0, n_gpu_layers=0, n_batch=512, n_ubatch=512, n_threads=1,
                                      n_threads_batch=1, flash_attn=False))
    mp, cp = plain.model, plain.context
    assert mp.n_gpu_layers == 0 and mp.split_mode == lc.LLAMA_SPLIT_MODE_LAYER and not mp.tensor_split
    assert not mp.tensor_buft_overrides and mp.use_extra_bufts is True and mp.load_mode == lc.LLAMA_LOAD_MODE_MMAP
    assert cp.n_ctx == 0 and cp.n_batch == plain.n_batch == 512  # n_ctx 0: the model's length, set at load
    assert cp.flash_attn_type == lc.LLAMA_FLASH_ATTN_TYPE_DISABLED and cp.type_k == cp.type_v == int(T.F16)
