"""Chat prompts: the GGUF's own template rendered in a guarded Jinja sandbox, or our built-in Llama 3 format.

Chat templates come from downloaded model files, so they are untrusted code. They render only in
jinja2's `ImmutableSandboxedEnvironment` (no attribute tricks, no mutation of lists or dicts), with
our own limits on top: operators and string methods that could build huge strings are checked
before they run, the output is capped, and a time budget is enforced from a per-thread trace hook
(it works in worker threads too, unlike signals). A template that breaks any rule is reported as a
`TemplateError`; `ChatFormatter` then falls back to the built-in Llama 3 format with a warning.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.filters import make_attrgetter
from jinja2.sandbox import ImmutableSandboxedEnvironment

from corral.convert.errors import TemplateError

from .engine_api import Message

BOS_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT_TEXT = "<|eot_id|>"
# Llama 3.1 ends a turn with <|eot_id|>, a tool call with <|eom_id|>, a base-model text with <|end_of_text|>.
LLAMA3_STOP_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


@dataclass(frozen=True)
class TemplateLimits:
    """Bounds on what rendering a chat template may cost."""

    max_template_chars: int = 256 * 1024
    base_output_chars: int = 1024 * 1024  # plus `output_per_input` x the conversation's characters
    output_per_input: int = 4
    max_seconds: float = 2.0
    max_int_arg: int = 100_000  # widths, repeat counts and similar arguments
    max_int_bits: int = 65_536  # integers that `**` and `*` may build (Python cannot print > ~14000 bits anyway)


class TemplateRaised(TemplateError):
    """The template itself rejected the conversation (`raise_exception`)."""


class _LimitExceeded(TemplateError):
    pass


def builtin_llama3_prompt(messages: Sequence[Message], *, bos_token: str = BOS_TEXT) -> str:
    """Our own Llama 3 chat format: BOS, then header + trimmed content + <|eot_id|> per turn, then the reply header."""
    parts = [bos_token]
    for message in messages:
        parts.append(f"{START_HEADER}{message.role}{END_HEADER}\n\n{message.content.strip()}{EOT_TEXT}")
    parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
    return "".join(parts)


class _GenerationBlock(jinja2.ext.Extension):
    """Accept Hugging Face's `{% generation %}...{% endgeneration %}` marker and render its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the `generation` name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


