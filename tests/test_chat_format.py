"""Chat templates: rendering parity, the built-in Llama 3 format, and untrusted templates kept in their box."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from corral.app.chat_format import (
    ChatFormatter,
    ChatTemplate,
    TemplateLimits,
    TemplateRaised,
    builtin_llama3_prompt,
    drop_oldest_turns,
)
from corral.app.engine_api import Message
from corral.convert.errors import TemplateError, UsageError
from corral.convert.llama3_tokenizer import LLAMA3_CHAT_TEMPLATE

BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"
CHAT = [Message("system", "  Be brief. "), Message("user", "Hi there\n"), Message("assistant", "Hello!"),
        Message("user", "Café? ✓")]

# Exercises what Meta's Llama 3.1 template uses: namespace, defaults, strftime_now, tojson, trim, loop controls.
RICH_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- set ns = namespace(system='') %}
{%- if messages[0]['role'] == 'system' %}{%- set ns.system = messages[0]['content'] | trim %}
{%- set messages = messages[1:] %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Today Date: ' + date_string + '\\n' + (strftime_now('%Y') | length | string) + '\\n\\n' }}
{{- ns.system + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if loop.index > 50 %}{% break %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if tools is not none %}{{ tools | tojson }}{% endif %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
{% generation %}{% endgeneration %}"""


def _reference(template: str, messages: list[Message]) -> str:
    fmt = Jinja2ChatFormatter(template=template, eos_token=EOT, bos_token=BOS)
    return fmt(messages=[{"role": m.role, "content": m.content} for m in messages]).prompt


