"""One reply being generated, and the messages its worker thread posts to the chat screen."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from textual.message import Message as TMessage

from corral.app.chats.kv_states import EngineConversation
from corral.app.runtime.api import ChatEngine, Generation, GenerationStats, Message, SamplingSettings
from corral.convert.errors import ContextOverflow

from .message_view import MessageBox, PieceBuffer, ReplyBox


@dataclass(eq=False)
class ReplyJob:
    """One reply being generated; shared (carefully) between the UI and the worker thread."""

    messages: list[Message]
    settings: SamplingSettings
    box: ReplyBox
    conversation_id: int
    user_box: MessageBox | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    buffer: PieceBuffer = field(default_factory=PieceBuffer)
    done: threading.Event = field(default_factory=threading.Event)
    message_id: int | None = None
    stopped: bool = False
    last_save: float = 0.0
    saved_text: str = ""
    save_failed: bool = False


class ReplyDone(TMessage):
    def __init__(self, job: ReplyJob, generation: Generation) -> None:
        super().__init__()
        self.job = job
        self.generation = generation


class ReplyFailed(TMessage):
    def __init__(self, job: ReplyJob, error: BaseException) -> None:
        super().__init__()
        self.job = job
        self.error = error


class ContextCounted(TMessage):
    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens


def run_reply(engine: ChatEngine, job: ReplyJob, tool_args: tuple, kv_cache: EngineConversation,
              warn: Callable[[str], None]) -> Generation:
    """Generate `job`'s reply (worker thread, engine lock held): check the context, restore the conversation's
    saved KV state if the engine holds another, generate, save the new state."""
    if job.cancel.is_set():
        return Generation("", GenerationStats(0, 0, 0.0, 0.0, "cancelled"))
    used = engine.count_prompt_tokens(job.messages, *tool_args)
    if used >= engine.n_ctx:
        raise ContextOverflow(f"the conversation is {used:,} tokens; the context holds {engine.n_ctx:,}")
    problem = kv_cache.switch_to(engine, job.conversation_id)
    if problem:
        warn(problem)
    generation = engine.generate(job.messages, job.settings, on_text=job.buffer.append, cancel=job.cancel,
                                 **({"tools": tool_args[0]} if tool_args else {}))
    kv_cache.save(engine, job.conversation_id)
    return generation
