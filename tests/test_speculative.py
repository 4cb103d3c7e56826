"""Speculative decoding on real tiny GGUFs: greedy identity, exact KV caches, the sampling rule, adaptivity,
the compatibility check, and the CLI's --draft."""

from __future__ import annotations

import ctypes
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from corral.app.cli.main import cli
from corral.app.runtime import engine as engine_mod
from corral.app.runtime.api import Message, SamplingSettings
from corral.app.runtime.draft import check_draft, incompatibility
from corral.app.runtime.engine import EngineOptions, LlamaEngine, load_engine
from corral.app.runtime.native import lc
from corral.app.runtime.spec_sampling import (
    MIN_P,
    TOP_K,
    Distribution,
    chain_distribution,
    greedy_choice,
    verify,
    verify_greedy,
)
from corral.app.runtime.speculative import Speculator
from corral.convert.errors import EngineError, UsageError
from corral.convert.gguf_file import read_gguf
from corral.convert.units import GiB
from corral.offload.api import PlanOptions, plan_model
from corral.offload.hardware import GPU
from corral.offload.speculation import estimate, reserve, tokens_per_pass
from tests.helpers.engine import cpu_plan, write_tiny_gguf
from tests.helpers.plans import CPU_MACHINE, make_plan
from tests.helpers.speculative import GREEDY, PROMPTS, spec_models
from tests.helpers.speculative import run_greedy as _run


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return spec_models(tmp_path_factory.mktemp("spec"))


@pytest.fixture(scope="module")
def target(models: dict[str, Path]) -> Iterator[LlamaEngine]:
    with load_engine(models["target"], plan=cpu_plan()) as eng:
        yield eng


def _attach(target: LlamaEngine, draft_path: Path, draft_max: int = 8, adaptive: bool = True) -> Speculator:
    draft = load_engine(draft_path, plan=cpu_plan())
    target.speculator = Speculator(target, draft, draft_max, adaptive=adaptive)
    return target.speculator


def _detach(target: LlamaEngine) -> None:
    target.speculator.close()
    target.speculator = None


def _cache_consistent(target: LlamaEngine, spec: Speculator) -> None:
    sequence = target.last_prompt_tokens + target.last_completion_tokens
    assert target._cached == sequence[:len(target._cached)]
    assert len(target._cached) >= len(sequence) - 1
    assert spec.draft._cached == sequence[:len(spec.draft._cached)]
    mem = lc.llama_get_memory(target._ctx)
    assert lc.llama_memory_seq_pos_max(mem, 0) == len(target._cached) - 1
    assert lc.llama_memory_seq_pos_max(lc.llama_get_memory(spec.draft._ctx), 0) == len(spec.draft._cached) - 1


@pytest.mark.parametrize("which, adaptive", [("draft", False), ("other", False), ("other", True)])
def test_greedy_is_token_for_token_the_targets(target: LlamaEngine, models: dict[str, Path], which: str,
                                               adaptive: bool) -> None:
    plain = {p: _run(target, [Message("user", p)], GREEDY)[0] for p in PROMPTS}
    spec = _attach(target, models[which], adaptive=adaptive)
    try:
        drafted = accepted = 0
        for p in PROMPTS:
            tokens, result = _run(target, [Message("user", p)], GREEDY)
            assert tokens == plain[p]
            _cache_consistent(target, spec)
            drafted += result.stats.drafted_tokens
            accepted += result.stats.accepted_tokens
        assert drafted > 0
        rate = accepted / drafted
        if which == "draft":
            assert rate >= 0.95, rate
        else:
            assert rate <= 0.1, rate
    finally:
        _detach(target)


