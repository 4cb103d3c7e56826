"""The guarded Jinja sandbox that untrusted chat templates render in: size checks and limits.

jinja2's `ImmutableSandboxedEnvironment` stops attribute tricks and mutation; on top of it, every
operation that can build a huge value is checked before it runs: string repetition, powers, padding
and format widths, concatenation (`~`, `+`, `join`, captured blocks), `replace`, and anything that
prints, serializes or compares a container (a list built up by reference, `[x, x]` in a loop, is
small in memory but expands exponentially when printed, and C code cannot be interrupted).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator, Frame, operators, optimizeconst
from jinja2.filters import make_attrgetter
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from corral.convert.errors import TemplateError


@dataclass(frozen=True)
class TemplateLimits:
    """Bounds on what rendering a chat template may cost."""

    max_template_chars: int = 256 * 1024
    base_output_chars: int = 1024 * 1024  # plus `output_per_input` x the conversation's characters
    output_per_input: int = 4
    max_seconds: float = 2.0
    max_int_arg: int = 100_000  # widths, repeat counts and similar arguments
    max_int_bits: int = 65_536  # integers that `**` and `*` may build (Python cannot print > ~14000 bits anyway)


class LimitExceeded(TemplateError):
    """A chat template went past one of its size or time limits."""


class _GenerationBlock(jinja2.ext.Extension):
    """Accept Hugging Face's `{% generation %}...{% endgeneration %}` marker and render its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the `generation` name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


_PRINTF_WIDTH = re.compile(r"%[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_WIDTH = re.compile(r"\{[^{}]*?:[^{}]*?(\d+)[^{}]*\}")


class _GuardedCodeGenerator(CodeGenerator):
    """Jinja's code generator, except that `a ~ b` and comparison operands go through size checks."""

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

    @optimizeconst
    def visit_Compare(self, node: jinja2.nodes.Compare, frame: Frame) -> None:
        # like jinja2 3.1's visit_Compare, each operand first passes `compared` (C-level comparison is uninterruptible)
        self.write("(environment.compared(")
        self.visit(node.expr, frame)
        self.write(")")
        for op in node.ops:
            self.write(f" {operators[op.op]} environment.compared(")
            self.visit(op.expr, frame)
            self.write(")")
        self.write(")")


_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))
_CONTAINERS = (list, tuple, dict, set, frozenset, Namespace, *_VIEWS)


def _unwrap(obj: Any) -> tuple[Any, int]:
    """The object whose children print for `obj`, and the extra characters around them."""
    if isinstance(obj, Namespace):  # prints as "<Namespace {...}>"
        return object.__getattribute__(obj, "_Namespace__attrs"), 12
    if isinstance(obj, _VIEWS):
        return obj.mapping, 12  # type: ignore[attr-defined]
    return obj, 0


