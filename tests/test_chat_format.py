"""Chat templates: rendering parity, the built-in Llama 3 format, and untrusted templates kept in their box."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from corral.app.runtime.api import Message
from corral.app.runtime.chat_format import (
    ChatFormatter,
    ChatTemplate,
    TemplateLimits,
    TemplateRaised,
    builtin_llama3_prompt,
    drop_oldest_turns,
    expanded_chars,
)
from corral.convert.errors import TemplateError, UsageError
from corral.convert.llama3_tokenizer import LLAMA3_CHAT_TEMPLATE
from tests.helpers.templates import EXPLOSIONS

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


@pytest.mark.parametrize("name", sorted(EXPLOSIONS))
def test_explosive_templates_are_stopped_by_their_guards(name: str) -> None:
    expected = {"output": "output passed", "recursion": "recursed"}.get(name, "exceeded its limits")
    # caught by its guard, not by the clock (whose error says "took longer than"): the clock gets 30 s so that a
    # loaded machine cannot change which one fires. How fast the guards are: bench/bench_latency.py.
    with pytest.raises(TemplateError, match=expected):
        ChatTemplate(EXPLOSIONS[name], TemplateLimits(max_seconds=30.0)).render(CHAT, bos_token=BOS, eos_token=EOT)


def test_guarded_operators_still_work() -> None:
    source = ("{% macro tag(r) %}<{{ r }}>{% endmacro %}{% set blk %}[{{ 7 ~ 'x' }}]{% endset %}"
              "{% for m in messages %}{{ tag(m.role) ~ m.content|trim ~ eos_token }}{% endfor %}"
              "{{ messages|map(attribute='role')|join('/') }}|{{ [1, 2]|join(', ') }}|{{ ''.join(['a', 'b']) }}"
              "|{{ blk }}|{{ 2 ** 60 }}|{{ 3 * 4 }}|{{ '%s-%s' % ('a', 'b') }}|{{ 'a\\tb'.expandtabs(2) }}")
    text = ChatTemplate(source).render(CHAT[1:3], bos_token=BOS, eos_token=EOT)
    assert text == ("<user>Hi there<|eot_id|><assistant>Hello!<|eot_id|>user/assistant|1, 2|ab|[7x]"
                    f"|{2 ** 60}|12|a-b|a b")


def test_expanded_size_counts_shared_parts_without_building_them() -> None:
    from jinja2.utils import Namespace

    shared: list = [1]
    for _ in range(16):
        shared = [shared, shared]
    assert expanded_chars(shared, 10**9) == len(str(shared)) == 458_748
    mixed = [1, [2, "ab"], {"k": (3,)}, "q", (), {}]
    assert len(str(mixed)) - 4 <= expanded_chars(mixed, 10**9) <= len(str(mixed))
    ns = Namespace(a=[1, 2], b="x")
    assert expanded_chars(ns, 10**9) == len(str(ns))
    for _ in range(184):  # 200 doublings in all: 201 distinct lists, about 2**200 characters when printed
        shared = [shared, shared]
    # printing it would take 2**200 steps: that these return at all shows shared parts are counted once
    assert expanded_chars(shared, 10**100) > 2**200
    assert expanded_chars(shared, 1000) <= 2000  # stops soon after passing the cap
    deep: list = []
    for _ in range(100_000):  # deeper than Python's recursion limit: the walk is iterative
        deep = [deep]
    assert expanded_chars(deep, 10**9) == 200_002


def test_small_containers_still_print_and_compare() -> None:
    source = ("{% set ns = namespace(l=[1, 'a']) %}{{ ns.l }}|{{ {'k': ns.l}|tojson }}|{{ ns.l == [1, 'a'] }}"
              "|{{ 'a' in ns.l }}|{{ ns.l is eq([1]) }}|{{ ns.l|join('-') }}|{{ 'x' ~ ns.l }}|{{ '%s' % (ns.l,) }}"
              "|{{ ns.l|string }}|{{ messages|map(attribute='role')|list }}")
    text = ChatTemplate(source).render(CHAT[1:3], bos_token=BOS, eos_token=EOT)
    assert text == ("[1, 'a']|{\"k\": [1, \"a\"]}|True|True|False|1-a|x[1, 'a']|[1, 'a']|[1, 'a']"
                    "|['user', 'assistant']")


# A list built by reference: 40 doublings of `[x, x]` hold 41 small lists in memory, but printing,
# serializing or comparing one walks 2**40 elements in C code that the time budget cannot interrupt.
BY_REFERENCE = "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
TWICE = BY_REFERENCE + "{% set a = ns.l %}{% set ns.l = [1] %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l] %}" \
    "{% endfor %}"
SHARED_EXPLOSIONS = {
    "print": BY_REFERENCE + "{{ ns.l }}",
    "tilde": BY_REFERENCE + "{{ 'x' ~ ns.l }}",
    "tojson": BY_REFERENCE + "{{ ns.l | tojson }}",
    "string": BY_REFERENCE + "{{ ns.l | string | length }}",
    "join": BY_REFERENCE + "{{ ns.l | join(',') }}",
    "printf": BY_REFERENCE + "{{ '%s' % (ns.l,) }}",
    "format_method": BY_REFERENCE + "{{ '{}'.format(ns.l) }}",
    "captured": BY_REFERENCE + "{% set t %}{{ ns.l }}{% endset %}{{ t | length }}",
    "compare": TWICE + "{{ a == ns.l }}",
    "eq_test": TWICE + "{{ a is eq(ns.l) }}",
    "in": BY_REFERENCE + "{{ [1] in ns.l }}",
    "dict": "{% set ns = namespace(d={}) %}{% for i in range(40) %}{% set ns.d = {'a': ns.d, 'b': ns.d} %}"
    "{% endfor %}{{ ns.d }}",
    "namespace": "{% set ns = namespace(n=namespace()) %}{% for i in range(40) %}"
    "{% set ns.n = namespace(a=ns.n, b=ns.n) %}{% endfor %}{{ ns }}",
    "varargs": "{% set ns = namespace(l=1) %}{% macro m() %}{% set ns.l = varargs %}{% endmacro %}"
    "{% for i in range(40) %}{{ m(ns.l, ns.l) }}{% endfor %}{{ ns.l }}",
}
_SHARED_PROBE = """
import json, resource, sys, time
from corral.app.runtime.chat_format import ChatFormatter, TemplateLimits
from corral.app.runtime.api import Message
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {}
for name, source in json.loads(sys.stdin.read()).items():
    # a generous time budget, so that only the size guards (not the clock) can stop the expansion
    f = ChatFormatter(source, limits=TemplateLimits(max_seconds=30.0))
    t = time.monotonic()
    f.format([Message("user", "hi")])
    out[name] = [round(time.monotonic() - t, 3), f.using_builtin, f.warnings[-1] if f.warnings else ""]
out["grew_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
print(json.dumps(out))
"""


def test_containers_built_by_reference_are_refused_before_they_expand() -> None:
    """Each case falls back quickly, with the size guard's reason (isolated process, 3 GiB address space)."""
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
    proc = subprocess.run([sys.executable, "-c", limit + _SHARED_PROBE], input=json.dumps(SHARED_EXPLOSIONS).encode(),
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = json.loads(proc.stdout)
    assert out.pop("grew_mb") < 128
    assert sorted(out) == sorted(SHARED_EXPLOSIONS)
    for name, (seconds, fell_back, warning) in out.items():
        # the size guard's reason, not the 30 s clock's ("took longer than"); how fast: bench/bench_latency.py
        assert fell_back and "exceeded its limits" in warning, (name, warning)
        assert seconds < 30.0, (name, seconds)


def test_endless_loop_hits_the_time_limit_and_tracing_is_restored() -> None:
    before = sys.gettrace()
    looping = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(TemplateError, match="longer than 0.3 s"):
        ChatTemplate(looping, TemplateLimits(max_seconds=0.3)).render(CHAT, bos_token=BOS, eos_token=EOT)
    assert 0.3 <= time.monotonic() - start < 30.0  # not before the budget; the upper bound is a hang guard
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
