"""One status line: model, context used / total, last prompt and generation speed, and what is happening."""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static

from corral.app.runtime.api import GenerationStats


class StatusBar(Static):
    """`model │ ctx used/total │ prompt X tok/s │ gen Y tok/s │ state`."""

    model = reactive("")
    ctx_used = reactive(0)
    ctx_total = reactive(0)
    prompt_tps = reactive(-1.0)
    gen_tps = reactive(-1.0)
    state = reactive("")
    draft = reactive("")  # speculative decoding: the last reply's accepted/drafted tokens

    def __init__(self, **kwargs: object) -> None:
        super().__init__("", markup=False, **kwargs)  # type: ignore[arg-type]

    def show_stats(self, stats: GenerationStats) -> None:
        self.ctx_used = stats.prompt_tokens + stats.completion_tokens
        self.prompt_tps = stats.prompt_tokens_per_second
        self.gen_tps = stats.tokens_per_second
        self.draft = (f"draft {stats.accepted_tokens}/{stats.drafted_tokens} ({stats.acceptance_rate:.0%})"
                      if stats.drafted_tokens else "")

    def line(self) -> str:
        parts = [self.model or "no model", f"ctx {self.ctx_used:,}/{self.ctx_total:,}"]
        if self.prompt_tps >= 0:
            parts.append(f"prompt {self.prompt_tps:.1f} tok/s")
        if self.gen_tps >= 0:
            parts.append(f"gen {self.gen_tps:.1f} tok/s")
        if self.draft:
            parts.append(self.draft)
        if self.state:
            parts.append(self.state)
        return " │ ".join(parts)

    def render(self) -> str:  # type: ignore[override]
        return self.line()
