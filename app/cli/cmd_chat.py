"""`corral chat`: Chat with a local GGUF model in a terminal UI."""

from __future__ import annotations

import datetime as _dt
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from corral.app.chats.store import ChatStore
from corral.app.cli import ui
from corral.app.cli.model_options import ModelArgs, model_options, pop_model_args
from corral.app.runtime.api import ChatEngine
from corral.app.runtime.tools import ToolSet
from corral.convert.errors import CorralError, EngineError, UsageError
from corral.convert.units import format_bytes


def _list(store: ChatStore, as_json: bool) -> None:
    rows = store.list_conversations()
    kv = store.kv_states.sizes()
    if as_json:
        click.echo(json.dumps([
            {"id": r.id, "title": r.title, "model": r.model, "messages": r.n_messages, "updated_at": r.updated_at,
             "kv_state_bytes": kv.get(r.id, 0)}
            for r in rows
        ], indent=2))
        return
    if not rows:
        ui.note(f"no saved conversations (store: {store.path})")
        return
    for r in rows:
        when = _dt.datetime.fromtimestamp(r.updated_at).strftime("%Y-%m-%d %H:%M")
        state = f"KV {format_bytes(kv[r.id])}" if r.id in kv else "no KV"
        click.echo(f"{r.id:>5}  {when}  {r.n_messages:>4} msgs  {state:>12}  {r.title}")


EngineFactory = Callable[[Callable[[float], None], threading.Event], ChatEngine]


def _engine_factory(model: str, args: ModelArgs) -> tuple[EngineFactory, str, str]:
    """(factory for the app, model label, plan headline); the plan is made here so it can fail early."""
    from corral.app.runtime.engine import load_engine, make_plan, resolve_model_path

    path = resolve_model_path(model)
    if args.engine.draft:  # refuse an incompatible draft before the terminal UI starts
        from corral.app.runtime.draft import check_draft
        from corral.convert.gguf_file import read_gguf

        check_draft(read_gguf(path), args.engine.draft)
    plan = make_plan(path, args.engine)

    def factory(progress: Callable[[float], None], cancel: threading.Event) -> ChatEngine:
        return load_engine(path, args.engine, progress=progress, cancel=cancel, plan=plan)

    return factory, path.name, plan.headline


@click.command("chat")
@model_options(model_required=False)
@click.option("--resume", type=int, default=None, metavar="ID", help="Resume saved conversation ID.")
@click.option("--new", "new", is_flag=True, help="Start a new conversation (skip the conversation list).")
@click.option("--list", "list_", is_flag=True, help="List saved conversations and exit (no model needed).")
@click.option("--export", "export_id", type=int, default=None, metavar="ID",
              help="Print saved conversation ID as Markdown and exit (no model needed).")
@click.option("--export-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for ctrl+s exports (default: the current folder).")
@click.option("--json", "json_", is_flag=True, help="With --list: print JSON on stdout.")
@click.option("--tools", "tools_file", default=None, metavar="FILE",
              help="Offer the tools in FILE (as `corral ask --tools`); calls are shown, never run.")
def chat(resume: int | None, new: bool, list_: bool, export_id: int | None, export_dir: Path | None,
         json_: bool, tools_file: str | None, **params: Any) -> None:
    """Chat with a local GGUF model in a terminal UI.

    \b
    With --tools FILE the model may ask for tool calls. corral runs none of them: the chat shows each
    call (name and JSON arguments, or why it could not be read) and your next message is sent as the
    tool's result (escape: write a normal message instead). Tool results are saved as your turns,
    prefixed "[tool result]"; a resumed conversation sends them to the model as plain user turns.
    """
    store = ChatStore()
    try:
        if list_:
            _list(store, json_)
            return
        if export_id is not None:
            click.echo(store.export_markdown(export_id), nl=False)
            return
        args = pop_model_args(params)
        if not args.model:
            raise UsageError("missing -m/--model MODEL.gguf")
        if resume is not None:
            store.get(resume)  # a bad id fails here, before the model loads
        tools = None
        if tools_file is not None:
            from corral.app.cli.ask_tools import read_tools_file

            tools = read_tools_file(tools_file)
        # validate the model and plan first, so a bad file is named even without a terminal
        factory, label, headline = _engine_factory(args.model, args)
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise UsageError("corral chat needs a terminal; use `corral ask` in scripts and pipes")
        _run_app(factory, store, args, label, headline, resume, new, export_dir, tools)
    finally:
        store.close()


# Textual's terminal modes, switched off: kitty keyboard flags, focus events, bracketed paste, mouse reporting,
# the alternate screen; then the cursor shown again.
_TERMINAL_RESET = ("\x1b[<u\x1b[?1004l\x1b[?2004l\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1015l\x1b[?1006l"
                   "\x1b[?1049l\x1b[?25h")


def _keep_reply_on_worker_loss(app: Any, store: ChatStore) -> Callable[[str], None]:
    """A hook for a lost RPC worker (the process leaves right after it): the reply so far is saved as a
    stopped reply and the terminal is given back, so the one-line error is readable."""
    import os
    import termios

    try:
        saved_modes = termios.tcgetattr(sys.stdin.fileno())
    except (termios.error, OSError, ValueError):
        saved_modes = None

    def hook(_message: str) -> None:
        screen = app.chat_screen
        job = screen.job if screen is not None else None
        try:
            if job is not None and not job.save_failed:
                text = job.box.content + job.buffer.drain()
                if job.message_id is None and text:
                    job.message_id = store.start_reply(job.conversation_id, text)
                if job.message_id is not None:
                    store.update_reply(job.message_id, text, status="cancelled")
        finally:
            if saved_modes is not None:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved_modes)
            os.write(sys.__stdout__.fileno(), _TERMINAL_RESET.encode())

    return hook


def _run_app(factory: EngineFactory, store: ChatStore, args: ModelArgs, label: str, headline: str,
             resume: int | None, new: bool, export_dir: Path | None, tools: ToolSet | None = None) -> None:
    from corral.tui.app import make_app

    app = make_app(
        factory,
        store,
        args.sampling,
        system_prompt=args.system or "",
        model_label=label,
        load_detail=headline,
        conversation_id=resume,
        show_list_at_start=not new and resume is None,
        export_dir=export_dir,
        tools=tools,
    )
    from corral.app.runtime.rpc import on_fatal

    try:
        with on_fatal(_keep_reply_on_worker_loss(app, store)):
            app.run()
    finally:
        app.shutdown()
    failure = app.failure
    if failure is not None:
        if isinstance(failure, CorralError):
            raise failure
        if isinstance(failure, KeyboardInterrupt):
            raise failure
        raise EngineError(f"model load failed: {failure}") from failure
