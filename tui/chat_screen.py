"""The chat screen: messages, prompt and status line; replies stream from a thread worker."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, cast

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Static

from corral.app.chats.kv_states import EngineConversation
from corral.app.runtime.api import GenerationStats, Message
from corral.convert.errors import ContextOverflow, CorralError

from . import tool_turns
from .chat_commands import ChatCommands
from .load_screen import Draft
from .message_view import MessageBox, MessageView
from .prompt_input import PromptInput
from .reply_job import ContextCounted, ReplyDone, ReplyFailed, ReplyJob, run_reply
from .status_bar import StatusBar

if TYPE_CHECKING:
    from .app import ChatApp

GENERATING = "generating… (escape stops)"
GENERATION_SWITCH_INTERVAL = 0.0005  # seconds; CPython's default is 0.005
PLACEHOLDER = "Type a message. enter sends · ctrl+j newline · f1 help · ctrl+o conversations · ctrl+q quit"


class ChatScreen(ChatCommands, Screen[None]):
    """Send prompts, stream replies, manage conversations."""

    BINDINGS = [
        Binding("escape", "stop", "Stop", show=False),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+n", "new_conversation", "New"),
        Binding("ctrl+o", "conversations", "Chats"),
        Binding("ctrl+s", "export", "Export", show=False),
        Binding("f2,ctrl+t", "settings", "Settings"),
        Binding("f3,ctrl+g", "memory", "Memory"),
        Binding("f1,question_mark", "help", "Help"),
    ]

    def __init__(self, draft: Draft | None = None) -> None:
        super().__init__()
        self.draft = draft or Draft()  # typed on the load screen: it goes into the prompt box
        self.job: ReplyJob | None = None
        self.conversation_id: int | None = None
        self._kv_cache: EngineConversation | None = None
        self.system_prompt = ""
        self._timer: Timer | None = None
        self._switch_interval: float | None = None
        self.tool_pending = False  # the last reply asked for a tool: the next message is its result

    @property
    def chat_app(self) -> ChatApp:
        return cast("ChatApp", self.app)

    def compose(self) -> ComposeResult:
        with MessageView(id="messages"):
            yield Static(PLACEHOLDER, id="placeholder", markup=False)
        yield PromptInput(id="prompt")
        yield StatusBar(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        app = self.chat_app
        self.system_prompt = app.system_prompt
        status = self.query_one(StatusBar)
        status.model = app.engine_model_name()
        status.ctx_total = app.engine.n_ctx if app.engine else 0
        prompt = self.query_one(PromptInput)
        if self.draft.text:
            prompt.load_text(self.draft.text)
            prompt.move_cursor(self.draft.cursor)
        self.set_focus(prompt)  # now, so that keys already queued land in the box
        if app.initial_conversation_id is not None:
            await self.load_conversation(app.initial_conversation_id)
        elif app.show_list_at_start and not self.draft.text:  # typing during the load means: chat now
            try:
                has_any = bool(app.store.list_conversations())
            except CorralError as exc:
                self.notify(str(exc), severity="error")
                has_any = False
            if has_any:
                self.action_conversations()
        self._refresh_context()

    # -- helpers ----------------------------------------------------------------------------------

    @property
    def kv_cache(self) -> EngineConversation:
        """The saved KV caches of this store's conversations, and which one the engine holds."""
        if self._kv_cache is None:
            self._kv_cache = EngineConversation(self.chat_app.store.kv_states)
        return self._kv_cache

    @property
    def view(self) -> MessageView:
        return self.query_one(MessageView)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    def history(self) -> list[Message]:
        """System prompt plus every turn on screen (empty replies left out)."""
        out = [Message("system", self.system_prompt)] if self.system_prompt else []
        tools = self.chat_app.tools
        for box in self.view.boxes():
            if box.role == "assistant" and box.content:
                out.append(tool_turns.reply_message(box.content, tools))
            elif box.role in ("user", "ipython") or box.content:
                out.append(Message(box.role, box.content))  # type: ignore[arg-type]
        return out

    def _update_placeholder(self) -> None:
        self.query_one("#placeholder").display = not self.view.boxes()

    def _ensure_conversation(self) -> int:
        if self.conversation_id is None:
            app = self.chat_app
            self.conversation_id = app.store.new_conversation(
                model=app.engine_model_name(), system_prompt=self.system_prompt
            )
        return self.conversation_id

    def _refresh_context(self) -> None:
        if self.chat_app.engine is not None and self.job is None:
            self._count_context(self.history())

    @work(thread=True, group="count", exclusive=True, exit_on_error=False)
    def _count_context(self, messages: list[Message]) -> None:
        app = self.chat_app
        if not messages or app.engine is None:
            self.post_message(ContextCounted(0))
            return
        with app.engine_lock:
            tokens = app.engine.count_prompt_tokens(messages, *app.tool_args())
        self.post_message(ContextCounted(tokens))

    def on_context_counted(self, message: ContextCounted) -> None:
        if self.job is None:
            self.status.ctx_used = message.tokens

    # -- sending and streaming ----------------------------------------------------------------------

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        if self.job is not None:
            self.notify("a reply is still streaming; escape stops it", severity="warning")
            return
        text = event.text.strip("\n").rstrip()
        role = "ipython" if self.tool_pending else "user"
        stored = tool_turns.TOOL_RESULT_PREFIX + text if self.tool_pending else text
        try:
            conversation_id = self._ensure_conversation()
            message_id = self.chat_app.store.add_message(conversation_id, "user", stored)  # committed now
        except CorralError as exc:
            self.notify(str(exc), severity="error")
            return
        self.prompt.remember(text)
        self.prompt.clear()
        self._set_tool_pending(False)
        user_box = await self.view.add_message(role, text, message_id=message_id)
        self._update_placeholder()
        await self._start_reply(user_box)

    async def _start_reply(self, user_box: MessageBox | None) -> None:
        app = self.chat_app
        messages = self.history()
        box = await self.view.add_reply(min_interval=app.flush_interval, max_ui_share=app.max_ui_share)
        job = ReplyJob(messages, app.sampling, box, self._ensure_conversation(), user_box=user_box)
        job.last_save = time.monotonic()
        self.job = job
        app.reply_cancel = job.cancel
        self.status.state = GENERATING
        # The generation thread re-takes the GIL after every C call; do not make it wait 5 ms for it.
        if self._switch_interval is None:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(GENERATION_SWITCH_INTERVAL)
        self._timer = self.set_interval(app.flush_interval, self._tick)
        self._generate(job)

    @work(thread=True, group="generate", exit_on_error=False)
    def _generate(self, job: ReplyJob) -> None:
        app = self.chat_app
        engine = app.engine
        try:
            with app.engine_lock:
                if engine is None:
                    raise CorralError("no model is loaded")
                generation = run_reply(engine, job, app.tool_args(), self.kv_cache,
                                       warn=lambda text: self.app.call_from_thread(
                                           self.notify, text, severity="warning", markup=False))
        except BaseException as exc:  # every failure goes to the UI as a notification
            self.post_message(ReplyFailed(job, exc))
        else:
            self.post_message(ReplyDone(job, generation))
        finally:
            job.done.set()

    async def _tick(self) -> None:
        job = self.job
        if job is None:
            return
        await job.box.append(job.buffer.drain())
        self._save(job)

    def _save(self, job: ReplyJob, *, status: str = "streaming", stats: GenerationStats | None = None,
              force: bool = False) -> None:
        """Write the reply so far to the store (at most every save_interval seconds unless `force`)."""
        now = time.monotonic()
        text = job.box.content
        if job.save_failed or (not force and now - job.last_save < self.chat_app.save_interval):
            return
        if job.message_id is None and not text and not force:
            return
        if not force and text == job.saved_text:
            return
        store = self.chat_app.store
        try:
            if job.message_id is None:
                job.message_id = store.start_reply(job.conversation_id, text)
                job.box.message_id = job.message_id
            store.update_reply(job.message_id, text, status=status, stats=stats)
        except CorralError as exc:
            job.save_failed = True
            self.notify(f"could not save the reply: {exc}", severity="error")
            return
        job.saved_text = text
        job.last_save = now

    async def _finish(self, job: ReplyJob, status: str, stats: GenerationStats | None,
                      final_text: str | None = None) -> None:
        # Everything the rest of the app can observe is settled before the first await.
        box = job.box
        box.queue(job.buffer.drain())
        replace = final_text is not None and final_text.strip() != box.content.strip()
        if replace:
            box.content = final_text or ""
        box.set_status(status)
        if self.job is job:
            self._end_job()
        self._save(job, status=status, stats=stats, force=True)
        if stats is not None:
            self.status.show_stats(stats)
        self.status.state = "stopped" if status == "cancelled" else ""
        if replace:
            await box.replace(box.content)
        else:
            await box.flush()

    def _set_tool_pending(self, pending: bool) -> None:
        self.tool_pending = pending
        self.prompt.placeholder = tool_turns.TOOL_PENDING if pending else ""

    def _end_job(self) -> None:
        self.job = None
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None

    async def action_stop(self) -> None:
        """Escape: stop now and keep the partial reply; harmless when nothing streams."""
        job = self.job
        if job is None and self.tool_pending:
            self._set_tool_pending(False)
            self.notify(tool_turns.TOOL_DISMISSED)
            return
        if job is None or job.stopped:
            return
        job.cancel.set()
        job.stopped = True
        await self._finish(job, "cancelled", None)

    async def on_reply_done(self, message: ReplyDone) -> None:
        job, generation = message.job, message.generation
        if job.stopped:  # already finished on escape; record the engine's numbers for what was shown
            if job.message_id is not None and not job.save_failed:
                try:
                    self.chat_app.store.update_reply(job.message_id, job.box.content, status="cancelled",
                                                     stats=generation.stats)
                except CorralError as exc:
                    self.notify(str(exc), severity="error")
            if self.job is None:
                self.status.show_stats(generation.stats)
            return
        stats = generation.stats
        await self._finish(job, stats.stop_reason, stats, final_text=generation.text)
        calls = tool_turns.calls_in(generation.text, self.chat_app.tools)
        if calls is not None:
            await job.box.mount(Static(tool_turns.describe_calls(calls), classes="tool-calls", markup=False))
            self._set_tool_pending(True)
            self.notify(tool_turns.TOOL_PENDING, severity="warning", timeout=10)
        if stats.stop_reason == "length":
            engine = self.chat_app.engine
            if engine is not None and stats.prompt_tokens + stats.completion_tokens >= engine.n_ctx:
                self.notify("the context is full: the reply was cut. Start a new conversation (ctrl+n).",
                            severity="warning")
            else:
                self.notify(f"the reply reached max tokens ({job.settings.max_tokens}); raise it with f2",
                            severity="warning")

    async def on_reply_failed(self, message: ReplyFailed) -> None:
        job, error = message.job, message.error
        if job.stopped:
            return
        job.box.queue(job.buffer.drain())
        nothing_shown = not job.box.content
        if isinstance(error, ContextOverflow) and nothing_shown:
            if self.job is job:
                self._end_job()
            await job.box.remove()
            if job.user_box is not None:
                await self._unsend(job.user_box)
            self.status.state = ""
            self.notify(f"context full: {error}. The conversation is kept; start a new one (ctrl+n) "
                        "or restart with a larger --ctx.", severity="error", timeout=10)
            self._refresh_context()
            return
        await self._finish(job, "error", None)
        self.notify(str(error) or type(error).__name__, severity="error")

    async def _unsend(self, user_box: MessageBox) -> None:
        """Take a user turn back (its reply could not start): out of the store, back into the prompt."""
        store = self.chat_app.store
        try:
            if user_box.message_id is not None:
                store.delete_message(user_box.message_id)
            if self.conversation_id is not None and len(self.view.boxes()) == 1:
                store.delete_conversation(self.conversation_id)
                self.conversation_id = None
        except CorralError as exc:
            self.notify(str(exc), severity="error")
        await user_box.remove()
        if not self.prompt.text.strip():
            self.prompt.set_text(user_box.content)
        if user_box.role == "ipython":
            self._set_tool_pending(True)
        self._update_placeholder()

    # -- commands ---------------------------------------------------------------------------------

    async def action_regenerate(self) -> None:
        if self.job is not None:
            self.notify("a reply is still streaming; escape stops it", severity="warning")
            return
        boxes = self.view.boxes()
        if boxes and boxes[-1].role == "assistant":
            last = boxes[-1]
            try:
                if last.message_id is not None:
                    self.chat_app.store.delete_message(last.message_id)
            except CorralError as exc:
                self.notify(str(exc), severity="error")
                return
            await last.remove()
            boxes = boxes[:-1]
        if not boxes or boxes[-1].role not in ("user", "ipython"):
            self.notify("nothing to regenerate", severity="warning")
            return
        self._set_tool_pending(False)
        await self._start_reply(None)

    async def action_new_conversation(self) -> None:
        self._set_tool_pending(False)
        await self.action_stop()
        self.conversation_id = None
        self.system_prompt = self.chat_app.system_prompt
        await self.view.query(MessageBox).remove()
        self._update_placeholder()
        self.status.ctx_used = 0
        self._refresh_context()
        self.prompt.focus()

    async def load_conversation(self, conversation_id: int) -> None:
        try:
            conversation = self.chat_app.store.get(conversation_id)
        except CorralError as exc:
            self.notify(str(exc), severity="error")
            return
        self._set_tool_pending(False)
        await self.action_stop()
        await self.view.query(MessageBox).remove()
        self.conversation_id = conversation.id
        self.system_prompt = conversation.system_prompt
        boxes = [MessageBox(m.role, m.content, status=m.status, message_id=m.id) for m in conversation.messages]
        if boxes:
            await self.view.mount_all(boxes)
        self.view.scroll_end(animate=False)
        self.view.anchor()
        self._update_placeholder()
        self._refresh_context()
        if conversation.messages and conversation.messages[-1].role == "user":
            self.notify("the last prompt has no reply: ctrl+r generates one", severity="information")
