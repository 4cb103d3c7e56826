"""Explosive chat templates: each must be stopped by a size, depth or output guard of the template sandbox,
long before its clock (tests/test_chat_format.py checks which guard; bench/bench_latency.py how fast)."""

from __future__ import annotations

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
