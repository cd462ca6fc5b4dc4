"""The limit of the HTTP server that the app cannot enforce itself: how long a client may take to send a request's
head (request line and headers), like nginx's `client_header_timeout`.

The app sees a request only once its head is complete, and uvicorn times out neither a head that never completes
nor one that trickles in, so without this a client holds a connection for as long as it likes. BentoML builds
uvicorn's configuration itself and offers no setting for the protocol, so `install` (called by `service.py` before
the server starts) makes uvicorn's default HTTP protocol, `auto`, the h11 protocol below. Bodies are bounded by the
app (`http.Uploads`: a total time and a minimum rate).
"""

from __future__ import annotations

import asyncio
import json

import h11
import uvicorn.config
from uvicorn.protocols.http.h11_impl import H11Protocol


def timeout_response(message: str) -> bytes:
    """A complete 408 response with the error body of the transport (`http.error_response`), closing the
    connection."""
    body = json.dumps({"error": {"code": "request_timeout", "message": message, "field": None,
                                 "request_id": None}}).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head: `head_timeout_s` from the connection's start,
    and again from the end of each response, until the next request's head is complete. A client that misses it gets
    408 and the connection closes. uvicorn's own keep-alive timeout still closes idle connections first when it is
    shorter."""

    head_timeout_s: float = 10.0
    """Set by `install` from `header_read_timeout_s`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm(after=None)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._disarm_once_a_head_arrived()

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()  # may start the next request of a pipeline already received
        if not self.transport.is_closing():
            self._arm(after=answered)
            self._disarm_once_a_head_arrived()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, after) -> None:
        """Wait for the head of a request after the one of cycle `after` (uvicorn makes a cycle for each request)."""
        self._disarm()
        self._waiting_after = after
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _disarm_once_a_head_arrived(self) -> None:
        if self._head_timer is not None and self.cycle is not self._waiting_after:
            self._disarm()

    def _timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:
            self.transport.write(timeout_response(
                f"the request line and headers did not arrive within header_read_timeout_s={self.head_timeout_s:g} s"))
        self.transport.close()


def install(head_timeout_s: float) -> None:
    """Serve HTTP with `HeadTimeoutProtocol` and this head timeout from the next uvicorn server started in this
    process on."""
    HeadTimeoutProtocol.head_timeout_s = head_timeout_s
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:HeadTimeoutProtocol"