@pytest.mark.parametrize("template", [LLAMA3_CHAT_TEMPLATE, RICH_TEMPLATE], ids=["llama3", "rich"])
def test_rendering_matches_llama_cpp_python(template: str) -> None:
    ours = ChatTemplate(template).render(CHAT, bos_token=BOS, eos_token=EOT)
    assert ours == _reference(template, CHAT)
    assert ours.count(BOS) == 1 and ours.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_builtin_format_equals_the_llama3_template() -> None:
    expected = ChatTemplate(LLAMA3_CHAT_TEMPLATE).render(CHAT, bos_token=BOS, eos_token=EOT)
    assert builtin_llama3_prompt(CHAT) == expected
    assert builtin_llama3_prompt([Message("user", "x")]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_tojson_keeps_unicode_like_transformers() -> None:
    template = "{{ messages | tojson }}"
    assert ChatTemplate(template).render([Message("user", "é")], bos_token=BOS, eos_token=EOT) == \
        '[{"role": "user", "content": "é"}]'


INJECTIONS = {
    "globals": "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "func_globals": "{{ raise_exception.__globals__['sys'].modules['os'].system('touch {marker}') }}",
    "format_attr": "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}",
    "mutate": "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}{{ messages | length }}",
    "import": "{% import 'os' as os %}{{ os }}",
}


@pytest.mark.parametrize("name", sorted(INJECTIONS))
def test_injection_payloads_do_not_run(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    source = INJECTIONS[name].replace("{marker}", str(marker))
    with pytest.raises(TemplateError):
        ChatTemplate(source).render(CHAT, bos_token=BOS, eos_token=EOT)
    assert not marker.exists()


def test_formatter_falls_back_with_a_warning(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    fmt = ChatFormatter(INJECTIONS["globals"].replace("{marker}", str(marker)))
    assert fmt.format(CHAT) == builtin_llama3_prompt(CHAT)
    assert fmt.using_builtin and not marker.exists()
    assert len(fmt.warnings) == 1 and "unsafe" in fmt.warnings[0] and "built-in Llama 3" in fmt.warnings[0]
    assert fmt.format(CHAT) == builtin_llama3_prompt(CHAT) and len(fmt.warnings) == 1  # warned once


@pytest.mark.parametrize("source", [None, "", "{% for %}", "x" * 300_000], ids=["none", "empty", "syntax", "huge"])
def test_missing_or_broken_templates_fall_back(source: str | None) -> None:
    fmt = ChatFormatter(source)
    assert fmt.using_builtin and fmt.format(CHAT) == builtin_llama3_prompt(CHAT)
    assert fmt.warnings and "built-in Llama 3" in fmt.warnings[0]


EXPLOSIONS = {
    "repeat": "{{ 'a' * 1000000000 }}",
    "power": "{{ 2 ** 999999999 }}",
    "center": "{{ 'x' | center(1000000000) }}",
    "indent": "{{ 'x\ny' | indent(1000000000) }}",
    "printf": "{{ '%999999999d' % 1 }}",
    "format_method": "{{ '{:>999999999}'.format(1) }}",
    "format_filter": "{{ '%0999999999d' | format(1) }}",
    "ljust": "{{ 'x'.ljust(1000000000) }}",
    "doubling": "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "replace": "{% set s = 'x' * 90000 %}{% set t = 'y' * 90000 %}{{ s | replace('x', t) }}",
    "output": "{% for i in range(100000) %}{{ 'y' * 90000 }}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "tilde_doubling": "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "join_doubling": "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = [ns.s, ns.s]|join %}"
    "{% endfor %}",
    "str_join_doubling": "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ''.join([ns.s, ns.s]) %}"
    "{% endfor %}",
    "block_doubling": "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set t %}{{ ns.s }}{{ ns.s }}{% endset %}"
    "{% set ns.s = t %}{% endfor %}",
    "format_doubling": "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = '{0}{0}'.format(ns.s) %}"
    "{% endfor %}",
    "list_sum_doubling": "{% set ns = namespace(s=['a']) %}{% for i in range(60) %}{% set ns.s = [ns.s, ns.s]|sum(start=[]) %}"
    "{% endfor %}",
    "squaring": "{% set ns = namespace(n=3) %}{% for i in range(60) %}{% set ns.n = ns.n ** 2 %}{% endfor %}",
    "int_product": "{% set ns = namespace(n=3) %}{% for i in range(60) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "expandtabs": "{{ ('\\t' * 100000).expandtabs(100000) }}",
    "indent_lines": "{{ ('\\n' * 100000) | indent(99999) }}",
}


@pytest.mark.parametrize("name", sorted(EXPLOSIONS))
def test_explosive_templates_are_stopped_quickly(name: str) -> None:
    expected = {"output": "output passed", "recursion": "recursed"}.get(name, "exceeded its limits")
    start = time.monotonic()
    with pytest.raises(TemplateError, match=expected):  # caught by its guard, not by the clock
        ChatTemplate(EXPLOSIONS[name]).render(CHAT, bos_token=BOS, eos_token=EOT)
    assert time.monotonic() - start < 1.5


def test_guarded_operators_still_work() -> None:
    source = ("{% macro tag(r) %}<{{ r }}>{% endmacro %}{% set blk %}[{{ 7 ~ 'x' }}]{% endset %}"
              "{% for m in messages %}{{ tag(m.role) ~ m.content|trim ~ eos_token }}{% endfor %}"
              "{{ messages|map(attribute='role')|join('/') }}|{{ [1, 2]|join(', ') }}|{{ ''.join(['a', 'b']) }}"
              "|{{ blk }}|{{ 2 ** 60 }}|{{ 3 * 4 }}|{{ '%s-%s' % ('a', 'b') }}|{{ 'a\\tb'.expandtabs(2) }}")
    text = ChatTemplate(source).render(CHAT[1:3], bos_token=BOS, eos_token=EOT)
    assert text == ("<user>Hi there<|eot_id|><assistant>Hello!<|eot_id|>user/assistant|1, 2|ab|[7x]"
                    f"|{2 ** 60}|12|a-b|a b")


def test_endless_loop_hits_the_time_limit_and_tracing_is_restored() -> None:
    before = sys.gettrace()
    looping = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(TemplateError, match="longer than 0.3 s"):
        ChatTemplate(looping, TemplateLimits(max_seconds=0.3)).render(CHAT, bos_token=BOS, eos_token=EOT)
    assert 0.3 <= time.monotonic() - start < 2.0
    assert sys.gettrace() is before


def test_raise_exception_is_a_usage_error_not_a_fallback() -> None:
    fmt = ChatFormatter("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateRaised, match="roles must alternate") as info:
        fmt.format(CHAT)
    assert isinstance(info.value, UsageError) and not fmt.using_builtin


def test_drop_oldest_turns_keeps_system_and_newest() -> None:
    msgs = [Message("system", "s"), Message("user", "1"), Message("assistant", "2"), Message("user", "3")]
    kept, dropped = drop_oldest_turns(msgs, lambda ms: len(ms) <= 2)
    assert dropped == 2 and [m.content for m in kept] == ["s", "3"]
    kept, dropped = drop_oldest_turns(msgs, lambda ms: False)
    assert [m.content for m in kept] == ["s", "3"] and dropped == 2
