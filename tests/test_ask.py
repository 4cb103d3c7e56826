"""`corral ask` through click's CliRunner: streaming, --json, stdin, exit codes, overflow, fit refusal, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from corral.app.cli.cmd_ask import _answer, read_prompt
from corral.app.cli.main import cli
from corral.app.cli.model_options import ModelArgs
from corral.app.runtime import engine as engine_mod
from corral.app.runtime.api import ChatEngine, Message, SamplingSettings
from corral.app.runtime.engine import LlamaEngine, load_engine
from corral.app.runtime.setup import EngineOptions
from tests.helpers.engine import cpu_plan, shared_tiny_gguf, write_tiny_gguf
from tests.helpers.fake_engine import FakeEngine, fake_plan

JSON_KEYS = {"text", "prompt_tokens", "completion_tokens", "prompt_seconds", "generation_seconds", "tokens_per_second",
             "stop_reason"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_gguf(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(tiny: Path) -> Iterator[LlamaEngine]:
    with load_engine(tiny, plan=cpu_plan()) as eng:
        yield eng


class SharedEngine:
    """The module's loaded engine behind `load_engine`, recording what `ask` sends it; close() is a no-op."""

    def __init__(self, engine: LlamaEngine) -> None:
        self._engine = engine
        self.calls: list[list[Message]] = []
        self.interrupt_after: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, messages: Any, settings: Any, *, on_text: Any = None, cancel: Any = None) -> Any:
        self.calls.append(list(messages))
        pieces = [0]

        def spy(text: str) -> None:
            pieces[0] += 1
            if on_text is not None:
                on_text(text)
            if self.interrupt_after is not None and pieces[0] == self.interrupt_after:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to ask's handler

        return self._engine.generate(messages, settings, on_text=spy, cancel=cancel)

    def close(self) -> None:
        pass


@pytest.fixture
def shared(loaded: LlamaEngine, monkeypatch: pytest.MonkeyPatch) -> SharedEngine:
    proxy = SharedEngine(loaded)
    monkeypatch.setattr(engine_mod, "load_engine", lambda *a, **k: proxy)
    monkeypatch.setattr(engine_mod, "make_plan", lambda *a, **k: cpu_plan())
    return proxy


