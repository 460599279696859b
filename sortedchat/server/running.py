"""Serving the app with uvicorn: in the foreground (`sortedchat serve`), or on a background thread of this process
(`in_background`: tests, benchmarks, a notebook), on a socket bound before uvicorn starts so the port is known."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import uvicorn

from sortedchat import SortedChatError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error naming the address (taken, not an address of this machine...)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        raise SortedChatError(f"--host {host} --port {port}: cannot listen there ({exc})") from None
    sock.listen(128)
    return sock


def serve(app, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until Ctrl+C (uvicorn stops gracefully: the app's lifespan ends the engine thread)."""
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])


@contextlib.contextmanager
def in_background(app, host: str = "127.0.0.1", log_level: str = "warning") -> Iterator[str]:
    """Serve `app` on a free port of `host` from a thread of this process; yields the base URL ("http://...:N");
    on exit the server shuts down and the thread is joined."""
    sock = bind(host, 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="sortedchat-http", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise SortedChatError("the server stopped while starting (see its log above)")
            thread.join(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
