"""`python -m tests.helpers.trained`: build (or find) every trained model and print its held-out quality."""

from __future__ import annotations

import time

from . import NAMES, quality, trained_hf


def main() -> None:
    for name in NAMES:
        t0 = time.monotonic()
        path = trained_hf(name)
        q = quality(name)
        m, u = q["model"], q["unigram"]
        print(f"{name:12s} acc {m['accuracy']:.3f} ppl {m['ppl']:8.2f} | unigram acc {u['accuracy']:.3f} "
              f"ppl {u['ppl']:8.2f} | {m['tokens']} held-out tokens, trained in {q['train_seconds']} s "
              f"({time.monotonic() - t0:.1f} s now) | {path}")


if __name__ == "__main__":
    main()
