"""F2: edit the system prompt and the sampling settings (temperature, top-p, max tokens, seed)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from corral.app.runtime.api import SamplingSettings


@dataclass(frozen=True)
class ChatSettings:
    system_prompt: str
    sampling: SamplingSettings


def parse_sampling(temperature: str, top_p: str, max_tokens: str, seed: str) -> SamplingSettings:
    """Validate the form fields; ValueError names the bad field."""
    try:
        temp = float(temperature)
    except ValueError:
        raise ValueError("temperature must be a number") from None
    if not 0.0 <= temp <= 5.0:
        raise ValueError("temperature must be between 0 and 5")
    try:
        top = float(top_p)
    except ValueError:
        raise ValueError("top-p must be a number") from None
    if not 0.0 < top <= 1.0:
        raise ValueError("top-p must be in (0, 1]")
    try:
        tokens = int(max_tokens)
    except ValueError:
        raise ValueError("max tokens must be a whole number") from None
    if tokens < 0:
        raise ValueError("max tokens must be 0 (until the context is full) or more")
    seed_value: int | None
    if seed.strip() in ("", "random"):
        seed_value = None
    else:
        try:
            seed_value = int(seed)
        except ValueError:
            raise ValueError("seed must be a whole number or empty (random)") from None
    return SamplingSettings(temperature=temp, top_p=top, max_tokens=tokens, seed=seed_value)


class SettingsScreen(ModalScreen[ChatSettings | None]):
    """A form; ctrl+s or Save applies, escape cancels."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, current: ChatSettings) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        s = self.current.sampling
        with Vertical(id="settings-box"):
            yield Static("Settings", id="settings-title")
            yield Label("System prompt (applies to this conversation and new ones)")
            yield TextArea(self.current.system_prompt, id="system-prompt", soft_wrap=True)
            with Horizontal(classes="fields"):
                with Vertical():
                    yield Label("Temperature")
                    yield Input(str(s.temperature), id="temperature")
                with Vertical():
                    yield Label("Top-p")
                    yield Input(str(s.top_p), id="top-p")
                with Vertical():
                    yield Label("Max tokens (0 = ∞)")
                    yield Input(str(s.max_tokens), id="max-tokens")
                with Vertical():
                    yield Label("Seed (empty = random)")
                    yield Input("" if s.seed is None else str(s.seed), id="seed")
            with Horizontal(classes="buttons"):
                yield Button("Save (ctrl+s)", id="save", variant="primary")
                yield Button("Cancel (esc)", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()

    def action_save(self) -> None:
        def value(name: str) -> str:
            return self.query_one(f"#{name}", Input).value

        try:
            sampling = parse_sampling(value("temperature"), value("top-p"), value("max-tokens"), value("seed"))
        except ValueError as exc:
            self.notify(str(exc), severity="error")
            return
        system = self.query_one("#system-prompt", TextArea).text
        self.dismiss(ChatSettings(system_prompt=system.strip(), sampling=sampling))

    def action_cancel(self) -> None:
        self.dismiss(None)
