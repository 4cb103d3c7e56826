"""The corral chat app: loads the engine behind a progress screen, then runs the chat screen.

`make_app()` is the one factory used by `corral chat`, the Pilot tests and the snapshot tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from textual import work
from textual.app import App
from textual.message import Message as TMessage
from textual.notifications import SeverityLevel

from corral.app.chats.store import ChatStore
from corral.app.runtime.api import ChatEngine, SamplingSettings
from corral.app.runtime.tools import ToolSet
from corral.convert.errors import Cancelled

from .chat_screen import ChatScreen
from .load_screen import Draft, LoadScreen
from .memory_view import LiveUsage, probe_live_usage

ProgressCallback = Callable[[float], None]
EngineFactory = Callable[[ProgressCallback, threading.Event], ChatEngine]


class EngineLoaded(TMessage):
    def __init__(self, engine: ChatEngine) -> None:
        super().__init__()
        self.engine = engine


class LoadFailed(TMessage):
    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error


class LoadProgress(TMessage):
    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction


class ChatApp(App[int]):
    """Load screen → chat screen. `failure` holds the load error (the CLI re-raises it after `run`)."""

    CSS_PATH = "chat.tcss"
    TITLE = "corral chat"
    ENABLE_COMMAND_PALETTE = False

    def __init__(
        self,
        engine_factory: EngineFactory,
        store: ChatStore,
        settings: SamplingSettings | None = None,
        *,
        system_prompt: str = "",
        model_label: str = "model",
        load_detail: str = "",
        conversation_id: int | None = None,
        show_list_at_start: bool = True,
        export_dir: Path | None = None,
        memory_probe: Callable[[], LiveUsage] = probe_live_usage,
        memory_interval: float = 1.0,
        flush_interval: float = 0.1,
        max_ui_share: float = 0.025,
        save_interval: float = 0.5,
        tools: ToolSet | None = None,
    ) -> None:
        super().__init__()
        self.engine_factory = engine_factory
        self.store = store
        self.sampling = settings or SamplingSettings()
        self.system_prompt = system_prompt
        self.model_label = model_label
        self.load_detail = load_detail
        self.initial_conversation_id = conversation_id
        self.show_list_at_start = show_list_at_start
        self.export_dir = export_dir or Path.cwd()
        self.memory_probe = memory_probe
        self.memory_interval = memory_interval
        self.flush_interval = flush_interval
        self.max_ui_share = max_ui_share
        self.save_interval = save_interval
        self.tools = tools if tools is not None and tools.active else None  # offered to the model; never run
        self.engine: ChatEngine | None = None
        self.engine_lock = threading.Lock()
        self.load_cancel = threading.Event()
        self.load_done = threading.Event()
        self.failure: BaseException | None = None
        self.reply_cancel: threading.Event | None = None  # the latest reply's stop flag
        self.notices: list[tuple[str, str]] = []  # (severity, message) of every notification shown

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = False) -> None:
        """Show a toast and keep a log of it.

        Always plain text, whatever `markup` says (widgets' `notify` passes True): messages carry file
        names, paths, model names and error text, which are data.
        """
        self.notices.append((severity, str(message)))
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def tool_args(self) -> tuple[ToolSet, ...]:
        """`(tools,)` when tools are offered, else `()`: extra arguments for the engine's counting."""
        return (self.tools,) if self.tools is not None else ()

    def engine_model_name(self) -> str:
        return (self.engine.model_name if self.engine is not None else "") or self.model_label

    @property
    def chat_screen(self) -> ChatScreen | None:
        for screen in self.screen_stack:
            if isinstance(screen, ChatScreen):
                return screen
        return None

    # -- loading ----------------------------------------------------------------------------------

    def on_mount(self) -> None:
        self.push_screen(LoadScreen(self.model_label, self.load_detail))
        self._load_engine()

    @work(thread=True, group="load", exit_on_error=False)
    def _load_engine(self) -> None:
        last = [-1.0]

        def progress(fraction: float) -> None:
            if fraction - last[0] >= 0.005 or fraction >= 1.0:
                last[0] = fraction
                self.post_message(LoadProgress(fraction))

        try:
            engine = self.engine_factory(progress, self.load_cancel)
        except BaseException as exc:  # reported on the load screen's way out
            self.post_message(LoadFailed(exc))
        else:
            if self.load_cancel.is_set():
                engine.close()
                self.post_message(LoadFailed(Cancelled("model load cancelled")))
            else:
                self.post_message(EngineLoaded(engine))
        finally:
            self.load_done.set()

    def on_load_progress(self, message: LoadProgress) -> None:
        if isinstance(self.screen, LoadScreen):
            self.screen.set_progress(message.fraction)

    def on_load_screen_cancel_requested(self, _: LoadScreen.CancelRequested) -> None:
        self.load_cancel.set()

    async def on_engine_loaded(self, message: EngineLoaded) -> None:
        if self.load_cancel.is_set():
            message.engine.close()
            return
        self.engine = message.engine
        # Awaited, both: keys pressed meanwhile wait in the app's queue, then reach the chat's prompt box.
        draft = await self.screen.draft() if isinstance(self.screen, LoadScreen) else Draft()
        await self.switch_screen(ChatScreen(draft))

    def on_load_failed(self, message: LoadFailed) -> None:
        self.failure = message.error
        self.exit(return_code=130 if isinstance(message.error, (Cancelled, KeyboardInterrupt)) else 1)

    # -- leaving ----------------------------------------------------------------------------------

    def exit(self, result: int | None = None, return_code: int = 0, message: object = None) -> None:
        """Leave; a load or reply still running in a thread is told to stop."""
        self.load_cancel.set()
        if self.reply_cancel is not None:
            self.reply_cancel.set()
        super().exit(result, return_code, message)  # type: ignore[arg-type]

    async def action_quit(self) -> None:
        """ctrl+q: stop a streaming reply (it is saved) or a load, then leave."""
        chat = self.chat_screen
        if chat is not None:
            await chat.action_stop()
        if self.engine is None:
            self.load_cancel.set()
            if self.failure is None:
                self.failure = Cancelled("model load cancelled")
        self.exit(return_code=0 if self.engine is not None else 130)

    def shutdown(self, timeout: float = 60.0) -> None:
        """After `run()`: let the worker threads end, then free the model."""
        self.load_cancel.set()
        if self.reply_cancel is not None:
            self.reply_cancel.set()
        self.load_done.wait(timeout)
        if self.engine_lock.acquire(timeout=timeout):
            try:
                if self.engine is not None:
                    self.engine.close()
                    self.engine = None
            finally:
                self.engine_lock.release()


def make_app(
    engine_factory: EngineFactory,
    store: ChatStore,
    settings: SamplingSettings | None = None,
    **options: object,
) -> ChatApp:
    """Build the chat app (shared by `corral chat`, Pilot tests and snapshot tests)."""
    return ChatApp(engine_factory, store, settings, **options)  # type: ignore[arg-type]
