"""`corral serve`: Serve one model over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

import click

from corral.app.cli import ui
from corral.app.cli.model_options import load_model, model_options, pop_model_args
from corral.convert.errors import UsageError

API_KEY_ENV = "CORRAL_API_KEY"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("serve")
@model_options()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback exposes the model to your network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="TCP port.")
@click.option("--api-key", default=None, metavar="KEY",
              help=f"Require 'Authorization: Bearer KEY' on every request (or set {API_KEY_ENV}).")
@click.option("--max-queue", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests that may wait behind the running one; more get HTTP 503.")
def serve(host: str, port: int, api_key: str | None, max_queue: int, **params: Any) -> None:
    """Serve one model over an OpenAI-compatible HTTP API.

    Endpoints: /v1/chat/completions (streaming, tools), /v1/completions, /v1/models and
    /health. The model loads with corral's offload plan applied, as for `ask`; one reply is
    generated at a time and other requests queue. The sampling flags set the defaults that a
    request's own fields override. Listens on 127.0.0.1 unless --host says otherwise.
    """
    args = pop_model_args(params)
    if args.system:
        raise UsageError("--system does not apply to serve: clients send their own system messages")
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(host) and not api_key:
        ui.warn(f"listening on {host} without --api-key: anyone who can reach this port can use the model")
    from corral.app.serve.app import ServeConfig
    from corral.app.serve.server import uvicorn_server

    engine = load_model(args)
    try:
        config = ServeConfig(api_key=api_key, defaults=args.sampling, max_waiting=max_queue)
        server = uvicorn_server(engine, config, host=host, port=port, log_level="info" if args.engine.verbose
                                else "warning")
        shown = f"[{host}]" if ":" in host else host
        ui.note(("serving", "bold"), f" {engine.model_name} at http://{shown}:{port}/v1 ",
                ("(key required)" if api_key else "(no key)", "dim"), " - Ctrl-C stops")
        server.run()
    finally:
        engine.close()
