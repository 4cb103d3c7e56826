"""Opening a model and its context through llama.cpp's C API, with progress, cancellation and clear errors."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.app.runtime.native import LOG, NativeParams
from corral.app.runtime.native import lc as _lc
from corral.app.runtime.setup import last_log_line
from corral.convert.errors import Cancelled, EngineError


def open_model(path: Path, native: NativeParams, *, progress: Callable[[float], None] | None = None,
               cancel: threading.Event | None = None) -> tuple[Any, Any, list[str]]:
    """(model, context, llama.cpp's log of both) for `path` with `native`'s parameters; the caller owns and
    frees both. `progress` gets 0..1; setting `cancel` aborts the load (Cancelled)."""
    failure: list[BaseException] = []

    def on_progress(value: float, _user: Any) -> bool:
        if cancel is not None and cancel.is_set():
            return False
        try:
            if progress is not None:
                progress(float(value))
        except BaseException as exc:  # noqa: BLE001 - never let an exception cross into C
            failure.append(exc)
            return False
        return True

    callback = _lc.llama_progress_callback(on_progress)
    native.model.progress_callback = callback
    with LOG.collect() as load_log:
        model = _lc.llama_model_load_from_file(str(path).encode("utf-8"), native.model)
    if not model:
        if failure:
            raise failure[0]
        if cancel is not None and cancel.is_set():
            raise Cancelled("model loading cancelled", path=path)
        detail = last_log_line(load_log) or "see --verbose for llama.cpp's log"
        raise EngineError(f"llama.cpp could not load the model: {detail}", path=path)
    try:
        if native.context.n_ctx == 0:
            native.context.n_ctx = _lc.llama_model_n_ctx_train(model)
            native.context.n_batch = min(native.context.n_ctx, native.context.n_batch)
            native.n_batch = native.context.n_batch
        with LOG.collect() as ctx_log:
            ctx = _lc.llama_init_from_model(model, native.context)
        if not ctx:
            detail = last_log_line(ctx_log) or "out of memory?"
            raise EngineError(f"llama.cpp could not create a {native.context.n_ctx}-token context: {detail}", path=path)
    except BaseException:
        _lc.llama_model_free(model)
        raise
    return model, ctx, load_log + ctx_log
