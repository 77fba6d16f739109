"""Time limits on what a client sends, for the uvicorn server (issue 14 item 7).

uvicorn's only client timeout is ``timeout_keep_alive``, armed after a response and cancelled by
any byte received: a connection that never sends a request, sends half of its headers, or stops
in the middle of a body is kept for ever (uvicorn issue #157 lists the missing
``--timeout-request-start``/``--timeout-request-complete``), and ASGI middleware cannot help, as
the app is called only once the headers are complete. So the guard sits one level down, in
uvicorn's own h11 protocol class (``uvicorn.Config(http=...)`` takes a class): it watches the
client's h11 state and closes the connection when

- no request starts within ``idle_s`` (a fresh connection, or between keep-alive requests),
- a request's headers are not complete ``header_s`` after its first byte,
- a body does not bring ``body_min_bytes`` within ``body_window_s`` of the previous such amount
  (or of the headers), unless the server itself has stopped reading (flow control) or owes the
  client a ``100 Continue``.

While the request is complete and the server works on it, nothing is timed: that wait is ours,
and the bounded pool limits it. See docs/cli.md (`serve`) for the values and why."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ConnectionLimits", "GuardedH11Protocol", "guarded_protocol", "uvicorn_options"]

log = logging.getLogger("uvicorn.error")


@dataclass(frozen=True)
class ConnectionLimits:
    idle_s: float = 5.0  # no request begun: uvicorn's keep-alive default; browsers reconnect cheaply
    header_s: float = 10.0  # first byte to the end of the headers (at most 16 KB, h11's limit)
    body_window_s: float = 10.0  # every body_min_bytes of a body must arrive within this
    body_min_bytes: int = 10_000  # 1 KB/s: below any real link (GPRS is ~5 KB/s)

    def __post_init__(self):
        if min(self.idle_s, self.header_s, self.body_window_s) <= 0 or self.body_min_bytes < 1:
            raise ValueError(f"connection limits must be positive: {self}")

    @property
    def tick_s(self) -> float:
        """How often a connection is checked: a tenth of the shortest limit, within [0.05, 1] s."""
        return min(1.0, max(0.05, min(self.idle_s, self.header_s, self.body_window_s) / 10))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the limits above (``limits``, a class attribute: see
    guarded_protocol). Phases: idle (no request begun), headers (a request begun, headers not
    complete), body (the client is sending a body), busy (the server has the request)."""

    limits = ConnectionLimits()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase, self._since, self._got = "idle", self.loop.time(), 0
        self._timer = self.loop.call_later(self.limits.tick_s, self._check)

    def connection_lost(self, exc) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._got += len(data)
        self._observe()
        if self._phase == "body" and self._got >= self.limits.body_min_bytes:
            self._since, self._got = self.loop.time(), 0  # progress: a new window

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._observe()

    def _client_phase(self) -> str:
        state = self.conn.their_state
        if state is h11.IDLE:
            return "headers" if self.conn.trailing_data[0] else "idle"
        return "body" if state is h11.SEND_BODY else "busy"

    def _observe(self) -> None:
        phase = self._client_phase()
        if phase != self._phase:
            self._phase, self._since, self._got = phase, self.loop.time(), 0

    def _check(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # closed, or handed over (upgrade)
        self._observe()
        now, lim = self.loop.time(), self.limits
        age = now - self._since
        if self._phase == "idle" and age >= lim.idle_s:
            return self._close(f"no request within {lim.idle_s:g} s")
        if self._phase == "headers" and age >= lim.header_s:
            return self._close(f"request headers not complete within {lim.header_s:g} s")
        if self._phase == "body":
            if self.flow.read_paused or getattr(self.cycle, "waiting_for_100_continue", False):
                self._since, self._got = now, 0  # the server is the one not reading
            elif age >= lim.body_window_s:
                return self._close(f"request body: fewer than {lim.body_min_bytes} bytes in {lim.body_window_s:g} s")
        self._timer = self.loop.call_later(lim.tick_s, self._check)

    def _close(self, why: str) -> None:
        if self.client:
            log.debug("%s:%d - closing a stalled connection: %s", *self.client, why)
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # a client that does not read either: do not wait for it
        else:
            self.transport.close()

    def _cancel(self) -> None:
        timer, self._timer = getattr(self, "_timer", None), None
        if timer is not None:
            timer.cancel()


def guarded_protocol(limits: ConnectionLimits = ConnectionLimits()) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol class bound to ``limits`` (uvicorn instantiates the class it is given)."""
    if limits == GuardedH11Protocol.limits:
        return GuardedH11Protocol
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def uvicorn_options(limits: ConnectionLimits = ConnectionLimits()) -> dict:
    """uvicorn.Config/uvicorn.run keywords for the guarded server: the guarded h11 protocol (also
    where httptools is installed), uvicorn's own keep-alive timer agreeing with ``idle_s``, and no
    WebSocket support (the app has no WebSocket route)."""
    return {"http": guarded_protocol(limits), "ws": "none", "timeout_keep_alive": max(1, math.ceil(limits.idle_s))}
