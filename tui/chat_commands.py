"""The chat screen's commands that open other screens: conversation list, export, settings, memory, help."""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.convert.errors import CorralError

from .conversation_list import ConversationListScreen, ListChoice, export_conversation
from .help_screen import HelpScreen
from .memory_view import MemoryScreen
from .settings_screen import ChatSettings, SettingsScreen

if TYPE_CHECKING:
    from .app import ChatApp


class ChatCommands:
    """Mixed into ChatScreen (which provides chat_app, conversation_id, system_prompt and the chat actions)."""

    if TYPE_CHECKING:
        chat_app: ChatApp
        conversation_id: int | None
        system_prompt: str
        app: ChatApp

        def notify(self, message: str, *, severity: str = "information") -> None: ...
        def _refresh_context(self) -> None: ...
        async def action_new_conversation(self) -> None: ...
        async def load_conversation(self, conversation_id: int) -> None: ...

    def action_conversations(self) -> None:
        screen = ConversationListScreen(self.chat_app.store, self.chat_app.export_dir, self.conversation_id)
        self.app.push_screen(screen, self._on_list_closed)

    async def _on_list_closed(self, choice: ListChoice | None) -> None:
        if self.conversation_id is not None:
            try:
                self.chat_app.store.get(self.conversation_id)
            except CorralError:  # deleted from the list
                await self.action_new_conversation()
        if choice is None:
            return
        if choice.conversation_id is None:
            await self.action_new_conversation()
        elif choice.conversation_id != self.conversation_id:
            await self.load_conversation(choice.conversation_id)

    def action_export(self) -> None:
        if self.conversation_id is None:
            self.notify("nothing to export yet", severity="warning")
            return
        try:
            path = export_conversation(self.chat_app.store, self.conversation_id, self.chat_app.export_dir)
        except (CorralError, OSError) as exc:
            self.notify(str(exc), severity="error")
            return
        self.notify(f"exported to {path}")

    def action_settings(self) -> None:
        current = ChatSettings(self.system_prompt, self.chat_app.sampling)
        self.app.push_screen(SettingsScreen(current), self._on_settings)

    def _on_settings(self, result: ChatSettings | None) -> None:
        if result is None:
            return
        app = self.chat_app
        app.sampling = result.sampling
        if result.system_prompt != self.system_prompt:
            self.system_prompt = result.system_prompt
            app.system_prompt = result.system_prompt
            if self.conversation_id is not None:
                try:
                    app.store.set_system_prompt(self.conversation_id, result.system_prompt)
                except CorralError as exc:
                    self.notify(str(exc), severity="error")
            self._refresh_context()
        self.notify("settings saved")

    def action_memory(self) -> None:
        app = self.chat_app
        plan = app.engine.plan if app.engine is not None else None
        self.app.push_screen(MemoryScreen(plan, app.memory_probe, interval=app.memory_interval))

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen())
