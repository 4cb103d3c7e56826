"""The child process that runs llama.cpp's `llama_model_quantize`, and the parent's side of it.

`llama_model_quantize` blocks inside C where Python cannot deliver Ctrl-C, so it runs in a child
process (`python -m corral.convert.quantize_child`) that we can terminate. The child forwards
llama.cpp's log to its stderr; the parent counts the `[ i/ n]` tensor lines for progress and turns
a failure into one clear error (a full disk included).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import quant_types
from .atomic import DISK_SLACK_BYTES
from .errors import Cancelled, EngineError, InsufficientDisk, NativeCrash
from .imatrix import load_imatrix
from .progress import ProgressFn, no_progress

_TENSOR_LINE = re.compile(
    r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type\s*=\s*(\w+),.*?size\s*=\s*([\d.]+) MiB"
    r"(?:\s*->\s*([\d.]+) MiB(?:\s*\((\w+)\))?)?")
_FAILED = re.compile(r"failed to quantize: (.*)")
# what a failed write looks like in llama.cpp's log: its std::ofstream throws "basic_ios::clear: iostream
# error" (or the OS message comes through); only a full output filesystem makes it a disk-full error
_NO_SPACE = re.compile(r"no space left|enospc|disk quota exceeded|disk full", re.IGNORECASE)
_WRITE_ERROR = re.compile(r"iostream error|basic_ios|failed to write|write error|error writing", re.IGNORECASE)


def run_child(job: dict[str, Any], progress: ProgressFn = no_progress, total: int = 0) -> list[str]:
    """Run llama_model_quantize in a child process; return its log lines. Ctrl-C stops it."""
    cmd = [sys.executable, "-m", "corral.convert.quantize_child", json.dumps(job)]
    lines: list[str] = []
    proc = _start(cmd)
    try:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            lines.append(line)
            match = _TENSOR_LINE.search(line)
            if match:
                progress(int(match.group(1)), int(match.group(2)) or total, match.group(3))
        rc = proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise Cancelled("quantization interrupted; nothing was written") from None
    if rc in (-signal.SIGINT, -signal.SIGTERM):
        raise Cancelled("quantization interrupted; nothing was written")
    if rc < 0:
        raise crash_error(job, rc, lines)
    if rc != 0:
        failed = [m.group(1) for m in map(_FAILED.search, lines) if m]
        reason = failed[-1].strip() if failed else (lines[-1] if lines else f"exit status {rc}")
        if _disk_filled(job, lines):
            raise InsufficientDisk("disk full while writing the output", path=job.get("target") or job.get("out"))
        raise EngineError(f"llama.cpp could not quantize: {reason}")
    return lines


def _start(cmd: list[str]) -> subprocess.Popen[bytes]:
    """Start the child. A Ctrl-C that lands inside Popen, after the child started but before Popen returned,
    leaves a child nobody holds: it would write the output's temporary file again after the parent removed it.
    Such a child is stopped here before the interrupt goes on."""
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except BaseException:
        import psutil

        for child in psutil.Process().children():
            try:
                if cmd[-1] in child.cmdline():
                    child.kill()
                    child.wait(timeout=10)
            except (psutil.Error, OSError):
                pass
        raise


def signal_name(returncode: int) -> str:
    """'SIGSEGV' for a child's return code of -11 (subprocess's way of saying it died of a signal)."""
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def crash_error(job: dict[str, Any], returncode: int, lines: list[str]) -> NativeCrash:
    """One line for a quantizer child killed by a signal: what crashed, where it was, what to try."""
    name = signal_name(returncode)
    where = [m.group(3) for m in map(_TENSOR_LINE.search, lines) if m]
    doing = f"on tensor {where[-1]}" if where else "before the first tensor"
    what = "planning (dry run)" if job.get("dry_run") else "quantizing"
    if name == "SIGKILL":
        hint = "the system may have run out of memory: close other programs, or use fewer --threads"
    else:
        hint = ("try --threads 1, another --type, or a CPU build of llama-cpp-python without native "
                "optimizations (CMAKE_ARGS=-DGGML_NATIVE=OFF)")
    src = Path(str(job.get("src", "?"))).name
    return NativeCrash(f"llama.cpp's quantizer crashed ({name}) while {what} {src} {doing}; {hint}")


def _disk_filled(job: dict[str, Any], lines: list[str]) -> bool:
    """Did the child fail because the output filesystem filled up?

    An OS "no space" message settles it. llama.cpp's own write error (an iostream exception) counts
    when the output folder has less room left than the largest tensor it still had to write, plus slack.
    """
    text = "\n".join(lines[-50:])
    if _NO_SPACE.search(text):
        return True
    out = job.get("out")
    if not out or out == os.devnull or not _WRITE_ERROR.search(text):
        return False
    folder = Path(out).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return False
    return free < int(job.get("write_chunk_bytes") or 0) + DISK_SLACK_BYTES


def parse_tensor_lines(lines: list[str]) -> dict[str, tuple[str, str]]:
    """{name: (type_in, type_out)} from llama.cpp's per-tensor log lines (dry run or real run)."""
    result = {}
    for line in lines:
        m = _TENSOR_LINE.search(line)
        if m:
            type_in = m.group(4).upper()
            conv = re.search(r"converting to (\w+)", line)
            type_out = (m.group(7) or (conv.group(1) if conv else None) or m.group(4)).upper()
            result[m.group(3)] = (type_in, type_out)
    return result