def test_kv_left_by_drafting_is_the_real_one(target: LlamaEngine, models: dict[str, Path]) -> None:
    """A second turn reuses the KV prefix that speculative decoding left: same tokens as a fresh engine."""
    first = target.prompt_tokens([Message("user", PROMPTS[0])])
    follow = target.tokenize(" And then?", parse_special=False)
    spec = _attach(target, models["other"], draft_max=4, adaptive=False)
    try:
        target._generate(first, GREEDY, None, None)
        second = first + target.last_completion_tokens + follow
        target._generate(second, GREEDY, None, None)
        tokens = list(target.last_completion_tokens)
        assert target.last_cached_tokens >= len(second) - len(follow) - 1
        _cache_consistent(target, spec)
    finally:
        _detach(target)
    with load_engine(models["target"], plan=cpu_plan()) as fresh:
        fresh._generate(second, GREEDY, None, None)
        assert fresh.last_completion_tokens == tokens


def test_stop_and_length_and_max_tokens(target: LlamaEngine, models: dict[str, Path]) -> None:
    spec = _attach(target, models["draft"], adaptive=False)
    try:
        for n in (1, 2, 5, 9):
            tokens, result = _run(target, [Message("user", "count")], replace(GREEDY, max_tokens=n))
            assert len(tokens) == result.stats.completion_tokens <= n
            _cache_consistent(target, spec)
    finally:
        _detach(target)


def test_sampling_with_a_draft_runs_and_keeps_caches_exact(target: LlamaEngine, models: dict[str, Path]) -> None:
    spec = _attach(target, models["draft"], adaptive=False)
    try:
        for seed in range(3):
            settings = SamplingSettings(temperature=0.8, top_p=0.95, max_tokens=40, seed=seed)
            tokens, result = _run(target, [Message("user", PROMPTS[1])], settings)
            assert result.stats.completion_tokens == len(tokens)
            assert result.stats.drafted_tokens >= result.stats.accepted_tokens > 0
            _cache_consistent(target, spec)
        again = [_run(target, [Message("user", "hi")], replace(settings, seed=5))[0] for _ in range(2)]
        assert again[0] == again[1]  # seeded: reproducible
    finally:
        _detach(target)


def test_a_useless_draft_is_switched_off(target: LlamaEngine, models: dict[str, Path]) -> None:
    spec = _attach(target, models["other"])
    try:
        _, result = _run(target, [Message("user", PROMPTS[0])], replace(GREEDY, max_tokens=200))
        assert result.stats.completion_tokens > 100
        assert result.stats.drafted_tokens < result.stats.completion_tokens / 3
        assert spec.k == 1
    finally:
        _detach(target)


# -- the distribution: llama.cpp's chain in numpy, and the speculative rule ----------------------------------
def _llama_chain_probs(logits: np.ndarray, temperature: float, top_p: float) -> dict[int, float]:
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    for s in (lc.llama_sampler_init_top_k(TOP_K), lc.llama_sampler_init_top_p(top_p, 1),
              lc.llama_sampler_init_min_p(MIN_P, 1), lc.llama_sampler_init_temp(temperature)):
        lc.llama_sampler_chain_add(chain, s)
    data = (lc.llama_token_data * logits.size)()
    for i, v in enumerate(logits):
        data[i].id, data[i].logit, data[i].p = i, float(v), 0.0
    arr = lc.llama_token_data_array(data=ctypes.cast(data, ctypes.POINTER(lc.llama_token_data)), size=logits.size,
                                    selected=-1, sorted=False)
    lc.llama_sampler_apply(chain, ctypes.byref(arr))
    lc.llama_sampler_free(chain)
    ids = [arr.data[i].id for i in range(arr.size)]
    vals = np.array([arr.data[i].logit for i in range(arr.size)], dtype=np.float64)
    probs = np.exp(vals - vals.max())
    return dict(zip(ids, probs / probs.sum()))


@pytest.mark.parametrize("temperature, top_p, scale", [(0.7, 0.95, 3.0), (1.0, 1.0, 1.0), (0.3, 0.5, 5.0),
                                                        (1.5, 0.9, 2.0)])
def test_numpy_chain_is_llama_cpps(temperature: float, top_p: float, scale: float) -> None:
    rng = np.random.default_rng(int(temperature * 10 + top_p * 100))
    for _ in range(5):
        logits = (rng.standard_normal(3000) * scale).astype(np.float32)
        ours = chain_distribution(logits, temperature, top_p)
        theirs = _llama_chain_probs(logits, temperature, top_p)
        assert sorted(int(t) for t in ours.ids) == sorted(theirs)
        for t, p in zip(ours.ids, ours.probs):
            assert p == pytest.approx(theirs[int(t)], rel=1e-4, abs=1e-7)