def _leaf_chars(value: Any) -> int:
    """A lower bound on the printed length of a non-container inside a container (strings print quoted)."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, int) and not isinstance(value, bool):
        return max(1, value.bit_length() * 3 // 10)
    return 1


def expanded_chars(value: Any, cap: int) -> int:
    """About how many characters str(value) makes, found without building it; stops once past `cap`.

    A container that holds the same sub-object many times (`[x, x]`, built up by reference in a loop)
    costs little memory but prints every copy: each appearance counts in full. Sizes are memoized by
    id() (every object stays alive inside `value` during the walk), so the walk costs O(unique nodes).
    The walk is iterative (no recursion limit); a container that contains itself counts once.
    """
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, _CONTAINERS):
        return len(str(value))
    memo: dict[int, int] = {}
    active: set[int] = set()
    # stack frames: [container, iterator over its children, characters so far]
    stack: list[list[Any]] = []

    def push(container: Any) -> None:
        obj, extra = _unwrap(container)
        if isinstance(obj, dict):
            children = (x for item in obj.items() for x in item)  # keys and values, no transient tuples
            base = 2 + 2 * len(obj) + 2 * max(len(obj) - 1, 0)  # braces, ": " per item, ", " between items
        else:
            children = iter(obj)
            base = 2 + 2 * max(len(obj) - 1, 0)
        active.add(id(obj))
        stack.append([obj, children, base + extra])

    push(value)
    while stack:
        frame = stack[-1]
        for child in frame[1]:
            if isinstance(child, _CONTAINERS):
                key = id(_unwrap(child)[0])
                if key in memo:
                    frame[2] += memo[key]
                elif key in active:
                    frame[2] += 5  # "[...]": Python prints a cycle once
                else:
                    push(child)
                    break
            else:
                frame[2] += _leaf_chars(child)
            if frame[2] > cap:
                return frame[2]
        else:
            stack.pop()
            obj, _, size = frame
            active.discard(id(obj))
            memo[id(obj)] = size
            if size > cap:
                return size
            if stack:
                stack[-1][2] += size
            else:
                return size
    return 0  # pragma: no cover - the loop always returns


class GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus size checks on the operations that can make huge values."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _GuardedCodeGenerator
    _PRE_CHECKED = ("center", "indent", "wordwrap", "format", "replace", "truncate")
    # filters that print, serialize, flatten or compare their arguments: containers are size-checked first
    _EXPANDING = frozenset({
        "tojson", "string", "join", "list", "sum", "pprint", "safe", "e", "escape", "forceescape", "format",
        "unique", "sort", "dictsort", "groupby", "min", "max", "urlencode", "xmlattr", "center", "indent",
        "wordwrap", "truncate", "upper", "lower", "title", "capitalize", "trim", "striptags", "wordcount",
        "urlize", "replace",
    })  # fmt: skip
    _COMPARING_TESTS = frozenset({"eq", "equalto", "==", "ne", "!=", "lt", "lessthan", "<", "le", "<=", "gt",
                                  "greaterthan", ">", "ge", ">=", "in"})

    def __init__(self, limits: TemplateLimits) -> None:
        super().__init__(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
            finalize=self.finalize_checked,
        )
        self.limits = limits
        self.max_value_chars = limits.base_output_chars
        self.filters["tojson"] = _tojson
        self.filters["join"] = self._guarded_join(self.filters["join"])
        # every filter's result is size-checked; the amplifying ones are also checked before they run
        for name in list(self.filters):
            self.filters[name] = self._guard_callable(self.filters[name], name)
        for name in self._COMPARING_TESTS & set(self.tests):
            self.tests[name] = self._guard_test(self.tests[name], name)

    def _too_big(self, what: str) -> LimitExceeded:
        return LimitExceeded(f"chat template exceeded its limits ({what})")

    def _check_int(self, value: Any, what: str) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > self.limits.max_int_arg:
            raise self._too_big(f"{what} argument {value}")

    def _check_len(self, n: int, what: str) -> None:
        if n > self.max_value_chars:
            raise self._too_big(f"{what} would make {n} items")

    def _text_len(self, value: Any, what: str) -> int:
        """Printed length of `value`, refused before printing when it would pass the output cap."""
        if isinstance(value, str):
            return len(value)
        n = expanded_chars(value, self.max_value_chars)
        self._check_len(n, what)
        return n

    def _check_expanded(self, value: Any, what: str) -> Any:
        """Refuse a container that would expand past the output cap when printed, compared or serialized."""
        if isinstance(value, _CONTAINERS):
            self._text_len(value, what)
        return value

    def compared(self, value: Any) -> Any:
        """An operand of `==`, `<`, `in` ...: comparing containers walks them in C, so bound their size."""
        return value if isinstance(value, str) else self._check_expanded(value, "comparison")

    def finalize_checked(self, value: Any) -> Any:
        """`{{ value }}`: check a container's printed size before jinja turns it into a string."""
        return value if isinstance(value, str) else self._check_expanded(value, "output")

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
        self._check_len(sum(self._text_len(v, "concatenation") for v in values), "concatenation")
        return join(values)

    def concat(self, parts: Any) -> str:  # type: ignore[override]
        """Captured block output (`{% set x %}`, macros, filter blocks), size-checked before joining."""
        parts = list(parts)
        self._check_len(sum(self._text_len(p, "captured block") for p in parts), "captured block")
        return "".join(parts)

    def _guarded_join(self, join: Callable[..., str]) -> Callable[..., str]:
        @jinja2.pass_eval_context
        def guarded(eval_ctx: Any, value: Any, d: str = "", attribute: str | int | None = None) -> str:
            items = list(value)
            shown = items if attribute is None else map(make_attrgetter(self, attribute), items)
            self._check_len(sum(self._text_len(x, "join") for x in shown) + self._text_len(d, "join") * max(len(items) - 1, 0),
                            "join")
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
            self._check_expanded(right, "format")
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
                for value in (*args, *kwargs.values()):
                    self._check_expanded(value, method)
            elif method == "replace" and len(args) >= 2:
                old, new = str(args[0]), str(args[1])
                self._check_len(len(owner) // max(len(old), 1) * len(new) + len(owner), "replace")
            elif method == "expandtabs":
                tab = args[0] if args and isinstance(args[0], int) else 8
                self._check_len(len(owner) + owner.count("\t") * max(tab, 0), "expandtabs")
            elif method == "join" and args:
                parts = list(args[0]) if isinstance(args[0], (list, tuple, str)) else []
                self._check_len(sum(self._text_len(p, "join") for p in parts) + len(owner) * max(len(parts) - 1, 0),
                                "join")
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

        expanding = name in self._EXPANDING

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if expanding:
                for value in (*args, *kwargs.values()):
                    self._check_expanded(value, name)
            if pre_check:
                self._check_call(func, args[1:] if passes_context else args, kwargs, name)
            return self._check_result(func(*args, **kwargs), name)

        if passes_context:
            guarded.jinja_pass_arg = func.jinja_pass_arg  # type: ignore[attr-defined]
        return guarded

    def _guard_test(self, test: Callable[..., bool], name: str) -> Callable[..., bool]:
        def guarded(*args: Any, **kwargs: Any) -> bool:
            for value in (*args, *kwargs.values()):
                self._check_expanded(value, f"'{name}' test")
            return test(*args, **kwargs)

        return guarded

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self._check_call(__obj, args, kwargs, getattr(__obj, "__name__", "call"))
        return __self._check_result(super().call(__context, __obj, *args, **kwargs), "call")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Hugging Face renders `tojson` with json.dumps and no HTML escaping; templates expect that.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
