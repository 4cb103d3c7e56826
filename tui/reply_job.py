"""One reply being generated, and the messages its worker thread posts to the chat screen."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from textual.message import Message as TMessage

from corral.app.runtime.api import Generation, Message, SamplingSettings

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
