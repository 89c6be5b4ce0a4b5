"""A guard on request heads, below the application: uvicorn's httptools protocol, with limits.

uvicorn bounds neither how long a client may take to send a request head nor how large the head
may grow (its keep-alive timeout runs only between requests, and ``h11_max_incomplete_event_size``
applies to the h11 protocol, not to httptools). So an unauthenticated client could hold a
connection open for ever by never finishing its head, or make the server buffer a head of many
megabytes. :class:`GuardedHttpToolsProtocol` adds, per connection:

- **a deadline for each head** (``JOBCAST_HTTP_HEAD_TIMEOUT_S``, 30 s): from the moment the
  connection opens, or a new head begins on a kept-alive connection, to the end of that head's
  headers. A connection still without a complete head then is closed. Bodies are not timed here
  (the application reads them, and event streams are long by design);
- **a size limit for each head** (``JOBCAST_HTTP_MAX_HEAD_BYTES``, 64 KiB): bytes that arrive while
  a head is incomplete are counted, and once the count passes the limit the client gets a ``431``
  problem and the connection is closed. The count is checked after the parser has taken each read,
  so a large body that arrives in the same read as a small head is not mistaken for a large head;
- **protocol-level 400s as problem+json**: what the parser refuses (bad header bytes, conflicting
  lengths, not HTTP) is answered with the same ``/problems/bad-request`` body as the application's,
  instead of uvicorn's ``text/plain``.

It also writes a response's head and body together (:class:`HeadWithBody`): uvicorn writes the head
of a response when the application starts it, and the body in a second write. Every write to a
socket is a system call and, on loopback or a busy host, a wake-up of the reader; a JSON answer of a
few hundred bytes then costs two of each. The head of a response with a ``Content-Length`` and a
body to come is held until the body is written (in the same step of the application's task for a
Starlette ``Response``), at the latest until the loop's next turn.

This reaches into uvicorn's internals (the protocol's parser callbacks), so it stays in this one
module, :func:`check_uvicorn_hooks` fails loudly at start-up when an upgrade moved them, and
tests/test_edge.py checks the behaviour over raw sockets.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from .problems import PROBLEM_JSON, BadRequest, HeaderTooLarge, Problem

logger = logging.getLogger(__name__)

#: The methods of uvicorn's protocol this module overrides or relies on.
HOOKS = ("connection_made", "connection_lost", "data_received", "on_message_begin", "on_headers_complete",
         "on_response_complete", "send_400_response")  # fmt: skip


def check_uvicorn_hooks() -> None:
    """Raise RuntimeError when uvicorn's httptools protocol no longer has what the guard hooks into."""
    missing = [name for name in HOOKS if not callable(getattr(HttpToolsProtocol, name, None))]
    if missing:
        raise RuntimeError(
            f"uvicorn's HttpToolsProtocol has no {', '.join(missing)}: jobcast.http_guard needs updating "
            "for this version of uvicorn."
        )


def guarded_protocol(*, head_timeout_s: float, max_head_bytes: int) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, with these limits."""
    check_uvicorn_hooks()
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"head_timeout_s": head_timeout_s, "max_head_bytes": max_head_bytes},
    )


def problem_bytes(problem: Problem, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """``problem`` as a whole HTTP/1.1 response that closes the connection, below the application:
    uvicorn's default headers (``server_state.default_headers``), the problem's own, its body."""
    body = orjson.dumps(problem.body())
    head = [f"HTTP/1.1 {problem.status} {problem.title}".encode()]
    head += [name + b": " + value for name, value in default_headers]
    head += [name.lower().encode("latin-1") + b": " + value.encode("latin-1") 
             for name, value in problem.headers.items()]  # fmt: skip
    head += [
        b"content-type: " + PROBLEM_JSON.encode(),
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    head_timeout_s = 30.0
    max_head_bytes = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._reading_head = False

    # --- the deadline -----------------------------------------------------------------------------

    def _start_head(self) -> None:
        self._reading_head = True
        if self._head_timer is None:
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _end_head(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._reading_head and not self.transport.is_closing():
            logger.info(
                "closing a connection from %s: no complete request head within %g s", self._peer(), self.head_timeout_s
            )
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_head()

    def on_headers_complete(self) -> None:
        self._end_head()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:  # (a cycle of this request: always)
            cycle.transport = HeadWithBody(self.transport, cycle)  # type: ignore[assignment]

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next head, if the client sends one, is timed from its first byte (on_message_begin);
        # until then uvicorn's keep-alive timeout closes an idle connection.

    # --- the size limit ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._reading_head or self.transport.is_closing():
            return
        # The head is still incomplete after this read, so the read counts (a head that completed
        # in it ended the count in on_headers_complete, whatever body came after). Only a pipelined
        # head that begins in the same read as the end of a large body is over-counted.
        self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes:
            logger.info("refusing a request head of more than %d bytes from %s", self.max_head_bytes, self._peer())
            self._end_head()
            self._send_problem(
                HeaderTooLarge(
                    f"The request head is larger than {self.max_head_bytes} bytes, the most this server accepts. "
                    "Send fewer or shorter headers (credentials belong in the Authorization header)."
                )
            )

    # --- answers below the application -----------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        self._send_problem(
            BadRequest(
                "The request is not valid HTTP/1.1 (for example a malformed request line, a header with "
                "forbidden bytes, or conflicting Content-Length and Transfer-Encoding). Fix the client or "
                "the proxy in front of it."
            )
        )

    def _send_problem(self, problem: Problem) -> None:
        """Answer ``problem`` and close: the rest of what this connection sent cannot be trusted."""
        self.transport.write(problem_bytes(problem, self.server_state.default_headers))
        self.transport.close()

    @property
    def reading_head(self) -> bool:
        """Whether a request head has begun and is not complete yet (its bytes are in the parser)."""
        return self._reading_head

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "an unknown peer"


class HeadWithBody:
    """The transport as one request's response cycle writes to it (``cycle.transport``): the head of
    a response with a ``Content-Length`` and a body to come is held, and written with the body's
    first write (or at the loop's next turn, or when the transport is closed, whichever comes
    first). Everything else goes straight to the transport. :func:`transport_of` unwraps it."""

    __slots__ = ("_cycle", "_held", "_wrote_head", "transport")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self.transport = transport
        self._cycle = cycle
        self._held = b""
        self._wrote_head = False

    def write(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        elif not self._wrote_head and self._cycle.response_started:
            # The response's head: uvicorn has read its Content-Length (or chosen chunked) before.
            self._wrote_head = True
            cycle = self._cycle
            if (
                cycle.chunked_encoding is False
                and cycle.expected_content_length > 0
                and cycle.scope["method"] != "HEAD"
                and not self.transport.is_closing()
            ):
                self._held = data
                asyncio.get_running_loop().call_soon(self._flush)
                return
        self.transport.write(data)

    def _flush(self) -> None:
        if self._held:
            data, self._held = self._held, b""
            if not self.transport.is_closing():
                self.transport.write(data)

    def close(self) -> None:
        self._flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.transport.get_protocol()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def transport_of(cycle: RequestResponseCycle) -> asyncio.Transport:
    """The connection's transport of a response cycle (not what it writes through)."""
    transport = cycle.transport
    return transport.transport if isinstance(transport, HeadWithBody) else transport