def _chi_square_ok(counts: Counter[int], p: Distribution, n: int) -> bool:
    """Pearson's chi-square of `counts` against `p` is below the 1e-4 tail (Wilson-Hilferty), no stray tokens;
    tokens expected fewer than 5 times are pooled."""
    expected = {int(t): float(q) * n for t, q in zip(p.ids, p.probs)}
    if set(counts) - set(expected):
        return False
    small = {t for t, e in expected.items() if e < 5}
    cells = [(counts.get(t, 0), e) for t, e in expected.items() if t not in small]
    if small:
        cells.append((sum(counts.get(t, 0) for t in small), sum(expected[t] for t in small)))
    stat = sum((c - e) ** 2 / e for c, e in cells)
    df = max(len(cells) - 1, 1)
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return z < 3.72


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_rule_keeps_the_targets_distribution(k: int) -> None:
    """With the draft sampling from q, the first token the rule produces follows p (top-k: a small vocabulary)."""
    rng = np.random.default_rng(k)
    base = rng.standard_normal(500).astype(np.float32) * 2
    ps = [chain_distribution(base + rng.standard_normal(500).astype(np.float32), 0.8, 0.95) for _ in range(k + 1)]
    qs = [chain_distribution(base + rng.standard_normal(500).astype(np.float32) * 1.5, 0.8, 0.95)
          for _ in range(k)]
    n = 15000
    first: Counter[int] = Counter()
    accepted = 0
    for _ in range(n):
        drafted = [q.sample(rng) for q in qs]
        kept, nxt = verify(drafted, qs, ps, rng)
        accepted += kept
        first[drafted[0] if kept else nxt] += 1
    assert _chi_square_ok(first, ps[0], n)
    assert 0 < accepted < n * k  # the draft differs from the target: some accepted, some not


def test_a_draft_equal_to_the_target_is_always_accepted() -> None:
    rng = np.random.default_rng(0)
    p = chain_distribution(rng.standard_normal(200).astype(np.float32), 1.0, 0.95)
    assert all(verify([p.sample(rng)] * 1, [p], [p, p], rng)[0] == 1 for _ in range(200))


def test_speculative_samples_follow_the_target_end_to_end(target: LlamaEngine, models: dict[str, Path]) -> None:
    """The second generated token (the first the draft proposes) has the target's distribution given the first."""
    messages = [Message("user", "hi")]
    settings = SamplingSettings(temperature=0.1, top_p=1.0, max_tokens=3)  # token 2 is drafted, 3 follows
    prompt = target.prompt_tokens(messages)
    _attach(target, models["other"], draft_max=1, adaptive=False)
    n = 600
    pairs = []
    try:
        for seed in range(n):
            tokens, _ = _run(target, messages, replace(settings, seed=seed))
            if len(tokens) >= 2:
                pairs.append((tokens[0], tokens[1]))
    finally:
        _detach(target)
    first, _ = Counter(a for a, _ in pairs).most_common(1)[0]
    seconds = Counter(b for a, b in pairs if a == first)
    target._reuse_prefix([])
    target._decode_prompt(prompt + [first], None)
    logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(target._ctx, -1), shape=(lc.llama_vocab_n_tokens(
        target._vocab),)).copy()
    p = chain_distribution(logits, 0.1, 1.0)
    assert sum(seconds.values()) >= 100
    assert _chi_square_ok(seconds, p, sum(seconds.values()))


# -- compatibility and the CLI -------------------------------------------------------------------------------
def test_incompatible_drafts_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    t = read_gguf(models["target"])
    assert incompatibility(t, read_gguf(models["draft"])) is None
    tokens = list(t.get("tokenizer.ggml.tokens"))
    cases = {
        "vocabulary": {"tokenizer.ggml.tokens": tokens[:-5]},
        "pre-tokenizer": {"tokenizer.ggml.pre": "default"},
        "EOS": {"tokenizer.ggml.eos_token_id": 128001},
        "token 5": {"tokenizer.ggml.tokens": tokens[:5] + ["zz"] + tokens[6:]},
    }
    for what, change in cases.items():
        why = incompatibility(t, replace(t, metadata={**t.metadata, **change}))
        assert why is not None and what in why and "\n" not in why


