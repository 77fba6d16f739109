"""Run the app with uvicorn: in the foreground for `kneeosteo serve`, or in a background thread on
a loopback socket that is already bound (no race for a "free" port) for tests and benchmarks.
Both use the guarded protocol (guard.py): stalled clients are closed within bounded times."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kneeosteo.interfaces.web.guard import ConnectionLimits, uvicorn_options

__all__ = ["ConnectionLimits", "is_loopback", "serve_in_thread", "uvicorn_options"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def serve_in_thread(
    app,
    host: str = "127.0.0.1",
    timeout: float = 20.0,
    limits: ConnectionLimits | None = ConnectionLimits(),  # noqa: B008 (a frozen dataclass)
    **config,
) -> Iterator[str]:
    """Serve ``app`` on ``host`` at a port the OS picks; yields the base URL, stops on exit.
    ``limits``: the client time limits (None: uvicorn's own, which never close a stalled client)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    options = {**(uvicorn_options(limits) if limits is not None else {}), **config}
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the web server did not start")
            time.sleep(0.02)
        yield f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
