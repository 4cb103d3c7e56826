"""Built-in texts: English that ships with every Python (the standard library's `pydoc_data.topics`).

One split, used everywhere, so nothing evaluates on what a model was trained or calibrated on by accident:
the documentation's paragraphs, in a fixed order, go one in ten to the held-out evaluation text and the rest to
the training text. The calibration text for importance matrices is a part of the training text, as llama.cpp's
users calibrate on training-like text.
"""

from __future__ import annotations

import functools
import re

CHUNK_TOKENS = 512  # the chunk (context) eval and imatrix read text in by default, as llama.cpp's tools do
HELD_OUT_EVERY = 10  # paragraph i is held out when i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
CALIBRATION_PARAGRAPHS = 600  # the first paragraphs of the training text


@functools.cache
def _paragraphs() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    return tuple(p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip())


def _join(paragraphs: tuple[str, ...] | list[str]) -> str:
    return "\n\n".join(paragraphs) + "\n"


def training_text() -> str:
    """Nine paragraphs in ten of the documentation (what the trained test models learn from)."""
    return _join([p for i, p in enumerate(_paragraphs()) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1])


def eval_text() -> str:
    """The held-out paragraphs: `corral eval`'s default text (about 48 kB)."""
    return _join([p for i, p in enumerate(_paragraphs()) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1])


def calibration_text() -> str:
    """`corral imatrix`'s default calibration text: the start of the training text."""
    train = [p for i, p in enumerate(_paragraphs()) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return _join(train[:CALIBRATION_PARAGRAPHS])
