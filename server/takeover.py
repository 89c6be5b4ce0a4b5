"""An event stream's connection, taken over from uvicorn once the response has started.

**This module is the uvicorn seam of event streams.** A stream lives for hours and writes the same
bytes as thousands of others; through ASGI every write is a message dict, uvicorn's ``send`` (its
checks, the chunk framing, ``transport.write``), and the request's task must stay alive for hours
holding uvicorn's per-request objects (its protocol, the parser, the request-response cycle, the
scope) and the coroutine frames of the app. So once uvicorn has written the response head (status
line, default headers, ``transfer-encoding: chunked``), :func:`take_over` swaps the transport's
protocol for a :class:`StreamConnection`: the stream writes pre-framed chunks straight to the
transport (the hub encodes one chunk per event, shared by every stream), the request's task ends,
and uvicorn's objects are freed. When the stream ends normally, the connection goes back to a new
uvicorn protocol (keep-alive, as if uvicorn had completed the response); a client that goes away
ends the stream through :meth:`StreamConnection.connection_lost`.

uvicorn offers no public hook for this (ASGI has no way to hand a connection over), so what it relies
on inside uvicorn is listed in :data:`UVICORN_INTERNALS`, used here and nowhere else, and
``tests/test_uvicorn_seam.py`` fingerprints each one: an upgrade that changes one fails loudly.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

logger = logging.getLogger("jobcast.sse")

#: The uvicorn internals this module depends on, and how (tests/test_uvicorn_seam.py fingerprints each).
UVICORN_INTERNALS = {
    "RequestResponseCycle.__init__": "the cycle keeps transport, flow, chunked_encoding, disconnected and "
    "response_started, read here",
    "RequestResponseCycle.send": "a bound method of the cycle (how the app's send leads here); after "
    "http.response.start with no length it has written the head and chunk-frames the body; unless the "
    "flow is paused it awaits nothing before writing the head with one cycle.transport.write (start "
    "captures it there), nor before writing a body (cancelled_at_shutdown's answer)",
    "RequestResponseCycle.run_asgi": "logs nothing and leaves the transport alone when the app returns "
    "with the cycle marked disconnected (set here: the stream owns the connection from then on)",
    "HttpToolsProtocol.__init__": "per-connection state: config, server_state, app_state, cycle, flow, parser",
    "HttpToolsProtocol.connection_made": "a new protocol for a connection already open (the hand-back)",
    "HttpToolsProtocol.on_response_complete": "what uvicorn does once a response is complete (keep-alive)",
    "HttpToolsProtocol.shutdown": "called on every member of server_state.connections at shutdown",
}


class Closed(Exception):
    """The connection is gone (or being closed): nothing more can be written to it."""


class Owner(Protocol):
    """What a :class:`StreamConnection` tells its stream."""

    def let_go(self) -> None:
        """The connection is no longer the stream's (lost, closed, or back to HTTP)."""

    def shut_down(self) -> None:
        """The server is shutting down: end the stream now."""


def can_take_over(send: Any) -> bool:
    """Whether ``send`` is uvicorn's (httptools): what :func:`take_over` can take a connection from."""
    return isinstance(getattr(send, "__self__", None), RequestResponseCycle)


def answer_at_once(send: Any) -> bool | None:
    """For a request cancelled by the server's shutdown: whether a whole response can still be
    written through ``send`` without waiting (uvicorn's cycle, no response started, its flow not
    paused). If not, the connection is closed here, the cycle marked disconnected so that uvicorn
    neither logs nor answers for it (False); None when ``send`` is not uvicorn's."""
    cycle = getattr(send, "__self__", None)
    if not isinstance(cycle, RequestResponseCycle):
        return None
    if cycle.disconnected:
        return False
    if not cycle.response_started and not cycle.flow.write_paused:
        return True
    cycle.transport.close()
    cycle.disconnected = True
    return False


