"""The one errors module of corral.

Every failure that a user can cause or fix is one of these typed errors. Library code
(`corral.convert`, `corral.offload`, `corral.app` engines) raises them; only the edge
(the CLI and the TUI) turns them into a one-line message and an exit code.

It lives in `corral.convert`, the lowest layer, so that every package can import it
without creating an upward dependency (tui -> app -> offload -> convert).
"""

from __future__ import annotations

from pathlib import Path

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CorralError(Exception):
    """Base class: a problem the user should read about, not a bug."""

    exit_code: int = EXIT_RUNTIME

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(message)

    def __str__(self) -> str:
        message = super().__str__()
        if self.path and self.path not in message:
            return f"{self.path}: {message}"
        return message


class UsageError(CorralError, ValueError):
    """Bad input from the user: arguments, paths, options."""

    exit_code = EXIT_USAGE


class InputNotFound(UsageError, FileNotFoundError):
    """A path given on the command line does not exist."""


class InvalidFile(UsageError):
    """A model file, header or config is malformed or inconsistent."""


class InvalidGGUF(InvalidFile):
    """A GGUF file failed header validation."""


class InvalidSafetensors(InvalidFile):
    """A safetensors file failed header validation."""


class InvalidConfig(InvalidFile):
    """A Hugging Face config/tokenizer file is missing, unsupported or inconsistent."""


class UnsupportedModel(InvalidFile):
    """An architecture corral does not handle."""


class OutputExists(UsageError, FileExistsError):
    """The output path exists and --force was not given."""


class InsufficientDisk(CorralError, OSError):
    """Not enough free disk space for the output."""


class ImatrixRequired(UsageError):
    """The quantization type needs an importance matrix."""


class DoesNotFit(CorralError):
    """The plan says the model will not fit on this machine."""


class ContextOverflow(UsageError):
    """The prompt does not fit in the context window."""


class TemplateError(UsageError):
    """A chat template is unsafe, broken or too expensive to render."""


class StoreError(CorralError):
    """The chat store (SQLite) is corrupt, locked or unwritable."""


class EngineError(CorralError, RuntimeError):
    """llama.cpp failed to load or run a model."""


class NativeCrash(EngineError):
    """llama.cpp's native code died of a signal in a child process; the message names it and a workaround."""


class Cancelled(CorralError):
    """The user interrupted a long operation (Ctrl-C, SIGTERM, Escape)."""

    exit_code = EXIT_INTERRUPTED
