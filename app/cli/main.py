"""The `corral` command line: one group, one module per subcommand, one place that turns errors into exits."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Any

import click

from corral.app.cli import ui
from corral.convert.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, CorralError


class CorralGroup(click.Group):
    """A click group that prints a one-line error (traceback only with --debug) and exits non-zero."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or "--debug" in sys.argv[1:2]
        try:
            return super().invoke(ctx)
        except CorralError as exc:
            if debug:
                traceback.print_exc()
            ui.error(str(exc))
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            ui.error("interrupted")
            ctx.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except MemoryError:
            ui.error("out of memory")
            ctx.exit(EXIT_RUNTIME)
        except OSError as exc:
            if debug:
                traceback.print_exc()
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            ui.error(f"{where}{exc.strerror or exc}")
            ctx.exit(EXIT_RUNTIME)


@click.group(cls=CorralGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="corral")
def cli(debug: bool) -> None:
    """corral: run Llama 3.1 405B (and 70B, 8B) on the machine you have.

    convert Hugging Face weights to GGUF, quantize them with llama.cpp, plan where
    every tensor goes (GPUs, RAM, disk), then chat or ask one-shot questions.
    """
    if debug:
        import logging

        logger = logging.getLogger("corral")  # library modules log the evidence behind their choices here
        if not any(h.get_name() == "corral-debug" for h in logger.handlers):
            handler = logging.StreamHandler()
            handler.set_name("corral-debug")
            handler.setFormatter(logging.Formatter("debug: %(name)s: %(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)


def _register() -> None:
    from corral.app.cli.cmd_ask import ask
    from corral.app.cli.cmd_chat import chat
    from corral.app.cli.cmd_convert import convert
    from corral.app.cli.cmd_demo import demo
    from corral.app.cli.cmd_download import download
    from corral.app.cli.cmd_eval import eval_
    from corral.app.cli.cmd_imatrix import imatrix
    from corral.app.cli.cmd_info import info
    from corral.app.cli.cmd_plan import plan
    from corral.app.cli.cmd_quantize import quantize
    from corral.app.cli.cmd_serve import serve
    from corral.app.cli.cmd_worker import worker

    for command in (plan, convert, quantize, imatrix, eval_, download, info, ask, chat, demo, serve, worker):
        cli.add_command(command)


_register()


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli(prog_name="corral")
    except SystemExit as exc:
        if exc.code != EXIT_INTERRUPTED:
            raise
        # Interrupted: every `with` block has already unwound (temp files removed, children
        # stopped). Leave now rather than wait at interpreter shutdown for worker threads that
        # may be parked inside a C call.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":  # pragma: no cover
    main()
