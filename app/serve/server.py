"""Running the API with uvicorn: in the foreground for `corral serve`, or in a thread (tests, embedding)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from corral.app.serve.app import ServeConfig, ServeEngine, make_app
from corral.convert.errors import CorralError

LOOPBACK = "127.0.0.1"


def uvicorn_server(engine: ServeEngine, config: ServeConfig, *, host: str = LOOPBACK, port: int = 8080,
                   log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for `engine` (not started)."""
    app = make_app(engine, config)
    settings = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                              timeout_graceful_shutdown=2, access_log=False)
    return uvicorn.Server(settings)


def bound_port(server: uvicorn.Server) -> int:
    """The port a started server listens on (useful with port 0)."""
    for listener in server.servers:
        for sock in listener.sockets:
            return int(sock.getsockname()[1])
    raise CorralError("the server is not listening")


@contextmanager
def serving_in_thread(engine: ServeEngine, config: ServeConfig | None = None, *, host: str = LOOPBACK,
                      port: int = 0, start_timeout: float = 30.0) -> Iterator[tuple[uvicorn.Server, str]]:
    """Serve `engine` from a background thread; yields (server, base URL) and stops it on exit."""
    server = uvicorn_server(engine, config or ServeConfig(), host=host, port=port)
    thread = threading.Thread(target=server.run, name="corral-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise CorralError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield server, f"http://{host}:{bound_port(server)}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
