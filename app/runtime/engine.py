"""The runtime: load a GGUF with the offload plan applied and stream chat replies through llama.cpp.

`load_engine` validates the file's header, asks the planner where everything goes, refuses a
model that will not fit (unless forced), fills llama.cpp's parameter structs from the plan
(including tensor buffer-type overrides, which the high-level `Llama` cannot take) and reports
load progress. `LlamaEngine.generate` formats the conversation with the model's own chat
template (sandboxed), decodes the prompt, then runs a tight sample/decode loop over
llama.cpp's C API: no per-token work beyond sampling, one piece of text for streaming and a
check of the cancel flag, so Ctrl-C stops between tokens. At temperature 0 the tokens are
exactly those of llama-cpp-python's `create_chat_completion` (same template, same sampler chain).
"""

from __future__ import annotations

import codecs
import ctypes
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from corral.app.runtime import state, stream_setup, streaming
from corral.app.runtime.api import (
    FitResult,
    Generation,
    GenerationStats,
    Message,
    SamplingSettings,
    StopReason,
)
from corral.app.runtime.chat_format import LLAMA3_STOP_TEXTS, ChatFormatter, TemplateRaised, drop_oldest_turns
from corral.app.runtime.draft import attach_draft, check_draft
from corral.app.runtime.loading import open_model
from corral.app.runtime.native import LOG, build_params, init_backend
from corral.app.runtime.native import lc as _lc
from corral.app.runtime.setup import (
    EngineOptions,
    apply_options,
    checked_on_this_cpu,
    does_not_fit_message,
    make_plan,
    resolve_model_path,
)
from corral.app.runtime.tools import PYTHON_TAG, ToolSet
from corral.app.runtime.vocab import Vocab
from corral.convert.errors import ContextOverflow, DoesNotFit, EngineError, UsageError
from corral.convert.gguf_file import GGUFModelFile, clear_header_cache, read_gguf
from corral.convert.llama_family import EOM_TEXT
from corral.offload.load_settings import LoadSettings
from corral.offload.plan import Plan

# llama-cpp-python's defaults for create_chat_completion's sampler chain (mirrored so seeded runs match too).
TOP_K = 40
MIN_P = 0.05
_RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp picks a random seed


def load_engine(
    model_path: str | Path,
    options: EngineOptions | None = None,
    *,
    progress: Callable[[float], None] | None = None,
    cancel: threading.Event | None = None,
    plan: Plan | None = None,
    model_file: GGUFModelFile | None = None,
    eval_callback: Callable[[int, bool, Any], bool] | None = None,
) -> LlamaEngine:
    """Load a GGUF with the plan (made here when None) and the user's flags applied; `progress` gets 0..1;
    setting `cancel` aborts the load (Cancelled); a plan that does not fit is refused unless forced.
    `eval_callback(tensor_address, ask, user_data)` becomes llama.cpp's `cb_eval`, beside the streamer's own."""
    options = options or EngineOptions()
    path = resolve_model_path(model_path)
    if model_file is None:
        model_file = read_gguf(path)
    draft = check_draft(model_file, options.draft) if options.draft else None
    if plan is None:
        plan = make_plan(path, options, model_file)
    if not plan.fits and not options.force:
        raise DoesNotFit(does_not_fit_message(plan), path=path)
    settings, cpu_note = checked_on_this_cpu(plan, apply_options(plan.load, options), model_file, path)
    init_backend()
    LOG.install()
    LOG.verbose = options.verbose
    native = build_params(settings)
    streamer = stream_setup.for_plan(plan, model_file, settings)  # weights beyond RAM stream ahead of compute
    c_eval = _eval_callback(streamer, eval_callback)
    if c_eval is not None:
        native.context.cb_eval = c_eval

    model, ctx, load_log = open_model(path, native, progress=progress, cancel=cancel)
    # the engine owns model and context from here on (it frees them itself if its setup fails)
    engine = LlamaEngine(path, model, ctx, native.n_batch, plan=plan, model_file=model_file, settings=settings,
                         load_log=load_log)
    engine.warnings.extend((*plan.warnings, *([cpu_note] if cpu_note else [])))
    engine.streamer = streamer
    engine._eval_callback = c_eval  # llama.cpp calls it for as long as the context lives
    if draft is not None:
        attach_draft(engine, options, *draft, cancel=cancel)
    del draft, model_file
    clear_header_cache()
    if streamer is not None:  # after the draft: the streamer sizes its resident set by what is allocated now
        try:
            streamer.start()
        except BaseException:
            engine.close()
            raise
    if settings.rpc_servers:
        from corral.app.runtime import rpc

        engine.watchdog = rpc.watch_engine(engine)  # a worker that hangs ends the process with one line
    return engine


