"""Chat templates are untrusted code: injection never runs, loops and explosions are stopped, the app survives."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import invoke
from .corpus_gguf import chat_template_gguf
from .corpus_inputs import PWNED_MARKER, template_payloads

PAYLOADS = sorted(template_payloads(Path("/x")))
# Through the real `ask` (a model load each, ~5 s): one of each kind. Every payload also runs on the formatter.
ASK_PAYLOADS = ("injection_globals", "injection_mro", "loop", "explode_replace", "syntax_error")
ASK = ["--ctx", "256", "--max-tokens", "2", "--temperature", "0", "--seed", "1"]


@pytest.fixture(scope="module")
def payload_models(mini_gguf_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The miniature model re-written once per payload, with the payload as its chat template."""
    folder = tmp_path_factory.mktemp("template-payloads")
    marker_dir = tmp_path_factory.mktemp("marker")
    models = {name: chat_template_gguf(mini_gguf_bf16, folder / f"{name}.gguf", src)
              for name, src in template_payloads(marker_dir).items()}
    return marker_dir, models


@pytest.mark.parametrize("payload", PAYLOADS)
def test_formatter_contains_payload(payload: str, tmp_path: Path) -> None:
    from corral.app.runtime.api import Message
    from corral.app.runtime.chat_format import ChatFormatter, builtin_llama3_prompt

    messages = [Message("user", "hello")]
    formatter = ChatFormatter(template_payloads(tmp_path)[payload])
    start = time.monotonic()
    text = formatter.format(messages)
    assert time.monotonic() - start < 15
    assert not (tmp_path / PWNED_MARKER).exists(), "template code escaped the sandbox"
    assert formatter.using_builtin and text == builtin_llama3_prompt(messages)
    assert len(formatter.warnings) == 1 and "built-in Llama 3" in formatter.warnings[0]


@pytest.mark.parametrize("payload", ASK_PAYLOADS)
def test_ask_survives_hostile_template(payload: str, payload_models: tuple[Path, dict[str, Path]]) -> None:
    marker_dir, models = payload_models
    start = time.monotonic()
    result = invoke(["ask", "-m", str(models[payload]), *ASK, "hello"])
    elapsed = time.monotonic() - start
    assert not (marker_dir / PWNED_MARKER).exists(), "template code escaped the sandbox"
    assert elapsed < 60, f"took {elapsed:.0f} s: the template was not stopped"
    assert result.exception is None, f"{type(result.exception).__name__}: {result.exception}"
    # the one outcome: the built-in Llama 3 format replaces the template, with one warning, and the reply comes
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip(), "no reply printed"
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len([w for w in warnings if "template" in w]) == 1, result.stderr
    assert any("template" in w and "built-in" in w for w in warnings), result.stderr
    assert not [ln for ln in result.stderr.splitlines() if ln.startswith("error:")], result.stderr
    assert "Traceback" not in result.stderr


def test_normal_template_gives_no_warning(mini_gguf_bf16: Path) -> None:
    """Control: the converted model's own template renders without a fallback warning."""
    result = invoke(["ask", "-m", str(mini_gguf_bf16), *ASK, "hello"])
    assert result.exit_code == 0, result.stderr
    assert "template" not in result.stderr


EXPLOSIONS = {
    "concat_doubling": "{% set ns = namespace(x='a') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}"
    "{% endfor %}{{ ns.x|length }}",
    "join_doubling": "{% set ns = namespace(x='a') %}{% for i in range(40) %}{% set ns.x = [ns.x, ns.x]|join %}"
    "{% endfor %}{{ ns.x|length }}",
    "list_doubling": "{% set ns = namespace(x=['a']) %}{% for i in range(40) %}{% set ns.x = ns.x + ns.x %}"
    "{% endfor %}{{ ns.x|length }}",
    "repeat": "{{ 'A' * 1000000000 }}",
    "replace_doubling": "{% set ns = namespace(x='aa') %}{% for i in range(40) %}"
    "{% set ns.x = ns.x|replace('a', ns.x) %}{% endfor %}{{ ns.x|length }}",
}
_PROBE = """
import resource, sys, time
from corral.app.runtime.chat_format import ChatFormatter, TemplateLimits
from corral.app.runtime.api import Message
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# a generous time budget, so that only the size guards (not the clock) can stop the growth: deterministic
f = ChatFormatter(sys.stdin.read(), limits=TemplateLimits(max_seconds=30.0))
t = time.monotonic()
text = f.format([Message("user", "hi")])
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
print(grew, round(time.monotonic() - t, 2), f.using_builtin, len(text))
"""


@pytest.mark.parametrize("name", sorted(EXPLOSIONS))
def test_template_explosion_is_bounded(name: str) -> None:
    """A template that builds a huge string is stopped by a size guard (isolated process, 3 GiB cap)."""
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
    proc = subprocess.run([sys.executable, "-c", limit + _PROBE], input=EXPLOSIONS[name].encode(),
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    grew_mb, seconds, fell_back, _ = proc.stdout.decode().split()
    assert fell_back == "True"
    assert float(seconds) < 20
    assert int(grew_mb) < 512, f"peak memory grew by {grew_mb} MiB before the template was stopped"