_PRINTF_WIDTH = re.compile(r"%[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_WIDTH = re.compile(r"\{[^{}]*?:[^{}]*?(\d+)[^{}]*\}")


class _GuardedCodeGenerator(CodeGenerator):
    """Jinja's code generator, except that `a ~ b` goes through the environment's size check."""

    @optimizeconst
    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        # same join functions as jinja2 3.1's CodeGenerator.visit_Concat, wrapped in `concat_checked`
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func_name = "markup_join"
        else:
            func_name = "str_join"
        self.write(f"environment.concat_checked({func_name}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _text_len(value: Any) -> int:
    return len(value) if isinstance(value, str) else len(str(value))


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus size checks on the operations that can make huge values."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _GuardedCodeGenerator
    _PRE_CHECKED = ("center", "indent", "wordwrap", "format", "replace", "truncate")

    def __init__(self, limits: TemplateLimits) -> None:
        super().__init__(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
        )
        self.limits = limits
        self.max_value_chars = limits.base_output_chars
        self.filters["tojson"] = _tojson
        self.filters["join"] = self._guarded_join(self.filters["join"])
        # every filter's result is size-checked; the amplifying ones are also checked before they run
        for name in list(self.filters):
            self.filters[name] = self._guard_callable(self.filters[name], name)

    def _too_big(self, what: str) -> _LimitExceeded:
        return _LimitExceeded(f"chat template exceeded its limits ({what})")

    def _check_int(self, value: Any, what: str) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > self.limits.max_int_arg:
            raise self._too_big(f"{what} argument {value}")

    def _check_len(self, n: int, what: str) -> None:
        if n > self.max_value_chars:
            raise self._too_big(f"{what} would make {n} items")

    def _check_bits(self, bits: int, what: str) -> None:
        if bits > self.limits.max_int_bits:
            raise self._too_big(f"{what} would make a {bits}-bit integer")

    def _check_result(self, value: Any, what: str) -> Any:
        if isinstance(value, (str, list, tuple)):
            self._check_len(len(value), what)
        elif isinstance(value, int) and not isinstance(value, bool):
            self._check_bits(value.bit_length(), what)
        return value

    def _check_printf(self, spec: str) -> None:
        for width, precision in _PRINTF_WIDTH.findall(spec):
            for number in (width, precision):
                if number.isdigit():
                    self._check_int(int(number), "format width")
        for number in _FORMAT_WIDTH.findall(spec):
            self._check_int(int(number), "format width")

    def concat_checked(self, join: Callable[[Any], str], values: tuple[Any, ...]) -> str:
        """`a ~ b ~ ...`: refuse before joining when the result would pass the output cap."""
        self._check_len(sum(_text_len(v) for v in values), "concatenation")
        return join(values)

    def concat(self, parts: Any) -> str:  # type: ignore[override]
        """Captured block output (`{% set x %}`, macros, filter blocks), size-checked before joining."""
        parts = list(parts)
        self._check_len(sum(_text_len(p) for p in parts), "captured block")
        return "".join(parts)

    def _guarded_join(self, join: Callable[..., str]) -> Callable[..., str]:
        @jinja2.pass_eval_context
        def guarded(eval_ctx: Any, value: Any, d: str = "", attribute: str | int | None = None) -> str:
            items = list(value)
            shown = items if attribute is None else map(make_attrgetter(self, attribute), items)
            self._check_len(sum(_text_len(x) for x in shown) + _text_len(d) * max(len(items) - 1, 0), "join")
            return join(eval_ctx, items, d, attribute)

        return guarded

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (left, right))
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    self._check_len(len(seq) * max(count, 0), "repetition")
            if ints:
                self._check_bits(left.bit_length() + right.bit_length(), "multiplication")
        elif operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 64 and isinstance(left, (int, float)) and abs(left) > 1:
                raise self._too_big(f"power {right}")
            if ints and right > 0:
                self._check_bits(left.bit_length() * right, "power")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                self._check_len(len(left) + len(right), "concatenation")
        elif operator == "%" and isinstance(left, str):
            self._check_printf(left)
            for arg in right if isinstance(right, tuple) else (right,):
                self._check_int(arg, "format")
        return self._check_result(super().call_binop(context, operator, left, right), operator)

    def _check_call(self, obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> None:
        for value in (*args, *kwargs.values()):
            self._check_int(value, name)
        # the sandbox hands out str.format as a wrapper function; the bound method is its __wrapped__
        owner = getattr(obj, "__self__", None)
        if owner is None:
            owner = getattr(getattr(obj, "__wrapped__", None), "__self__", None)
        method = getattr(obj, "__name__", name)
        if isinstance(owner, str):
            if method in ("format", "format_map"):
                self._check_printf(owner)
            elif method == "replace" and len(args) >= 2:
                old, new = str(args[0]), str(args[1])
                self._check_len(len(owner) // max(len(old), 1) * len(new) + len(owner), "replace")
            elif method == "expandtabs":
                tab = args[0] if args and isinstance(args[0], int) else 8
                self._check_len(len(owner) + owner.count("\t") * max(tab, 0), "expandtabs")
            elif method == "join" and args:
                parts = list(args[0]) if isinstance(args[0], (list, tuple, str)) else []
                self._check_len(sum(_text_len(p) for p in parts) + len(owner) * max(len(parts) - 1, 0), "join")
        if name == "replace" and len(args) >= 3:
            text, old, new = str(args[0]), str(args[1]), str(args[2])
            self._check_len(len(text) // max(len(old), 1) * len(new) + len(text), "replace")
        if name == "indent" and args:
            width = args[1] if len(args) >= 2 else kwargs.get("width", 4)
            width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 4
            text = str(args[0])
            self._check_len(len(text) + (text.count("\n") + 1) * max(width, 0), "indent")
        if name == "format" and args:
            self._check_printf(str(args[0]))

    def _guard_callable(self, func: Callable[..., Any], name: str) -> Callable[..., Any]:
        passes_context = hasattr(func, "jinja_pass_arg")  # @pass_environment / @pass_eval_context filters
        pre_check = name in self._PRE_CHECKED

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if pre_check:
                self._check_call(func, args[1:] if passes_context else args, kwargs, name)
            return self._check_result(func(*args, **kwargs), name)

        if passes_context:
            guarded.jinja_pass_arg = func.jinja_pass_arg  # type: ignore[attr-defined]
        return guarded

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self._check_call(__obj, args, kwargs, getattr(__obj, "__name__", "call"))
        return __self._check_result(super().call(__context, __obj, *args, **kwargs), "call")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Hugging Face renders `tojson` with json.dumps and no HTML escaping; templates expect that.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt)[:200])


def _raise_exception(message: Any) -> None:
    raise TemplateRaised(f"the model's chat template rejected the conversation: {message}")


class _Deadline:
    """A trace hook that stops the current thread's Python code once a time budget is spent."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > self.end:
            raise _LimitExceeded(f"chat template took longer than {self.seconds:g} s")
        return self


class ChatTemplate:
    """A chat template compiled in the guarded sandbox."""

    def __init__(self, source: str, limits: TemplateLimits = TemplateLimits()) -> None:
        if not isinstance(source, str) or not source.strip():
            raise TemplateError("the chat template is empty")
        if len(source) > limits.max_template_chars:
            raise TemplateError(f"the chat template is {len(source)} characters (limit {limits.max_template_chars})")
        self.limits = limits
        self._env = _GuardedEnvironment(limits)
        try:
            self._template = self._env.from_string(source)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"the chat template does not compile: {exc.message} (line {exc.lineno})") from None
        except (RecursionError, MemoryError):
            raise TemplateError("the chat template is too complex to compile") from None

    def render(self, messages: Sequence[Message], *, bos_token: str, eos_token: str,
               add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; raise TemplateError on any failure or limit."""
        budget = self.limits.base_output_chars + self.limits.output_per_input * sum(len(m.content) for m in messages)
        self._env.max_value_chars = budget
        variables = {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "bos_token": bos_token,
            "eos_token": eos_token,
            "add_generation_prompt": add_generation_prompt,
            "raise_exception": _raise_exception,
            "strftime_now": _strftime_now,
            "tools": None,
            "functions": None,
            "function_call": None,
            "tool_choice": None,
        }
        chunks: list[str] = []
        size = 0
        previous = sys.gettrace()
        sys.settrace(_Deadline(self.limits.max_seconds))
        try:
            for chunk in self._template.generate(**variables):
                size += len(chunk)
                if size > budget:
                    raise _LimitExceeded(f"chat template output passed {budget} characters")
                chunks.append(chunk)
        except TemplateError:
            raise
        except SecurityError as exc:
            raise TemplateError(f"the chat template tried an unsafe operation: {exc}") from None
        except RecursionError:
            raise TemplateError("the chat template recursed too deeply") from None
        except MemoryError:
            raise TemplateError("the chat template ran out of memory") from None
        except Exception as exc:  # noqa: BLE001 - any failure of untrusted code is a template problem
            raise TemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None
        finally:
            sys.settrace(previous)
        return "".join(chunks)


@dataclass
class ChatFormatter:
    """Turns a conversation into prompt text: the model's template when it behaves, else our Llama 3 format."""

    template_source: str | None
    bos_token: str = BOS_TEXT
    eos_token: str = EOT_TEXT
    limits: TemplateLimits = TemplateLimits()
    warnings: list[str] = field(default_factory=list)
    _template: ChatTemplate | None = field(default=None, init=False, repr=False)
    _fallback: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.template_source is None:
            self._use_fallback("the model has no chat template")
            return
        try:
            self._template = ChatTemplate(self.template_source, self.limits)
        except TemplateError as exc:
            self._use_fallback(str(exc))

    @property
    def using_builtin(self) -> bool:
        return self._fallback

    def _use_fallback(self, why: str) -> None:
        self._fallback = True
        self._template = None
        self.warnings.append(f"{why}; using corral's built-in Llama 3 chat format")

    def format(self, messages: Sequence[Message]) -> str:
        """Prompt text ending with the assistant header; falls back (once, with a warning) on template failure."""
        if self._template is not None:
            try:
                return self._template.render(messages, bos_token=self.bos_token, eos_token=self.eos_token)
            except TemplateRaised:
                raise
            except TemplateError as exc:
                self._use_fallback(str(exc))
        return builtin_llama3_prompt(messages, bos_token=self.bos_token)


def drop_oldest_turns(messages: Sequence[Message], fits: Callable[[Sequence[Message]], bool]) -> tuple[list[Message], int]:
    """Drop the oldest non-system messages until `fits` holds or one message is left; return (kept, dropped)."""
    kept = list(messages)
    dropped = 0
    while not fits(kept):
        removable = [i for i, m in enumerate(kept) if m.role != "system"]
        if len(removable) <= 1:
            break
        del kept[removable[0]]
        dropped += 1
    return kept, dropped