def _eval_callback(streamer: streaming.Streamer | None,
                   extra: Callable[[int, bool, Any], bool] | None) -> Any:
    """llama.cpp's cb_eval: the streamer's, the caller's, or both chained (a node is asked for when either
    wants it; both see every computed node that was asked for and check it is theirs)."""
    if extra is None:
        return streamer.callback if streamer is not None else None
    if streamer is None:
        return _lc.ggml_backend_sched_eval_callback(extra)
    own = streamer.callback

    def both(tensor: int, ask: bool, user: Any) -> bool:
        first, second = bool(own(tensor, ask, user)), bool(extra(tensor, ask, user))
        return (first or second) if ask else (first and second)

    return _lc.ggml_backend_sched_eval_callback(both)


class LlamaEngine:
    """A loaded llama.cpp model and context implementing `ChatEngine`."""

    def __init__(self, path: Path, model: Any, ctx: Any, n_batch: int, *, plan: Plan, model_file: GGUFModelFile,
                 settings: LoadSettings, load_log: Sequence[str] = ()) -> None:
        self._model = model
        self._ctx = ctx
        self._lock = threading.Lock()
        try:
            self._setup(path, n_batch, plan, model_file, settings, load_log)
        except BaseException:
            self.close()
            raise

    def _setup(self, path: Path, n_batch: int, plan: Plan, model_file: GGUFModelFile, settings: LoadSettings,
               load_log: Sequence[str]) -> None:
        model, ctx = self._model, self._ctx
        self.path = path
        self.plan: Plan | None = plan
        self.settings = settings  # the plan's load settings with the user's flags applied
        self.load_log = list(load_log)
        self.warnings: list[str] = []
        self._vocab = _lc.llama_model_get_vocab(model)
        self.vocab = Vocab(self._vocab)
        self.token_text, self.tokenize = self.vocab.token_text, self.vocab.tokenize
        self.piece, self.detokenize = self.vocab.piece, self.vocab.detokenize
        self._n_batch = n_batch
        self._cached: list[int] = []  # tokens whose keys/values are in the KV cache
        self._files, self._data_offset = model_file.files, model_file.headers[0].data_offset
        self._state_key: state.StateKey | None = None
        self.n_ctx = int(_lc.llama_n_ctx(ctx))
        self.n_ctx_train = int(_lc.llama_model_n_ctx_train(model))
        self.model_name = str(model_file.get("general.name") or path.stem)
        self.bos_id = int(_lc.llama_vocab_bos(self._vocab))
        self.eos_id = int(_lc.llama_vocab_eos(self._vocab))
        self._add_bos = bool(_lc.llama_vocab_get_add_bos(self._vocab))
        self._bos_text = self.token_text(self.bos_id) if self.bos_id >= 0 else ""
        eos_text = self.token_text(self.eos_id) if self.eos_id >= 0 else ""
        self.formatter = ChatFormatter(model_file.get("tokenizer.chat_template"), bos_token=self._bos_text,
                                       eos_token=eos_text, warnings=self.warnings)
        # Render a sample conversation now so a template that fails at render time warns at load, not mid-chat.
        try:
            self.formatter.format([Message("system", "s"), Message("user", "u"), Message("assistant", "a"),
                                   Message("user", "u")])
        except TemplateRaised:
            pass  # the template validates conversations itself; real ones will be checked when sent
        self.stop_ids = self.vocab.stop_ids(self.eos_id, LLAMA3_STOP_TEXTS)
        self.eom_id = self.vocab.special_id(EOM_TEXT)  # ends a message that expects a tool's result
        self.python_tag_id = self.vocab.special_id(PYTHON_TAG)  # starts a tool call; kept in the text when tools are on
        self.last_prompt_tokens: list[int] = []
        self.last_cached_tokens = 0
        self.last_completion_tokens: list[int] = []
        self.last_stop_token: int | None = None
        self.speculator: Any = None  # a `speculative.Speculator` when a draft model is attached
        self.streamer: streaming.Streamer | None = None  # set by load_engine when weights stream from disk
        self._eval_callback: Any = None  # llama.cpp's cb_eval, kept alive with the context (set by load_engine)
        self.watchdog: Any = None  # an rpc.Watchdog when layers live on RPC workers

    @property
    def llama_kwargs(self) -> dict[str, Any]:
        """The settings this engine was loaded with, as llama-cpp-python's `Llama(**kwargs)` takes them."""
        return self.settings.llama_kwargs

    # -- saved KV state (resuming conversations) -------------------------------------------------
    def state_key(self) -> state.StateKey:
        if self._state_key is None:
            self._state_key = state.key_for(self._files, self._data_offset, self.n_ctx, self.settings.kv_type,
                                            self.settings.flash_attn)
        return self._state_key

    def export_state(self) -> tuple[list[int], bytes]:
        with self._lock:
            return list(self._cached), state.capture(_lc, self._ctx) if self._cached else b""

    def import_state(self, tokens: Sequence[int], data: bytes) -> bool:
        with self._lock:
            ok = 0 < len(tokens) < self.n_ctx and state.restore(_lc, self._ctx, data)
            self._cached = list(tokens) if ok else []
            return ok

    def prompt_tokens(self, messages: Sequence[Message], tools: ToolSet | None = None) -> list[int]:
        """The formatted conversation as tokens: template text, BOS exactly once."""
        text = self.formatter.format(messages, tools)
        add_bos = self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        tokens = self.tokenize(text, add_special=add_bos, parse_special=True)
        while len(tokens) >= 2 and tokens[0] == tokens[1] == self.bos_id:
            del tokens[0]
        return tokens

    def count_prompt_tokens(self, messages: Sequence[Message], tools: ToolSet | None = None) -> int:
        return len(self.prompt_tokens(messages, tools))

    def count_text_tokens(self, text: str) -> int:
        """Tokens of a raw completion prompt (BOS added as the model asks)."""
        return len(self.tokenize(text, add_special=self._add_bos, parse_special=True))

    def fit_messages(self, messages: Sequence[Message], reserve: int) -> FitResult:
        """Drop the oldest turns, then the oldest text of the last one, until the prompt leaves `reserve` tokens."""
        limit = self.n_ctx - max(1, reserve)
        kept, dropped = drop_oldest_turns(messages, lambda ms: self.count_prompt_tokens(ms) <= limit)
        count = self.count_prompt_tokens(kept)
        cut_tokens = 0
        for _ in range(4):
            if count <= limit:
                break
            i = next((i for i in reversed(range(len(kept))) if kept[i].role != "system"), None)
            if i is None:
                break
            body = self.tokenize(kept[i].content, parse_special=False)
            excess = count - limit + 2
            if excess >= len(body):
                break
            kept[i] = replace(kept[i], content=self.detokenize(body[excess:]))
            cut_tokens += excess
            count = self.count_prompt_tokens(kept)
        if count > limit:
            raise ContextOverflow(f"even after dropping older text the prompt is {count} tokens; the context "
                                  f"window of {self.n_ctx} tokens leaves {limit} for it")
        return FitResult(kept, count, dropped, cut_tokens)

    # -- generation ---------------------------------------------------------------------------
    def _sampler(self, settings: SamplingSettings) -> Any:
        chain = _lc.llama_sampler_chain_init(_lc.llama_sampler_chain_default_params())
        if settings.temperature <= 0:
            _lc.llama_sampler_chain_add(chain, _lc.llama_sampler_init_greedy())
            return chain
        seed = _RANDOM_SEED if settings.seed is None else settings.seed & 0xFFFFFFFF
        for sampler in (_lc.llama_sampler_init_top_k(TOP_K), _lc.llama_sampler_init_top_p(settings.top_p, 1),
                        _lc.llama_sampler_init_min_p(MIN_P, 1), _lc.llama_sampler_init_temp(settings.temperature),
                        _lc.llama_sampler_init_dist(seed)):
            _lc.llama_sampler_chain_add(chain, sampler)
        return chain

    def _reuse_prefix(self, prompt: Sequence[int]) -> int:
        """Keep the cached KV of the longest common prefix (at least one prompt token is always decoded)."""
        same = 0
        for a, b in zip(self._cached, prompt):
            if a != b:
                break
            same += 1
        same = min(same, len(prompt) - 1)
        mem = _lc.llama_get_memory(self._ctx)
        if same > 0 and _lc.llama_memory_seq_rm(mem, -1, same, -1):
            del self._cached[same:]
            return same
        _lc.llama_memory_clear(mem, True)
        self._cached = []
        return 0

    def generate(self, messages: Sequence[Message], settings: SamplingSettings, *,
                 on_text: Callable[[str], None] | None = None, cancel: threading.Event | None = None,
                 tools: ToolSet | None = None) -> Generation:
        """Stream the assistant's reply to `messages`; stops at an end-of-turn token, max_tokens, or `cancel`.

        With `tools` offered, `<|python_tag|>` stays in the text (it marks a call) and a reply that ends
        with `<|eom_id|>` stops with reason "tool_call"."""
        keep = frozenset({self.python_tag_id}) if tools is not None and tools.active else frozenset()
        with self._lock:
            self._check_open()
            return self._generate(self.prompt_tokens(messages, tools), settings, on_text, cancel, keep)

    def complete(self, prompt: str, settings: SamplingSettings, *, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> Generation:
        """Continue raw text (no chat template; BOS added as the model asks)."""
        with self._lock:
            self._check_open()
            tokens = self.tokenize(prompt, add_special=self._add_bos, parse_special=True)
            return self._generate(tokens, settings, on_text, cancel)

    def _check_open(self) -> None:
        """A closed engine's model and vocabulary are freed: refuse before anything touches them."""
        if self._ctx is None:
            raise EngineError("the model has been closed")
        if self.speculator is not None and not self.speculator.released and self.speculator.draft._ctx is None:
            raise EngineError("the draft model has been closed")

    def _generate(self, prompt: list[int], settings: SamplingSettings, on_text: Callable[[str], None] | None,
                  cancel: threading.Event | None, keep: frozenset[int] = frozenset()) -> Generation:
        self._check_open()
        n_prompt = len(prompt)
        if n_prompt == 0:
            raise UsageError("the prompt is empty")
        if n_prompt >= self.n_ctx:
            raise ContextOverflow(f"the prompt is {n_prompt} tokens but the context window holds {self.n_ctx}")
        max_new = settings.max_new_tokens(self.n_ctx - n_prompt)
        self.last_prompt_tokens, self.last_completion_tokens, self.last_stop_token = prompt, [], None

        t0 = time.perf_counter()
        aborted = self._decode_prompt(prompt, cancel)
        t1 = time.perf_counter()
        if aborted:
            return Generation("", GenerationStats(n_prompt, 0, t1 - t0, 0.0, "cancelled"))
        if self.speculator is not None and not self.speculator.released:
            return self.speculator.run(prompt, settings, on_text, cancel, keep, t0, t1)

        chain = self._sampler(settings)
        tools_on = bool(keep)
        ctx, vocab, stops = self._ctx, self._vocab, self.stop_ids
        sample, decode, is_eog = _lc.llama_sampler_sample, _lc.llama_decode, _lc.llama_vocab_is_eog
        piece, decoder = self.piece, codecs.getincrementaldecoder("utf-8")(errors="ignore")
        one = (_lc.llama_token * 1)()
        batch = _lc.llama_batch_get_one(one, 1)
        out: list[int] = self.last_completion_tokens
        parts: list[str] = []
        reason: StopReason = "length"
        try:
            while True:
                token = sample(chain, ctx, -1)
                if token in stops or is_eog(vocab, token):
                    self.last_stop_token = token
                    reason = "tool_call" if tools_on and token == self.eom_id else "stop"
                    break
                out.append(token)
                text = decoder.decode(piece(token, special=token in keep))
                if text:
                    parts.append(text)
                    if on_text is not None:
                        on_text(text)
                if len(out) >= max_new:
                    break
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                one[0] = token
                rc = decode(ctx, batch)
                if rc != 0:
                    self._cached = []
                    raise EngineError(f"llama.cpp failed to decode a token (code {rc})")
                self._cached.append(token)
        finally:
            _lc.llama_sampler_free(chain)
        tail = decoder.decode(b"", final=True)
        if tail:
            parts.append(tail)
            if on_text is not None:
                on_text(tail)
        t2 = time.perf_counter()
        stats = GenerationStats(n_prompt, len(out), t1 - t0, t2 - t1, reason)
        return Generation("".join(parts), stats)

    def _decode_prompt(self, prompt: list[int], cancel: threading.Event | None) -> bool:
        """Decode the prompt (reusing the cached prefix) in n_batch chunks; True if cancelled."""
        start = self._reuse_prefix(prompt)
        self.last_cached_tokens = start  # prompt tokens whose KV was already there (or restored)
        todo = prompt[start:]
        arr = (_lc.llama_token * len(todo))(*todo)
        abort_cb = None
        if cancel is not None:
            abort_cb = _lc.ggml_abort_callback(lambda _data: cancel.is_set())
            _lc.llama_set_abort_callback(self._ctx, abort_cb, None)
        try:
            for i in range(0, len(todo), self._n_batch):
                if cancel is not None and cancel.is_set():
                    return True
                n = min(self._n_batch, len(todo) - i)
                ptr = ctypes.cast(ctypes.byref(arr, i * ctypes.sizeof(_lc.llama_token)), ctypes.POINTER(_lc.llama_token))
                rc = _lc.llama_decode(self._ctx, _lc.llama_batch_get_one(ptr, n))
                if rc != 0:
                    self._reuse_prefix([])  # the KV cache state is unknown now: clear it
                    if cancel is not None and cancel.is_set():
                        return True
                    raise EngineError(f"llama.cpp failed to decode the prompt (code {rc}): "
                                      f"{LOG.last_error() or 'out of memory or context full?'}")
                self._cached.extend(todo[i:i + n])
        finally:
            if abort_cb is not None:
                _lc.llama_set_abort_callback(self._ctx, _lc.ggml_abort_callback(), None)
        return False

    def close(self) -> None:
        """Free the context and the model."""
        if self.__dict__.get("watchdog") is not None:
            self.watchdog.stop()
            self.watchdog = None
        with self._lock:
            if self.__dict__.get("speculator") is not None:
                self.speculator.close()
                self.speculator = None
            if self._ctx is not None:
                _lc.llama_free(self._ctx)
                self._ctx = None
            if self._model is not None:
                _lc.llama_model_free(self._model)
                self._model = None
            if self.__dict__.get("streamer") is not None:
                self.streamer.close()
                self.streamer = None

    def __enter__(self) -> LlamaEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


__all__ = ["EngineOptions", "FitResult", "LlamaEngine", "apply_options", "load_engine", "make_plan",
           "resolve_model_path"]