def llama_dry_run(src: str | Path, ftype: str, *, imatrix: str | Path | None = None) -> dict[str, tuple[str, str]]:
    """llama.cpp's own dry run: {tensor: (type_in, type_out)} as it reports them."""
    info = quant_types.file_type(ftype)
    job = {"src": str(src), "out": os.devnull, "ftype": int(info.ftype), "threads": 1,
           "imatrix": str(imatrix) if imatrix else None, "keep_split": False, "allow_requantize": True,
           "dry_run": True, "overrides": []}
    return parse_tensor_lines(run_child(job))


# ---------------------------------------------------------------- child process


def child_main(job: dict[str, Any]) -> None:
    """Run llama_model_quantize on `job`; raise EngineError when it fails (its log says why)."""
    import ctypes

    import llama_cpp

    from .imatrix import LlamaImatrixData

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        sys.stderr.write(text.decode("utf-8", "replace"))
        sys.stderr.flush()

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = job["ftype"]
    params.nthread = job["threads"]
    params.keep_split = job["keep_split"]
    params.allow_requantize = job["allow_requantize"]
    params.dry_run = job["dry_run"]
    keep: list[Any] = []
    if job["imatrix"]:
        data = LlamaImatrixData(load_imatrix(job["imatrix"]))
        keep.append(data)
        params.imatrix = ctypes.cast(data.array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if job["overrides"]:
        kvs = (llama_cpp.llama_model_kv_override * (len(job["overrides"]) + 1))()
        for i, (key, value) in enumerate(job["overrides"]):
            kvs[i].key = key.encode()[:127]
            if isinstance(value, str):
                kvs[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                kvs[i].value.val_str = value.encode()[:127]
            else:
                kvs[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                kvs[i].value.val_i64 = int(value)
        kvs[len(job["overrides"])].key = b""
        keep.append(kvs)
        params.kv_overrides = ctypes.cast(kvs, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["out"].encode(), ctypes.byref(params))
    sys.stderr.flush()
    if rc != 0:
        # the uncaught exception gives the child its non-zero exit status; run_child reads the reason
        # from llama.cpp's "failed to quantize: ..." line above it
        raise EngineError(f"llama_model_quantize returned {rc}")


if __name__ == "__main__":  # pragma: no cover - exercised through run_child
    child_main(json.loads(sys.argv[1]))
