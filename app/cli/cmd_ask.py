"""`corral ask`: Answer one prompt with a local GGUF model and exit."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from corral.app.chats.store import ChatStore
from corral.app.cli import ui
from corral.app.cli.ask_tools import answer_with_tools, read_tools_file
from corral.app.cli.model_options import ModelArgs, load_model, model_options, pop_model_args, stats_json
from corral.app.cli.saved_ask import SavedConversation
from corral.app.runtime.api import ChatEngine, Generation, Message
from corral.app.runtime.draft import draft_json
from corral.app.runtime.rpc import on_fatal
from corral.convert.errors import Cancelled, ContextOverflow, UsageError

if TYPE_CHECKING:
    pass


def read_prompt(argument: str | None, stdin: Any) -> str:
    """The prompt: stdin (when piped, or when the argument is '-') before the argument, like ollama."""
    piped = ""
    if argument == "-" or not _is_tty(stdin):
        piped = stdin.read() if stdin is not None else ""
    parts = [p for p in (piped.strip("\n"), argument if argument not in (None, "-") else "") if p and p.strip()]
    text = "\n\n".join(parts)
    if not text.strip():
        raise UsageError("no prompt: give it as an argument or pipe it on stdin")
    return text


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextmanager
def interrupt_sets(cancel: threading.Event) -> Iterator[None]:
    """While inside: Ctrl-C / SIGTERM set `cancel` (a second Ctrl-C raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if cancel.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        cancel.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _reserve(max_tokens: int, n_ctx: int) -> int:
    """Tokens kept free for the reply when --truncate shortens the prompt."""
    wanted = max_tokens if max_tokens > 0 else 256
    return max(1, min(wanted, n_ctx // 4))


@click.command("ask")
@click.argument("prompt", required=False)
@model_options()
@click.option("--truncate", is_flag=True, help="If the prompt is longer than the context, drop its oldest text.")
@click.option("--no-stream", is_flag=True, help="Print the reply when it is complete instead of as it comes.")
@click.option("--json", "json_", is_flag=True, help="Print the reply and timings as one JSON object.")
@click.option("-c", "--continue", "continue_", is_flag=False, flag_value="last", default=None, metavar="[ID]",
              help="Continue the last saved conversation (or conversation ID) and save this exchange to it; "
                   "its saved KV cache makes the history free to re-read.")
@click.option("--save", is_flag=True, help="Start a saved conversation with this exchange (continue it with -c).")
@click.option("--tools", "tools_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Offer the tools in FILE (OpenAI JSON); calls are printed as JSON, never run.")
def ask(prompt: str | None, truncate: bool, no_stream: bool, json_: bool, continue_: str | None, save: bool,
        tools_file: str | None, **params: Any) -> None:
    """Answer one prompt with a local GGUF model and exit.

    The prompt comes from the argument, from stdin, or both (stdin first). The model loads
    with corral's offload plan applied; flags such as --ngl or --ctx override the plan.
    Ctrl-C stops the reply between tokens (exit 130, partial text kept).
    With -c or --save the exchange goes to the chat store (`corral chat --list`); `-c "text"` with no
    id continues the last conversation.
    """
    args = pop_model_args(params)
    if continue_ is not None and continue_ != "last" and not continue_.isdigit() and prompt is None:
        prompt, continue_ = continue_, "last"  # `ask -c "question"`: the value was the prompt
    text = read_prompt(prompt, sys.stdin)
    tools = read_tools_file(tools_file) if tools_file else None
    if tools is not None and (continue_ or save):
        raise UsageError("--tools cannot be combined with -c/--save")
    saved = _open_saved(continue_, save, args)
    try:
        messages = saved.messages(text) if saved else (
            ([Message("system", args.system)] if args.system else []) + [Message("user", text)])
        cancel = threading.Event()
        with interrupt_sets(cancel):
            engine = load_model(args, cancel)
            try:
                if tools is not None:
                    return answer_with_tools(engine, args, messages, tools, cancel, json_=json_)
                if saved is None:
                    _answer(engine, args, messages, cancel, truncate=truncate, stream=not (no_stream or json_),
                            json_=json_)
                    return
                saved.restore(engine)
                reply_id = saved.record_prompt(text)
                _answer(engine, args, messages, cancel, truncate=truncate, stream=not (no_stream or json_),
                        json_=json_, on_done=lambda result: saved.record_reply(engine, reply_id, result))
            finally:
                engine.close()
    finally:
        if saved is not None:
            saved.store.close()


def _open_saved(continue_: str | None, save: bool, args: ModelArgs) -> SavedConversation | None:
    if continue_ is None and not save:
        return None
    if continue_ is not None and save:
        raise UsageError("use either -c (continue a conversation) or --save (start one), not both")
    store = ChatStore()
    try:
        return SavedConversation.open(store, continue_, system=args.system, model=str(args.model or ""))
    except BaseException:
        store.close()
        raise


def _answer(engine: ChatEngine, args: ModelArgs, messages: list[Message], cancel: threading.Event, *, truncate: bool,
            stream: bool, json_: bool, on_done: Callable[[Generation], dict[str, Any]] | None = None) -> None:
    """Generate, print, and hand the result to `on_done` (whose fields --json adds) before reporting a Ctrl-C."""
    n_prompt = engine.count_prompt_tokens(messages)
    reserve = _reserve(args.sampling.max_tokens, engine.n_ctx)
    if n_prompt >= engine.n_ctx or (truncate and n_prompt > engine.n_ctx - reserve):
        if not truncate:
            raise ContextOverflow(f"the prompt is {n_prompt} tokens but the context window is {engine.n_ctx} tokens "
                                  f"(use --ctx to enlarge it, or --truncate to drop the oldest text)")
        fit = engine.fit_messages(messages, reserve)
        messages = fit.messages
        ui.warn(f"the prompt was {n_prompt} tokens; dropped its oldest text to fit the {engine.n_ctx}-token context "
                f"(now {fit.prompt_tokens} tokens, {reserve} left for the reply)")
    out = sys.stdout
    wrote: list[str] = []

    def on_text(piece: str) -> None:
        out.write(piece)
        out.flush()
        wrote.append(piece)

    def end_line(_message: str) -> None:  # a lost RPC worker: the text so far stays, the error follows
        if wrote and not wrote[-1].endswith("\n"):
            out.write("\n")
            out.flush()

    shown = len(engine.warnings)
    with on_fatal(end_line):
        result = engine.generate(messages, args.sampling, on_text=on_text if stream else None, cancel=cancel)
    for message in engine.warnings[shown:]:
        ui.warn(message)
    stats = result.stats
    extra = on_done(result) if on_done is not None else {}
    if json_:
        click.echo(json.dumps({
            **extra,
            "model": engine.model_name,
            "text": result.text,
            **stats_json(stats),
            **draft_json(engine, stats),
        }, ensure_ascii=False))
    elif stream:
        if not result.text.endswith("\n"):
            out.write("\n")
        out.flush()
    else:
        click.echo(result.text)
    if args.engine.verbose:
        ui.note(f"{stats.prompt_tokens} prompt tokens in {stats.prompt_seconds:.2f} s, "
                f"{stats.completion_tokens} generated at {stats.tokens_per_second:.2f} tok/s ({stats.stop_reason})"
                + (f", draft accepted {stats.accepted_tokens}/{stats.drafted_tokens}" if stats.drafted_tokens else ""),
                style="dim")
    if stats.stop_reason == "cancelled":
        raise Cancelled("interrupted; the reply so far is above")