def test_load_refuses_an_incompatible_draft_before_loading(models: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bad = write_tiny_gguf(tmp_path / "bad.gguf", seed=1)
    meta = read_gguf(bad)
    monkeypatch.setattr("corral.app.runtime.draft.incompatibility",
                        lambda a, b: "its vocabulary has 32,000 tokens, the target's 128,256" if b is meta else None)
    monkeypatch.setattr(engine_mod, "build_params", lambda *a: pytest.fail("loaded before checking"))
    with pytest.raises(UsageError, match="cannot draft for this model: its vocabulary"):
        load_engine(models["target"], EngineOptions(draft=str(bad)), plan=cpu_plan())
    assert check_draft(read_gguf(models["target"]), models["draft"])[0] == models["draft"]


def test_load_engine_attaches_and_close_frees_the_draft(models: dict[str, Path]) -> None:
    eng = load_engine(models["target"], EngineOptions(draft=str(models["draft"]), draft_max=3), plan=cpu_plan())
    spec = eng.speculator
    assert isinstance(spec, Speculator) and spec.draft_max == 3 and spec.draft.n_ctx <= eng.n_ctx
    eng.close()
    assert spec.draft._ctx is None and eng.speculator is None


def test_closed_engines_refuse_instead_of_crashing(models: dict[str, Path]) -> None:
    eng = load_engine(models["target"], plan=cpu_plan())
    spec = _attach(eng, models["draft"])
    spec.draft.close()  # a draft closed behind the target's back (its model and vocabulary are freed)
    for call in (lambda: eng.generate([Message("user", "hi")], GREEDY), lambda: eng.complete("hi", GREEDY)):
        with pytest.raises(EngineError, match="draft model has been closed"):
            call()
    eng.speculator = None
    eng.close()
    with pytest.raises(EngineError, match="model has been closed"):
        eng.complete("hi", GREEDY)


def test_ask_json_reports_the_draft(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "make_plan", lambda *a, **k: cpu_plan())
    monkeypatch.setattr("corral.app.runtime.setup.make_plan", lambda *a, **k: cpu_plan(), raising=False)
    result = CliRunner().invoke(cli, ["ask", "-m", str(models["target"]), "--draft", str(models["draft"]),
                                      "--draft-max", "4", "--temperature", "0", "--max-tokens", "24", "--json", "hi"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["drafted_tokens"] >= data["accepted_tokens"] > 0
    assert data["acceptance_rate"] == pytest.approx(data["accepted_tokens"] / data["drafted_tokens"], abs=1e-3)
    assert data["draft_model"]


# -- the plan ------------------------------------------------------------------------------------------------
def test_tokens_per_pass_formula() -> None:
    assert tokens_per_pass(0.0, 5) == 1.0
    assert tokens_per_pass(1.0, 5) == 6.0
    assert tokens_per_pass(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert tokens_per_pass(0.8, 8) == pytest.approx(sum(0.8 ** i for i in range(9)))


def test_speedup_estimate() -> None:
    fast = estimate(target_tps=2.0, draft_tps=100.0, acceptance=0.8, draft_max=8)
    assert fast.pays and 1 <= fast.k <= 8 and fast.speedup > 2.5
    assert fast.tokens_per_second == pytest.approx(fast.tokens_per_pass / (fast.k / 100.0 + 0.5))
    useless = estimate(target_tps=50.0, draft_tps=60.0, acceptance=0.1, draft_max=8)
    assert not useless.pays and useless.speedup == 1.0 and useless.tokens_per_second == 50.0


def test_plan_places_the_draft_first(models: dict[str, Path]) -> None:
    options = PlanOptions(n_ctx=1024, n_threads=1, n_gpu_layers=0, flash_attn=False)
    alone = plan_model(models["target"], options, CPU_MACHINE)
    both = plan_model(models["target"], replace(options, draft=str(models["draft"])), CPU_MACHINE)
    assert both.draft is not None and both.draft.n_ctx == 1024
    draft_cpu = both.draft.device("CPU")
    assert draft_cpu is not None and draft_cpu.total_bytes > 0
    assert both.device("CPU").capacity_bytes == alone.device("CPU").capacity_bytes - draft_cpu.total_bytes
    data = both.to_json()
    assert data["draft"]["model"] == both.draft.model and data["speculative"]["acceptance"] == 0.7
    assert "draft" not in alone.to_json()
    result = CliRunner().invoke(cli, ["plan", str(models["target"]), "--draft", str(models["draft"]), "--ctx", "1024",
                                      "--cpu-only", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["draft"]["devices"]


def test_the_draft_gets_the_gpu_first() -> None:
    gpu = GPU(0, "test GPU", 24 * GiB, 20 * GiB, 900e9, True)
    hw = replace(CPU_MACHINE, gpus=(gpu,))
    draft = make_plan(hardware=hw, options=PlanOptions(n_ctx=1024, flash_attn=False))
    on_gpu = draft.device("GPU0")
    assert on_gpu is not None and on_gpu.total_bytes > 0
    left = reserve(hw, draft)
    assert left.gpus[0].free_bytes == gpu.free_bytes - on_gpu.total_bytes
    assert left.ram_available == hw.ram_available - draft.device("CPU").total_bytes


def test_memory_view_and_status_bar_show_the_draft() -> None:
    from rich.console import Console

    from corral.app.runtime.api import GenerationStats
    from corral.offload.speculation import with_draft
    from corral.tui.memory_view import LiveUsage, render_memory
    from corral.tui.status_bar import StatusBar

    plan = with_draft(make_plan(), replace(make_plan(), model="Draft 1B"), 0.7, 8)
    console = Console(width=160, record=True)
    console.print(render_memory(plan, LiveUsage(1 * GiB)))
    text = console.export_text()
    assert "draft CPU" in text and "Draft 1B" in text
    bar = StatusBar()
    bar.show_stats(GenerationStats(10, 20, 0.1, 1.0, "stop", drafted_tokens=16, accepted_tokens=12))
    assert "draft 12/16 (75%)" in bar.line()
    bar.show_stats(GenerationStats(10, 20, 0.1, 1.0, "stop"))
    assert "draft" not in bar.line()


def test_chat_refuses_an_incompatible_draft_before_the_ui(models: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("corral.app.runtime.draft.incompatibility", lambda a, b: "its EOS token is 'x' (id 1)")
    result = CliRunner().invoke(cli, ["chat", "-m", str(models["target"]), "--draft", str(models["other"]), "--new"])
    assert result.exit_code == 2, result.output
    assert "cannot draft for this model: its EOS token" in result.output


def test_greedy_near_ties_are_decided_by_a_one_token_pass(target: LlamaEngine, models: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    logits = np.array([1.0, 3.0, 2.995, -1.0], dtype=np.float32)
    assert greedy_choice(logits, 0.02) == (1, False) and greedy_choice(logits, 0.001) == (1, True)
    assert logits[1] == 3.0  # left as it was
    sure = [(5, True), (6, True), (7, True)]
    assert verify_greedy([5, 6], sure) == (2, 7)
    assert verify_greedy([5, 9], sure) == (1, 6)
    assert verify_greedy([5, 6], [(5, True), (6, False), (7, True)]) == (1, None)
    plain = _run(target, [Message("user", PROMPTS[1])], GREEDY)[0]
    monkeypatch.setattr("corral.app.runtime.speculative.TIE_MARGIN", 1e9)  # every position is a near-tie
    spec = _attach(target, models["draft"], adaptive=False)
    try:
        tokens, result = _run(target, [Message("user", PROMPTS[1])], GREEDY)
        assert tokens == plain and result.stats.accepted_tokens == 0 and result.stats.drafted_tokens > 0
        _cache_consistent(target, spec)
    finally:
        _detach(target)
