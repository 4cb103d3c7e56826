"""Tool definitions for the tool-use tests, and Meta's Llama 3.1 chat template when llama.cpp's sources are here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                         "parameters": {"type": "object", "properties": {}}}}
OFFICIAL_TEMPLATE = "models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja"


def official_llama31_template() -> str:
    """The chat template Meta publishes with Llama 3.1 8B Instruct, from llama.cpp's vendored sources (or skip)."""
    converter = os.environ.get("CORRAL_REF_CONVERTER", "")
    candidates = [Path(converter).parent / OFFICIAL_TEMPLATE] if converter else []
    root = Path(__file__).resolve().parents[2]
    candidates.append(root / ".venv/reference/llama_cpp_python-0.3.36/vendor/llama.cpp" / OFFICIAL_TEMPLATE)
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    pytest.skip("Llama 3.1's official chat template not found (set CORRAL_REF_CONVERTER or run `make venv`)")
    raise AssertionError  # unreachable