def run(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(cli, ["ask", *args], input=input)


def test_streamed_reply_equals_json_text_on_the_real_path(tiny: Path) -> None:
    base = ["-m", str(tiny), "Hello there!", "--temperature", "0", "--max-tokens", "12", "--threads", "1"]
    streamed = run(*base)
    assert streamed.exit_code == 0, streamed.output
    as_json = run(*base, "--json")
    assert as_json.exit_code == 0
    doc = json.loads(as_json.stdout)
    assert set(doc) >= JSON_KEYS and doc["completion_tokens"] == 12 and doc["stop_reason"] == "length"
    assert streamed.stdout == doc["text"] + "\n" and doc["text"]
    assert "plan:" in streamed.stderr and "loading tiny.gguf" in streamed.stderr


def test_json_numbers(shared: SharedEngine, tiny: Path) -> None:
    result = run("-m", str(tiny), "Name three colours.", "--temperature", "0", "--max-tokens", "9", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["prompt_tokens"] == shared.count_prompt_tokens([Message("user", "Name three colours.")])
    assert doc["completion_tokens"] == 9 and doc["stop_reason"] in ("stop", "length", "cancelled")
    assert doc["generation_seconds"] > 0 and doc["prompt_seconds"] > 0
    assert doc["tokens_per_second"] == pytest.approx(doc["completion_tokens"] / doc["generation_seconds"], rel=1e-3)


def test_no_stream_prints_the_same_text(shared: SharedEngine, tiny: Path) -> None:
    args = ["-m", str(tiny), "Hi", "--temperature", "0", "--max-tokens", "8"]
    assert run(*args, "--no-stream").stdout == run(*args).stdout


def test_stdin_comes_before_the_argument(shared: SharedEngine, tiny: Path) -> None:
    result = run("-m", str(tiny), "Summarize this.", "--system", "Be brief.", "--max-tokens", "2", input="DOCUMENT\n")
    assert result.exit_code == 0
    assert shared.calls[-1] == [Message("system", "Be brief."), Message("user", "DOCUMENT\n\nSummarize this.")]
    result = run("-m", str(tiny), "-", "--max-tokens", "2", input="only stdin")
    assert result.exit_code == 0 and shared.calls[-1] == [Message("user", "only stdin")]


def test_read_prompt_rules() -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

        def read(self) -> str:
            raise AssertionError("must not read a terminal")

    assert read_prompt("question", Tty()) == "question"
    with pytest.raises(Exception, match="no prompt"):
        read_prompt(None, Tty())


@pytest.mark.parametrize("args, message", [
    (["Hi"], "Missing option '-m'"),
    (["-m", "nowhere.gguf", "Hi"], "model file not found"),
    (["-m", "{tiny}", "--temperature", "-1", "Hi"], "temperature"),
    (["-m", "{tiny}", "--top-p", "0", "Hi"], "top-p"),
    (["-m", "{tiny}"], "no prompt"),
])
def test_bad_usage_exits_2(shared: SharedEngine, tiny: Path, args: list[str], message: str) -> None:
    result = run(*[a.replace("{tiny}", str(tiny)) for a in args], input="")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_invalid_gguf_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    result = run("-m", str(bad), "Hi")
    assert result.exit_code == 2 and "bad.gguf" in result.stderr and "Traceback" not in result.output


def test_context_overflow_is_a_clear_error(shared: SharedEngine, tiny: Path) -> None:
    result = run("-m", str(tiny), "word " * 3000)
    assert result.exit_code == 2
    assert "the prompt is 30" in result.stderr and "context window is 1024 tokens" in result.stderr
    assert "--truncate" in result.stderr and "Traceback" not in result.output and result.stdout == ""


def test_truncate_drops_oldest_text_with_a_notice(shared: SharedEngine, tiny: Path) -> None:
    result = run("-m", str(tiny), "word " * 3000 + "LAST WORDS", "--truncate", "--max-tokens", "4", "--json")
    assert result.exit_code == 0, result.output
    assert "dropped its oldest text" in result.stderr
    sent = shared.calls[-1][-1].content
    assert sent.endswith("LAST WORDS") and len(sent) < len("word " * 3000)
    assert json.loads(result.stdout)["prompt_tokens"] <= 1024 - 4


def test_model_that_does_not_fit_is_refused_unless_forced(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unfit = cpu_plan(fits=False, advice=("try IQ2_XXS or add RAM",), headline="needs 230 GiB, have 22 GiB")
    monkeypatch.setattr(engine_mod, "make_plan", lambda *a, **k: unfit)
    result = run("-m", str(tiny), "Hi", "--max-tokens", "2")
    assert result.exit_code == 1 and "will not fit" in result.stderr and "IQ2_XXS" in result.stderr
    assert "--force" in result.stderr
    result = run("-m", str(tiny), "Hi", "--max-tokens", "2", "--force")
    assert result.exit_code == 0, result.output


def test_untrusted_template_warns_and_still_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evil = write_tiny_gguf(tmp_path / "evil.gguf", chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    monkeypatch.setattr(engine_mod, "make_plan", lambda *a, **k: cpu_plan())
    result = run("-m", str(evil), "Hi", "--max-tokens", "3", "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert "unsafe" in result.stderr and "built-in Llama 3" in result.stderr and result.stdout.strip()


def test_ctrl_c_keeps_the_partial_reply_and_exits_130(shared: SharedEngine, tiny: Path) -> None:
    shared.interrupt_after = 3
    result = run("-m", str(tiny), "Hi", "--max-tokens", "200", "--temperature", "0")
    assert result.exit_code == 130 and "interrupted" in result.stderr
    partial = result.stdout
    assert 0 < len(partial.strip()) and shared.last_completion_tokens and len(shared.last_completion_tokens) <= 4
    result = run("-m", str(tiny), "Hi", "--max-tokens", "200", "--temperature", "0", "--json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 130 and doc["stop_reason"] == "cancelled" and doc["completion_tokens"] <= 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # ask restored the handler


def test_answer_takes_any_chat_engine(capsys: pytest.CaptureFixture[str]) -> None:
    """`ask` talks to the engine only through the ChatEngine protocol: the fake engine answers, truncates, warns."""
    fake: ChatEngine = FakeEngine(["a short reply"], n_ctx=64, plan=fake_plan(disk=False))
    assert fake.plan is not None and fake.warnings == list(fake.plan.warnings)
    args = ModelArgs(model="fake.gguf", engine=EngineOptions(), sampling=SamplingSettings(max_tokens=8), system=None)
    messages = [Message("user", "old question"), Message("assistant", "old answer"),
                Message("user", "word " * 80 + "LAST")]
    _answer(fake, args, messages, threading.Event(), truncate=True, stream=False, json_=True)
    out = capsys.readouterr()
    assert json.loads(out.out)["text"] == "a short reply" and "dropped its oldest text" in out.err
    sent = fake.calls[-1].messages  # type: ignore[attr-defined]
    assert len(sent) == 1 and sent[0].content.endswith("LAST") and fake.count_prompt_tokens(sent) <= 64 - 8