class _Head:
    """Stands in for the transport while uvicorn writes a response head: keeps the bytes."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


async def start(send: Any, owner: Owner, headers: list[tuple[bytes, bytes]]) -> tuple[StreamConnection, bytes] | None:
    """Start a 200 chunked response through uvicorn's ``send`` and take the connection over
    (:func:`take_over`); the connection, and the response head uvicorn made (status line, its
    default headers, ``headers``) *unwritten*, for the stream to send in one write with its first
    chunk. The head is empty when uvicorn wrote it itself (its flow was paused: it awaits then). None
    as for :func:`take_over`."""
    message = {"type": "http.response.start", "status": 200, "headers": headers}
    cycle = getattr(send, "__self__", None)
    if not isinstance(cycle, RequestResponseCycle) or cycle.flow.write_paused or cycle.disconnected:
        await send(message)
        connection = take_over(send, owner)
        return None if connection is None else (connection, b"")
    head, transport = _Head(), cycle.transport
    cycle.transport = head  # type: ignore[assignment]  # nothing is awaited before the head is written
    try:
        await send(message)
    finally:
        cycle.transport = transport
    connection = take_over(send, owner)
    return None if connection is None else (connection, head.data)


def take_over(send: Any, owner: Owner) -> StreamConnection | None:
    """The connection behind ``send`` (uvicorn's, after ``http.response.start`` of a chunked
    response), now the stream's; None when ``send`` is not uvicorn's httptools cycle in that state."""
    cycle = getattr(send, "__self__", None)
    if not isinstance(cycle, RequestResponseCycle) or not cycle.chunked_encoding or cycle.disconnected:
        return None
    transport = cycle.transport
    http = transport.get_protocol()
    if not isinstance(http, HttpToolsProtocol) or http.cycle is not cycle or transport.is_closing():
        return None
    connection = StreamConnection(transport, owner, http, cycle.keep_alive)
    transport.set_protocol(connection)
    http.connections.discard(http)
    http.connections.add(connection)  # type: ignore[arg-type]  # uvicorn calls shutdown() on each
    # The app's task may end now: uvicorn neither logs nor closes for a disconnected cycle.
    cycle.disconnected = True
    http.parser = None  # type: ignore[assignment]  # parser and protocol refer to each other
    http.flow.resume_reading()
    return connection


class StreamConnection(asyncio.Protocol):
    """An HTTP/1.1 connection in the middle of a chunked response that an event stream writes to."""

    __slots__ = ("_held", "_http", "_waiter", "closed", "keep_alive", "owner", "paused", "transport")

    def __init__(self, transport: asyncio.Transport, owner: Owner, http: HttpToolsProtocol, keep_alive: bool) -> None:
        self.transport = transport
        self.owner: Owner | None = owner
        self.paused = http.flow.write_paused
        self.closed = False
        #: Whether the connection may serve another request after this response (HTTP/1.1, and
        #: the server is not shutting down).
        self.keep_alive = keep_alive
        self._waiter: asyncio.Future[None] | None = None
        self._held = b""
        #: How to make the uvicorn protocol the connection goes back to.
        self._http = (type(http), http.config, http.server_state, http.app_state)

    # --- what the stream calls ---------------------------------------------------------------------

    def write(self, data: bytes) -> bool:
        """Write now, if the transport takes data (not paused); False: nothing was written."""
        if self.paused or self.closed:
            return False
        self.transport.write(data)
        return True

    async def send(self, data: bytes) -> None:
        """Write once the transport takes data; raises :class:`Closed` if it never will."""
        while self.paused and not self.closed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.closed:
            raise Closed()
        self.transport.write(data)

    def finish(self, *, keep_alive: bool) -> None:
        """The response is complete (its last chunk written): hand the connection back to uvicorn
        for the client's next request, or close it (``keep_alive`` False, or the server stops)."""
        if self.closed:
            return
        self._release()
        if not keep_alive or not self.keep_alive:
            self.transport.close()
            return
        protocol_class, config, server_state, app_state = self._http
        http = protocol_class(config=config, server_state=server_state, app_state=app_state)
        server_state.connections.discard(self)
        self.transport.set_protocol(http)
        http.connection_made(self.transport)
        http.on_response_complete()
        if self._held:
            self.transport.resume_reading()
            http.data_received(self._held)

    def close(self) -> None:
        """Close the connection (what was written still goes out first)."""
        if not self.closed:
            self._release()
            self.transport.close()

    def _release(self) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.let_go()

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self._http[2].connections.discard(self)
        self.paused = False
        self._release()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        """A client sends nothing on an event stream but, at most, its next request: kept for the
        protocol the connection goes back to; reading stops until then."""
        self._held += data
        self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    # --- what uvicorn calls on the members of server_state.connections ------------------------------

    def shutdown(self) -> None:
        """uvicorn stops: end the stream (its last chunk goes out), then close."""
        self.keep_alive = False
        if self.owner is not None:
            self.owner.shut_down()
        else:
            self.transport.close()
