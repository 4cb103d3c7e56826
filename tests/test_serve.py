"""`corral serve` through the official `openai` client over loopback: a real tiny GGUF through llama.cpp for
text, the fake engine for tool calls, queueing and cancellation."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner

import corral.app.runtime.engine as engine_mod
from corral.app.cli.main import cli
from corral.app.runtime.api import Generation, Message, SamplingSettings
from corral.app.runtime.engine import LlamaEngine, load_engine
from corral.app.runtime.tools import PYTHON_TAG, ToolSet
from corral.app.serve.app import ServeConfig
from corral.app.serve.server import serving_in_thread
from tests.helpers.engine import cpu_plan, shared_tiny_gguf
from tests.helpers.fake_engine import FakeEngine, split_tokens
from tests.helpers.tools import TIME, WEATHER

GREEDY = {"temperature": 0, "max_tokens": 24}
HELLO = [{"role": "user", "content": "Say something about llamas."}]


def wait_for(condition: Callable[[], object], what: str, timeout: float = 10.0) -> float:
    """Poll `condition` until true; return the seconds it took (AssertionError after `timeout`)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - start


class ServeFake(FakeEngine):
    """The fake engine with the server's extras: tools (recorded), raw completion, token counts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tools_seen: list[ToolSet | None] = []
        self.cancels: list[threading.Event] = []

    def count_prompt_tokens(self, messages: Sequence[Message], tools: ToolSet | None = None) -> int:
        return super().count_prompt_tokens(messages) + (50 if tools is not None else 0)

    def count_text_tokens(self, text: str) -> int:
        return len(split_tokens(text)) + 1

    def generate(self, messages: Sequence[Message], settings: SamplingSettings, *,
                 on_text: Callable[[str], None] | None = None, cancel: threading.Event | None = None,
                 tools: ToolSet | None = None) -> Generation:
        self.tools_seen.append(tools)
        if cancel is not None:
            self.cancels.append(cancel)
        return super().generate(messages, settings, on_text=on_text, cancel=cancel)

    def complete(self, prompt: str, settings: SamplingSettings, *, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> Generation:
        return self.generate([Message("user", prompt)], settings, on_text=on_text, cancel=cancel)


def client(base: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


# -- the real model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny_gguf(tmp_path_factory)


@pytest.fixture(scope="module")
def real(tiny: Path) -> Iterator[LlamaEngine]:
    with load_engine(tiny, plan=cpu_plan()) as eng:
        yield eng


@pytest.fixture(scope="module")
def real_server(real: LlamaEngine) -> Iterator[str]:
    with serving_in_thread(real, ServeConfig(max_waiting=16)) as (_server, base):
        yield base


class _Borrowed:
    def __init__(self, engine: LlamaEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def close(self) -> None:
        pass


def test_same_greedy_text_as_ask_streamed_or_not(real: LlamaEngine, real_server: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "load_engine", lambda *a, **k: _Borrowed(real))
    monkeypatch.setattr(engine_mod, "make_plan", lambda *a, **k: cpu_plan())
    asked = CliRunner().invoke(cli, ["ask", "-m", str(real.path), "--json", "--temperature", "0", "--max-tokens", "24",
                                     HELLO[0]["content"]])
    assert asked.exit_code == 0, asked.output
    expected = json.loads(asked.stdout)["text"]
    assert len(expected) > 10

    api = client(real_server)
    reply = api.chat.completions.create(model="tiny", messages=HELLO, **GREEDY)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 24
    assert reply.usage.prompt_tokens == real.count_prompt_tokens([Message("user", HELLO[0]["content"])])
    assert reply.model == real.model_name

    stream = api.chat.completions.create(model="tiny", messages=HELLO, stream=True,  # type: ignore[arg-type]
                                         stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 3  # really streamed, not one blob
    assert "".join(pieces) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24


def test_stop_strings_cut_the_reply(real_server: str) -> None:
    api = client(real_server)
    full = api.chat.completions.create(model="m", messages=HELLO, **GREEDY).choices[0].message.content  # type: ignore[arg-type]
    assert full
    stop = full[8:11]
    cut = full[:full.find(stop)]
    reply = api.chat.completions.create(model="m", messages=HELLO, stop=[stop], **GREEDY)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    streamed = api.chat.completions.create(model="m", messages=HELLO, stop=stop, stream=True, **GREEDY)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_seed_repeats_a_sampled_reply(real_server: str) -> None:
    api = client(real_server)
    args: dict[str, Any] = {"model": "m", "messages": HELLO, "temperature": 1.0, "top_p": 0.9, "max_tokens": 16}
    first = api.chat.completions.create(seed=7, **args).choices[0].message.content
    assert api.chat.completions.create(seed=7, **args).choices[0].message.content == first


def test_completions_continue_raw_text(real: LlamaEngine, real_server: str) -> None:
    api = client(real_server)
    reply = api.completions.create(model="m", prompt="The llama is", max_tokens=12, temperature=0)
    text = reply.choices[0].text
    direct = real.complete("The llama is", SamplingSettings(temperature=0, max_tokens=12))
    assert text == direct.text and len(text) > 3
    streamed = api.completions.create(model="m", prompt="The llama is", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


def test_models_and_health(real: LlamaEngine, real_server: str) -> None:
    assert [m.id for m in client(real_server).models.list()] == [real.model_name]
    health = httpx.get(f"{real_server}/health").json()
    assert health["status"] == "ok" and health["busy"] is False and health["waiting"] == 0


def test_too_long_for_the_context_is_400_with_counts(real_server: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(real_server).chat.completions.create(model="m", messages=[{"role": "user", "content": "llama " * 1500}])
    message = str(info.value)
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    assert "the prompt is 15" in message and "context window is 1024 tokens" in message


def test_eight_concurrent_clients_all_finish_with_the_same_greedy_text(real_server: str) -> None:
    def ask(_i: int) -> str:
        reply = client(real_server).chat.completions.create(model="m", messages=HELLO, **GREEDY)  # type: ignore[arg-type]
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, range(8)))
    assert len(texts) == 8 and len(set(texts)) == 1 and texts[0]


def test_tool_definitions_and_results_reach_the_prompt(real: LlamaEngine, real_server: str) -> None:
    """Tools, an assistant tool call and its result (role `tool`) are rendered in Llama 3.1's format."""
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": '{"temp_c": 21}'},
    ]
    client(real_server).chat.completions.create(model="m", messages=messages, tools=[WEATHER, TIME],  # type: ignore[arg-type]
                                                max_tokens=2, temperature=0)
    prompt = b"".join(real.piece(t, special=True) for t in real.last_prompt_tokens).decode()
    assert "Environment: ipython" in prompt
    assert '"name": "get_weather"' in prompt and '"name": "get_time"' in prompt
    assert '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}' \
        '<|eot_id|>' in prompt
    assert prompt.endswith('<|start_header_id|>ipython<|end_header_id|>\n\n{"temp_c": 21}<|eot_id|>'
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")


# -- bad requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role must be one of"),
    ({"messages": HELLO, "temperature": "hot"}, "'temperature' must be a number"),
    ({"messages": HELLO, "temperature": 9}, "between 0 and 2"),
    ({"messages": HELLO, "max_tokens": 0}, "'max_tokens' must be at least 1"),
    ({"messages": HELLO, "n": 3}, "'n' must be 1"),
    ({"messages": HELLO, "stop": [1]}, "'stop' must be a string"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "name must be"),
    ({"messages": HELLO, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "not among the tools"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, "arguments must be a JSON object"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text only"),
])
def test_bad_fields_are_400_with_a_message(real_server: str, body: dict[str, Any], message: str) -> None:
    response = httpx.post(f"{real_server}/v1/chat/completions", json={"model": "m", **body})
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_bad_json_is_400_and_through_the_client_too(real_server: str) -> None:
    response = httpx.post(f"{real_server}/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client(real_server).chat.completions.create(model="m", messages=HELLO, temperature=-1)  # type: ignore[arg-type]
    assert httpx.post(f"{real_server}/v1/completions", json={"prompt": ""}).status_code == 400


# -- the fake engine: tool calls, queueing, cancellation, keys -----------------------------------------


@pytest.fixture
def fake() -> ServeFake:
    return ServeFake(n_ctx=4096)


@pytest.fixture
def fake_server(fake: ServeFake) -> Iterator[str]:
    with serving_in_thread(fake, ServeConfig(max_waiting=1)) as (_server, base):
        yield base
    fake.close()


CALL = PYTHON_TAG + '{"name": "get_weather", "parameters": {"city": "Paris"}}'


def test_a_tool_call_comes_back_as_tool_calls(fake: ServeFake, fake_server: str) -> None:
    fake.queue(CALL, CALL)
    api = client(fake_server)
    reply = api.chat.completions.create(model="m", messages=HELLO, tools=[WEATHER])  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert fake.tools_seen[-1] is not None and fake.tools_seen[-1].function_names() == ["get_weather"]

    chunks = list(api.chat.completions.create(model="m", messages=HELLO, tools=[WEATHER], stream=True))  # type: ignore[arg-type]
    assert all(not (c.choices and c.choices[0].delta.content) for c in chunks)  # the raw call is not shown as text
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, json.loads(d.function.arguments or "")) for d in deltas  # type: ignore[union-attr]
            ] == [(0, "get_weather", {"city": "Paris"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_offers_no_tools_and_text_streams_normally(fake: ServeFake, fake_server: str) -> None:
    fake.queue("It is sunny in Paris.", "It is sunny.")
    api = client(fake_server)
    reply = api.chat.completions.create(model="m", messages=HELLO, tools=[WEATHER], tool_choice="none")  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "It is sunny in Paris." and fake.tools_seen[-1] is None
    chunks = list(api.chat.completions.create(model="m", messages=HELLO, tools=[WEATHER], stream=True))  # type: ignore[arg-type]
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "It is sunny." and len(pieces) == 3
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_an_invalid_call_is_reported_not_returned_as_a_call(fake: ServeFake, fake_server: str) -> None:
    fake.queue('{"name": "get_weather", "parameters": {"ci')
    reply = client(fake_server).chat.completions.create(model="m", messages=HELLO, tools=[WEATHER])  # type: ignore[arg-type]
    message = reply.choices[0].message
    assert not message.tool_calls and reply.choices[0].finish_reason == "stop"
    assert message.content == '{"name": "get_weather", "parameters": {"ci'
    assert "cut short" in (message.model_extra or {})["invalid_tool_calls"][0]["error"]


def test_api_key_is_required_on_every_request(fake: ServeFake) -> None:
    with serving_in_thread(fake, ServeConfig(api_key="s3cret")) as (_server, base):
        assert httpx.get(f"{base}/health").status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        assert client(base, "s3cret").chat.completions.create(model="m", messages=HELLO).choices[0].message.content
        assert httpx.get(f"{base}/health", headers={"Authorization": "Bearer s3cret"}).json()["status"] == "ok"


def _raw_request(base: str, body: dict[str, Any]) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_a_killed_client_frees_the_server(fake: ServeFake, fake_server: str, stream: bool) -> None:
    fake.hold_after = 2
    fake.queue("one two three four five six")
    sock = _raw_request(fake_server, {"model": "m", "messages": HELLO, "stream": stream})
    wait_for(fake.holding.is_set, "the reply to start")
    health = httpx.get(f"{fake_server}/health", timeout=2).json()  # the loop answers while a generation runs
    assert health["busy"] is True
    if stream:
        assert b"data:" in sock.recv(65536)
    sock.close()
    freed = wait_for(lambda: not httpx.get(f"{fake_server}/health").json()["busy"], "the server to be free", 5)
    assert freed < 3.0  # well under a second on an idle machine; generous here so a loaded CI does not flake
    assert fake.cancels[-1].is_set() and not fake.holding.is_set()
    fake.hold_after = None
    fake.queue("next")
    assert client(fake_server).chat.completions.create(model="m", messages=HELLO).choices[0].message.content == "next"


def test_a_full_queue_is_503_and_the_rest_finish(fake: ServeFake, fake_server: str) -> None:
    fake.hold_after = 1
    fake.queue("first reply", "second reply")
    api = client(fake_server)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(api.chat.completions.create, model="m", messages=HELLO)
        wait_for(fake.holding.is_set, "the first reply to hold")
        second = pool.submit(api.chat.completions.create, model="m", messages=HELLO)
        wait_for(lambda: httpx.get(f"{fake_server}/health").json()["waiting"] == 1, "the second to queue")
        with pytest.raises(openai.InternalServerError) as info:
            api.chat.completions.create(model="m", messages=HELLO)
        assert info.value.status_code == 503 and "busy" in str(info.value)
        fake.hold_after = None
        fake.release.set()
        assert first.result(timeout=10).choices[0].message.content == "first reply"
        assert second.result(timeout=10).choices[0].message.content == "second reply"


def test_eight_concurrent_clients_on_a_slow_engine_run_one_at_a_time() -> None:
    fake = ServeFake(token_delay=0.002, default_reply="a b c d e")
    with serving_in_thread(fake, ServeConfig(max_waiting=8)) as (_server, base):
        def ask(_i: int) -> str:
            stream = client(base).chat.completions.create(model="m", messages=HELLO, stream=True)  # type: ignore[arg-type]
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(ask, range(8)))
    assert texts == ["a b c d e"] * 8  # FakeEngine raises if two generations ever overlap
    assert len(fake.calls) == 8


# -- the command -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "host", "warned"), [
    ([], "127.0.0.1", False),
    (["--api-key", "k"], "127.0.0.1", False),
    (["--host", "0.0.0.0"], "0.0.0.0", True),
    (["--host", "0.0.0.0", "--api-key", "k"], "0.0.0.0", False),
])
def test_serve_command_loads_with_the_plan_and_binds_loopback_by_default(
        real: LlamaEngine, monkeypatch: pytest.MonkeyPatch, flags: list[str], host: str, warned: bool) -> None:
    import corral.app.serve.server as server_mod

    started: list[dict[str, Any]] = []

    class Recorder:
        def run(self) -> None:
            pass

    def fake_server(engine: Any, config: ServeConfig, *, host: str, port: int, log_level: str) -> Recorder:
        started.append({"engine": engine, "config": config, "host": host, "port": port})
        return Recorder()

    monkeypatch.delenv("CORRAL_API_KEY", raising=False)
    monkeypatch.setattr(engine_mod, "load_engine", lambda *a, **k: _Borrowed(real))
    monkeypatch.setattr(engine_mod, "make_plan", lambda *a, **k: cpu_plan())
    monkeypatch.setattr(server_mod, "uvicorn_server", fake_server)
    result = CliRunner().invoke(cli, ["serve", "-m", str(real.path), "--port", "9999", "--temperature", "0.2", *flags])
    assert result.exit_code == 0, result.output
    [run] = started
    assert run["host"] == host and run["port"] == 9999
    assert run["config"].api_key == ("k" if "--api-key" in flags else None)
    assert run["config"].defaults.temperature == 0.2
    assert ("without --api-key" in result.stderr) == warned
