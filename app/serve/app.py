"""The OpenAI-compatible HTTP API over one loaded model (Starlette; run by uvicorn).

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions. Every
request needs `Authorization: Bearer KEY` when an API key is set. Generations go through one
`GenerationQueue` (one at a time, bounded: 503 when full); a client that disconnects has its
generation cancelled; a prompt longer than the context is a 400 with the token counts.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from corral.app.runtime.api import Generation, Message, SamplingSettings
from corral.app.runtime.chat_format import TemplateRaised
from corral.app.runtime.tools import ParsedReply, ToolSet, parse_reply
from corral.app.serve import responses as out
from corral.app.serve.queue import GenerationQueue, QueueFull
from corral.app.serve.schemas import BadRequest, chat_request, completion_request, parse_body
from corral.app.serve.streaming import GenerationJob, ToolGate
from corral.convert.errors import ContextOverflow, CorralError


class ServeEngine(Protocol):
    """What the server needs of an engine: the chat protocol plus tools and raw-text completion."""

    model_name: str
    n_ctx: int

    def count_prompt_tokens(self, messages: Sequence[Message], tools: ToolSet | None = None) -> int: ...

    def count_text_tokens(self, text: str) -> int: ...

    def generate(self, messages: Sequence[Message], settings: SamplingSettings, *,
                 on_text: Callable[[str], None] | None = None, cancel: threading.Event | None = None,
                 tools: ToolSet | None = None) -> Generation: ...

    def complete(self, prompt: str, settings: SamplingSettings, *, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> Generation: ...


@dataclass(frozen=True)
class ServeConfig:
    api_key: str | None = None
    defaults: SamplingSettings = field(default_factory=SamplingSettings)
    max_waiting: int = 32
    max_body_bytes: int = 8 * 1024 * 1024


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


class _RequireKey:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = out.error_body("missing or wrong API key (send 'Authorization: Bearer KEY')",
                                      code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error(exc: BadRequest) -> JSONResponse:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return JSONResponse(out.error_body(exc.message, kind=kind, param=exc.param, code=exc.code), status_code=exc.status)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Service:
    """The server's state: one engine, one queue, the defaults the command line set."""

    def __init__(self, engine: ServeEngine, config: ServeConfig) -> None:
        self.engine = engine
        self.config = config
        self.queue = GenerationQueue(config.max_waiting)

    # -- helpers ---------------------------------------------------------------------------------
    async def _body(self, request: Request) -> dict[str, Any]:
        size = int(request.headers.get("content-length") or 0)
        if size > self.config.max_body_bytes:
            raise BadRequest(f"the request body is {size} bytes (limit {self.config.max_body_bytes})", status=413)
        raw = await request.body()
        if len(raw) > self.config.max_body_bytes:
            raise BadRequest(f"the request body is over {self.config.max_body_bytes} bytes", status=413)
        return parse_body(raw)

    def _check_room(self, n_prompt: int, max_tokens: int) -> None:
        n_ctx = self.engine.n_ctx
        if n_prompt >= n_ctx:
            raise BadRequest(f"the prompt is {n_prompt} tokens but the model's context window is {n_ctx} tokens "
                             f"(max_tokens {max_tokens}); shorten the conversation", "messages",
                             code="context_length_exceeded")

    def _check_queue(self) -> None:
        if self.queue.full:
            raise BadRequest(f"the server is busy: {self.queue.waiting} requests are waiting; retry later",
                             status=503, code="queue_full")

    async def _run(self, request: Request, job: Callable[[], Generation], cancel: threading.Event) -> Generation:
        """Queue and run `job`; a client that disconnects first cancels it (ClientGone)."""
        task = asyncio.ensure_future(self.queue.run(job, cancel))
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            cancel.set()
            task.cancel()
            raise ClientGone
        return self._result(task)

    @staticmethod
    def _result(task: asyncio.Future[Generation]) -> Generation:
        try:
            return task.result()
        except QueueFull as exc:
            raise BadRequest(f"the server is busy ({exc}); retry later", status=503, code="queue_full") from None
        except ContextOverflow as exc:
            raise BadRequest(str(exc), "messages", code="context_length_exceeded") from None
        except CorralError as exc:
            raise BadRequest(f"generation failed: {exc}", status=500) from None

    # -- routes ----------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.engine.model_name, "busy": self.queue.running,
                             "waiting": self.queue.waiting, "served": self.queue.served})

    async def _generate_once(self, request: Request, stop: Any,
                             call: Callable[[GenerationJob], Generation]) -> tuple[GenerationJob, Generation]:
        """Run one non-streamed generation through the queue; the job holds its text after stop strings."""
        job = GenerationJob(stop)

        def work() -> Generation:
            result = call(job)
            job.finish()
            return result

        return job, await self._run(request, work, job.cancel)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.engine.model_name, "object": "model",
                                                          "created": 0, "owned_by": "corral"}]})

    async def chat_completions(self, request: Request) -> Response:
        try:
            req = chat_request(await self._body(request), self.config.defaults)
            try:
                n_prompt = await asyncio.to_thread(self.engine.count_prompt_tokens, req.messages, req.tools)
            except TemplateRaised as exc:
                raise BadRequest(str(exc), "messages") from None
            self._check_room(n_prompt, req.sampling.settings.max_tokens)
            self._check_queue()
            if req.sampling.stream:
                return StreamingResponse(self._chat_events(req.messages, req.tools, req.sampling),
                                         media_type="text/event-stream")
            job, result = await self._generate_once(request, req.sampling.stop, lambda job: self.engine.generate(
                req.messages, req.sampling.settings, on_text=job.on_text, cancel=job.cancel, tools=req.tools))
        except BadRequest as exc:
            return _error(exc)
        except ClientGone:
            return Response(status_code=499)
        parsed = parse_reply(job.text, req.tools) if req.tools is not None else ParsedReply(job.text)
        reason = out.finish_reason(result.stats, stopped_by_string=job.stopped_by_string, calls=parsed.has_calls)
        body = out.chat_completion(out.new_id("chatcmpl"), self.engine.model_name, parsed, reason, result.stats)
        return JSONResponse(body)

    async def _stream(self, start: Callable[[Callable[[str], None]], tuple[GenerationJob, Callable[[], Generation]]],
                      ) -> AsyncIterator[str | Generation | BadRequest]:
        """Run a generation, yielding its text pieces, then the Generation (or the BadRequest it ended with)."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        job, work = start(lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text))
        task = asyncio.ensure_future(self.queue.run(work, job.cancel))
        task.add_done_callback(lambda _t: pieces.put_nowait(None))
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
            try:
                yield self._result(task)
            except BadRequest as exc:
                yield exc
        finally:
            if not task.done():
                job.cancel.set()
                task.cancel()

    async def _chat_events(self, messages: Sequence[Message], tools: ToolSet | None, sampling: Any
                           ) -> AsyncIterator[str]:
        cid, model = out.new_id("chatcmpl"), self.engine.model_name
        gate = ToolGate(tools is not None)
        holder: list[GenerationJob] = []

        def start(sink: Callable[[str], None]) -> tuple[GenerationJob, Callable[[], Generation]]:
            job = GenerationJob(sampling.stop, sink)
            holder.append(job)

            def work() -> Generation:
                result = self.engine.generate(messages, sampling.settings, on_text=job.on_text, cancel=job.cancel,
                                              tools=tools)
                job.finish()
                return result

            return job, work

        yield out.chat_chunk(cid, model, {"role": "assistant", "content": ""})
        async for item in self._stream(start):
            if isinstance(item, str):
                text = gate.feed(item)
                if text:
                    yield out.chat_chunk(cid, model, {"content": text})
                continue
            if isinstance(item, BadRequest):
                yield out.sse(out.error_body(item.message, param=item.param, code=item.code))
                return
            job = holder[0]
            parsed = parse_reply(job.text, tools) if tools is not None and gate.holding else ParsedReply("")
            if parsed.calls:
                if parsed.content:
                    yield out.chat_chunk(cid, model, {"content": parsed.content})
                calls = [out.tool_call_json(c, i) for i, c in enumerate(parsed.calls)]
                yield out.chat_chunk(cid, model, {"tool_calls": calls})
            elif gate.held:
                delta: dict[str, Any] = {"content": gate.held}
                if parsed.invalid:
                    delta["invalid_tool_calls"] = [c.as_json() for c in parsed.invalid]
                yield out.chat_chunk(cid, model, delta)
            reason = out.finish_reason(item.stats, stopped_by_string=job.stopped_by_string, calls=parsed.has_calls)
            yield out.chat_chunk(cid, model, {}, reason)
            if sampling.include_usage:
                yield out.sse({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                               "model": model, "choices": [], "usage": out.usage(item.stats)})
            yield out.DONE

    async def completions(self, request: Request) -> Response:
        try:
            req = completion_request(await self._body(request), self.config.defaults)
            n_prompt = await asyncio.to_thread(self.engine.count_text_tokens, req.prompt)
            self._check_room(n_prompt, req.sampling.settings.max_tokens)
            self._check_queue()
            if req.sampling.stream:
                return StreamingResponse(self._completion_events(req.prompt, req.sampling),
                                         media_type="text/event-stream")
            job, result = await self._generate_once(request, req.sampling.stop, lambda job: self.engine.complete(
                req.prompt, req.sampling.settings, on_text=job.on_text, cancel=job.cancel))
        except BadRequest as exc:
            return _error(exc)
        except ClientGone:
            return Response(status_code=499)
        reason = out.finish_reason(result.stats, stopped_by_string=job.stopped_by_string, calls=False)
        return JSONResponse(out.text_completion(out.new_id("cmpl"), self.engine.model_name, job.text, reason,
                                                result.stats))

    async def _completion_events(self, prompt: str, sampling: Any) -> AsyncIterator[str]:
        cid, model = out.new_id("cmpl"), self.engine.model_name
        holder: list[GenerationJob] = []

        def start(sink: Callable[[str], None]) -> tuple[GenerationJob, Callable[[], Generation]]:
            job = GenerationJob(sampling.stop, sink)
            holder.append(job)

            def work() -> Generation:
                result = self.engine.complete(prompt, sampling.settings, on_text=job.on_text, cancel=job.cancel)
                job.finish()
                return result

            return job, work

        async for item in self._stream(start):
            if isinstance(item, str):
                yield out.sse(out.text_completion(cid, model, item, None, None, chunk=True))
            elif isinstance(item, BadRequest):
                yield out.sse(out.error_body(item.message, param=item.param, code=item.code))
                return
            else:
                reason = out.finish_reason(item.stats, stopped_by_string=holder[0].stopped_by_string, calls=False)
                usage = item.stats if sampling.include_usage else None
                yield out.sse(out.text_completion(cid, model, "", reason, usage, chunk=True))
                yield out.DONE


def make_app(engine: ServeEngine, config: ServeConfig | None = None) -> Starlette:
    """The ASGI application serving `engine`."""
    config = config or ServeConfig()
    service = Service(engine, config)
    middleware = [Middleware(_RequireKey, key=config.api_key)] if config.api_key else []
    app = Starlette(routes=[
        Route("/health", service.health, methods=["GET"]),
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
        Route("/v1/completions", service.completions, methods=["POST"]),
    ], middleware=middleware)
    app.state.service = service
    return app


__all__ = ["ServeConfig", "ServeEngine", "Service", "make_app"]
