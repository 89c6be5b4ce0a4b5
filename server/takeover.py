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
protocol of the kind it came from (the front protocol's below, or uvicorn's; kept alive, as if it had
completed the response); a client that goes away ends the stream through
:meth:`StreamConnection.connection_lost`.

uvicorn offers no public hook for this (ASGI has no way to hand a connection over), so what it relies
on inside uvicorn is listed in :data:`UVICORN_INTERNALS`, used here and in :mod:`jobcast.http_guard`
(its protocol class) and nowhere else, and
``tests/test_uvicorn_seam.py`` fingerprints each one: an upgrade that changes one fails loudly.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Protocol

import httptools
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from .http_guard import GuardedHttpToolsProtocol, problem_bytes, transport_of
from .problems import Problem

logger = logging.getLogger("jobcast.sse")
#: The head guard's lines (jobcast.http_guard), written by the front protocol too.
guard_logger = logging.getLogger("jobcast.http_guard")
#: uvicorn's access log, which the front protocol writes for the streams it opens.
access_logger = logging.getLogger("uvicorn.access")
#: How a stream's connection goes back to HTTP when the stream ends: the protocol class it came from
#: (uvicorn's, or the front protocol's), config, server state, app state.
HttpBack = tuple["type[HttpToolsProtocol] | type[FrontProtocol]", Any, Any, dict[str, Any]]

#: The uvicorn internals this module depends on, and how (tests/test_uvicorn_seam.py fingerprints each).
UVICORN_INTERNALS = {
    "RequestResponseCycle.__init__": "the cycle keeps transport, flow, chunked_encoding, disconnected and "
    "response_started, read here",
    "RequestResponseCycle.send": "a bound method of the cycle (how the app's send leads here); after "
    "http.response.start with no length it has written the head and chunk-frames the body; unless the "
    "flow is paused it awaits nothing before writing the head with one cycle.transport.write (start "
    "captures it there), nor before writing a body (cancelled_at_shutdown's answer); it sets "
    "response_started, chunked_encoding and expected_content_length before that head write, and writes "
    "nothing else through cycle.transport from then until the body (jobcast.http_guard.HeadWithBody "
    "holds a Content-Length response's head for its body)",
    "RequestResponseCycle.run_asgi": "logs nothing and leaves the transport alone when the app returns "
    "with the cycle marked disconnected (set here: the stream owns the connection from then on)",
    "HttpToolsProtocol.__init__": "per-connection state: config, server_state, app_state, cycle, flow, parser",
    "HttpToolsProtocol.connection_made": "a new protocol for a connection already open (the hand-back)",
    "HttpToolsProtocol.on_response_complete": "what uvicorn does once a response is complete (keep-alive)",
    "HttpToolsProtocol.shutdown": "called on every member of server_state.connections at shutdown",
    # The front protocol (FrontProtocol): in uvicorn's place for the first request of a connection.
    "Server.startup": "makes each connection's protocol as config.http_protocol_class(config=, server_state=, "
    "app_state=), the signature FrontProtocol takes (and jobcast.app.JobcastServer's standby acceptors make "
    "them the same way, with self.lifespan.state), and leaves its listening servers in self.servers",
    "Server.shutdown": "calls shutdown() on each member of server_state.connections, waits for the "
    "connections and server_state.tasks to end, then cancels the tasks left (an open in flight is one)",
    "ServerState.__init__": "connections, tasks and default_headers (uvicorn's date and server headers, "
    "renewed each second), which the front protocol uses as uvicorn's protocol does",
    "HttpToolsProtocol.data_received": "parses what it is given from the start of a request: the hand-over "
    "gives it every byte the front protocol read",
    "HttpToolsProtocol.on_header": "how uvicorn reads header names and values (lower-cased names, trailing "
    "whitespace stripped), which the front protocol does the same way",
    "HttpToolsProtocol.on_headers_complete": "how uvicorn makes a request's scope (path, raw_path, query_string, "
    "keep-alive), which the front protocol makes the same way for a stream open; it makes the request's "
    "cycle (self.cycle) with the protocol's transport as cycle.transport, which jobcast.http_guard wraps",
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


def pipelined_behind(send: Any) -> bool:
    """Whether uvicorn has read another request of the same connection behind the one ``send``
    answers (HTTP/1.1 pipelining), or the start of one (its parser holds what it read, which a
    take-over would lose): the connection cannot be taken over for a stream."""
    cycle = getattr(send, "__self__", None)
    if not isinstance(cycle, RequestResponseCycle):
        return False
    http = cycle.transport.get_protocol()
    if not isinstance(http, HttpToolsProtocol):
        return False
    return http.cycle is not cycle or (isinstance(http, GuardedHttpToolsProtocol) and http.reading_head)


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
    transport = transport_of(cycle)
    http = transport.get_protocol()
    if not isinstance(http, HttpToolsProtocol) or http.cycle is not cycle or transport.is_closing():
        return None
    back = (type(http), http.config, http.server_state, http.app_state)
    connection = StreamConnection(transport, owner, back, paused=http.flow.write_paused, keep_alive=cycle.keep_alive)
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

    def __init__(
        self, transport: asyncio.Transport, owner: Owner, back: HttpBack, *, paused: bool, keep_alive: bool
    ) -> None:
        self.transport = transport
        self.owner: Owner | None = owner
        self.paused = paused
        self.closed = False
        #: Whether the connection may serve another request after this response (HTTP/1.1, and
        #: the server is not shutting down).
        self.keep_alive = keep_alive
        self._waiter: asyncio.Future[None] | None = None
        self._held = b""
        #: How to make the uvicorn protocol the connection goes back to.
        self._http = back

    def hold(self, data: bytes) -> None:
        """What the client sent after its request, before the stream took the connection over."""
        if data:
            self.data_received(data)

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
        """The response is complete (its last chunk written): hand the connection back for the
        client's next request, or close it (``keep_alive`` False, or the server stops). It goes back
        to the protocol it came from: the front protocol (so a stream asked for next on it is opened
        there too), or uvicorn's, as if either had just completed a response (kept alive)."""
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
        if isinstance(http, FrontProtocol):
            http.kept_alive()
            if self.paused:
                http.pause_writing()
        else:
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


# --- the front protocol: stream opens read before uvicorn ---------------------------------------------


class Opened(Protocol):
    """A stream the front protocol opened: it owns the connection once taken over."""

    @property
    def owner(self) -> Owner:
        """What the connection tells (:class:`StreamConnection`)."""

    async def serve_on(self, connection: StreamConnection, http_head: bytes) -> None:
        """Write ``http_head`` (the response head) with the stream's first bytes, and live on."""


class Opener(Protocol):
    """What the front protocol asks of the application's event-stream routes."""

    #: The response headers of a stream, after uvicorn's default ones.
    headers: list[tuple[bytes, bytes]]
    #: The tasks of the requests being served (the application cancels them at shutdown).
    requests: set[asyncio.Task[Any]]

    def wants(self, path: str) -> bool:
        """Whether a GET of ``path`` is a stream route."""

    async def open(self, scope: dict[str, Any]) -> Opened | None:
        """The opened stream; None for every other answer (an error, a 204): uvicorn gives that one."""

    def cut_short(self, scope: dict[str, Any]) -> Problem:
        """The answer to an open the server's shutdown cancelled (logged here)."""


#: The front protocol's states.
_HEAD, _MATCHED, _READY, _OPENING, _DONE = range(5)
#: What the parser skips before a request line: empty lines (CR and LF bytes).
_EMPTY_LINES = re.compile(rb"[\r\n]*")
#: Headers that give a request a body (or ask for a 100 Continue): such a GET is uvicorn's to answer.
_BODY_HEADERS = frozenset((b"content-length", b"transfer-encoding", b"expect"))


class FrontProtocol(asyncio.Protocol):
    """The protocol of every connection ``jobcast web`` accepts: it reads the first request head
    itself and, when that asks for an event stream (a plain HTTP/1.1 ``GET`` of a stream route),
    opens the stream without uvicorn — no uvicorn protocol, no ASGI scope and cycle, no request
    task of uvicorn's — writes the response head and the stream's first bytes in one write, and
    hands the connection to the stream (:class:`StreamConnection`). Every other request, and every
    stream open that is not answered 200 (an error, a 204), goes to uvicorn's protocol with the bytes
    read so far, as if uvicorn had read them from the start: it parses them again and answers as it
    always does. So a connection costs uvicorn's per-connection machinery only when it is not an
    event stream, which is what makes ~10k stream opens a second possible in one process
    (BENCHMARKS.md §5).

    The head is bounded like :mod:`jobcast.http_guard`'s (deadline, size; over the size, the hand
    over lets the guard answer 431). At shutdown an open in flight ends at once (the hub drains),
    and one cancelled by a timed-out graceful shutdown is answered 503 and logged once, as the
    application does for its requests.
    """

    # Set on the subclass front_protocol() makes.
    opener: Opener
    uvicorn_protocol: type[HttpToolsProtocol]
    head_timeout_s: float
    max_head_bytes: int
    #: uvicorn's proxy-headers middleware (when the config asks for it), for the access line's client.
    _proxy: ProxyHeadersMiddleware | None = None

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Any = None) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser: Any = None
        self.state = _HEAD
        #: Whether the request line has begun (the parser skips empty lines before it).
        self.begun = False
        self.received = b""
        self.head_length = 0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.scope: dict[str, Any] = {}
        self.paused = False
        self.keep_alive = True
        #: uvicorn's shutdown asked this connection to end after its response.
        self.stopping = False
        #: Kept alive after a response, and nothing of the next request read yet (:meth:`kept_alive`).
        self.idle = False
        self.timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server_state.connections.add(self)
        self.parser = httptools.HttpRequestParser(self)
        self.timer = asyncio.get_running_loop().call_later(self.head_timeout_s, self._head_timed_out)

    def kept_alive(self) -> None:
        """The connection comes back after a response (a stream that ended): until the client's
        next request begins, uvicorn's keep-alive timeout closes it when idle; the head deadline
        runs from that request's first byte (as :mod:`jobcast.http_guard` times it)."""
        self._stop_timer()
        self.idle = True
        self.timer = asyncio.get_running_loop().call_later(self.config.timeout_keep_alive, self._idle_timed_out)

    def data_received(self, data: bytes) -> None:
        if self.idle:
            self.idle = False
            self._stop_timer()
            self.timer = asyncio.get_running_loop().call_later(self.head_timeout_s, self._head_timed_out)
        start = len(self.received)
        self.received += data
        if self.state != _HEAD:
            # Sent while the stream opens: kept for later (at most a head's worth read meanwhile).
            if self.state == _OPENING and len(self.received) - self.head_length > self.max_head_bytes:
                self.transport.pause_reading()
            return
        # The parser reads up to the end of the head: a stream request has no body, so what follows
        # is the client's next request, kept unread for the protocol that serves it after the stream.
        # Empty lines before the request line (which the parser skips, RFC 9112 §2.2) end no head.
        if self.begun:
            end = self.received.find(b"\r\n\r\n", max(0, start - 3))
        else:
            blank = _EMPTY_LINES.match(self.received, start)
            end = self.received.find(b"\r\n\r\n", blank.end() if blank else start)
        self.head_length = len(self.received) if end < 0 else end + 4
        try:
            self.parser.feed_data(data if end < 0 else data[: self.head_length - start])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self.state = _DONE  # uvicorn answers it (its 400, or the upgrade)
        if self.state == _READY:
            self._open()
        elif self.state != _HEAD or len(self.received) > self.max_head_bytes:
            self._hand_over()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self._stop_timer()
        if self.state != _OPENING:
            self.state = _DONE
        self.parser = None

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    # --- what uvicorn calls on the members of server_state.connections ------------------------------

    def shutdown(self) -> None:
        if self.state == _OPENING:
            self.keep_alive = False  # the stream, draining, ends at once and closes the connection
            self.stopping = True  # a refusal, answered by uvicorn's protocol, closes it too
        else:
            self.transport.close()

    # --- the parser's callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.begun = True
        if self.state != _HEAD:
            self.state = _DONE  # a second (pipelined) request: all of it is uvicorn's

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.rstrip(b" \t")))  # as uvicorn reads them

    def on_headers_complete(self) -> None:
        if self.state != _HEAD:
            return
        self._stop_timer()
        self.state = _DONE
        parser = self.parser
        if (
            parser.get_method() != b"GET"
            or parser.get_http_version() != "1.1"
            or parser.should_upgrade()
            or self.config.limit_concurrency is not None
            or self.config.root_path
            or any(name in _BODY_HEADERS for name, _ in self.headers)
        ):
            return
        url = httptools.parse_url(self.url)
        raw_path = url.path
        if b"%" in raw_path or not raw_path.isascii():
            return
        path = raw_path.decode("ascii")
        if not self.opener.wants(path):
            return
        transport = self.transport
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "server": _address(transport.get_extra_info("sockname")),
            "client": _address(transport.get_extra_info("peername")),
            "scheme": "http",
            "method": "GET",
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": url.query or b"",
            "headers": self.headers,
            "state": self.app_state.copy(),
        }
        self.keep_alive = parser.should_keep_alive()
        self.state = _MATCHED

    def on_message_complete(self) -> None:
        if self.state == _MATCHED:
            self.state = _READY

    # --- the stream --------------------------------------------------------------------------------

    def _open(self) -> None:
        self.state = _OPENING
        self.parser = None  # parser and protocol refer to each other
        task = asyncio.get_running_loop().create_task(self._serve())
        for tasks in (self.server_state.tasks, self.opener.requests):  # uvicorn's shutdown and the app's
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _serve(self) -> None:
        try:
            opened = await self.opener.open(self.scope)
        except asyncio.CancelledError:
            await self._cut_short()
            raise
        transport = self.transport
        if transport.is_closing():  # the client went away meanwhile (or the server closed it)
            self.state = _DONE
            if opened is not None:
                opened.owner.let_go()
            return
        if opened is None:
            self._hand_over()
            return
        self.state = _DONE
        back = (type(self), self.config, self.server_state, self.app_state)
        connection = StreamConnection(transport, opened.owner, back, paused=self.paused, keep_alive=self.keep_alive)
        transport.set_protocol(connection)
        self.server_state.connections.discard(self)
        self.server_state.connections.add(connection)
        connection.hold(self.received[self.head_length :])
        self.received = b""
        await self._log_access(200)
        try:
            await opened.serve_on(connection, self._response_head())
        except Exception:  # a bug: logged as uvicorn logs an application's, the connection closed
            logger.exception("Exception in the event stream of %s", self.scope["path"])
            connection.close()

    async def _cut_short(self) -> None:
        """The server's shutdown cancelled the open: answer it 503 (and close) with its access
        line, as the app and uvicorn do."""
        self.state = _DONE
        if self.transport.is_closing():
            return
        problem = self.opener.cut_short(self.scope)
        await self._log_access(problem.status)  # (awaits nothing: the task's cancellation is not met again)
        self.transport.write(problem_bytes(problem, self.server_state.default_headers))
        self.transport.close()

    def _response_head(self) -> bytes:
        head = [b"HTTP/1.1 200 OK\r\n"]
        for name, value in self.server_state.default_headers:
            head += (name, b": ", value, b"\r\n")
        for name, value in self.opener.headers:
            head += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"transfer-encoding: chunked\r\n\r\n")
        return b"".join(head)

    async def _log_access(self, status: int) -> None:
        """uvicorn's access line for this request, as uvicorn would write it (the client from the
        proxy's headers, when it is trusted)."""
        access = access_logger
        if not access.hasHandlers():
            return
        if self.config.proxy_headers:
            cls = type(self)
            if cls._proxy is None:
                cls._proxy = ProxyHeadersMiddleware(_nothing, trusted_hosts=self.config.forwarded_allow_ips)
            await cls._proxy(self.scope, _nothing, _nothing)  # type: ignore[arg-type]  # sets scope["client"]
        client = self.scope.get("client")
        path = self.scope["raw_path"].decode("latin1")
        if self.scope["query_string"]:
            path += "?" + self.scope["query_string"].decode("ascii", "replace")
        peer = f"{client[0]}:{client[1]}" if client else ""
        access.info('%s - "%s %s HTTP/%s" %d', peer, "GET", path.replace('"', "%22"), "1.1", status)

    # --- uvicorn's, the rest --------------------------------------------------------------------------

    def _hand_over(self) -> None:
        """Give the connection to uvicorn's protocol, with every byte read so far."""
        self.state = _DONE
        self._stop_timer()
        self.parser = None
        self.server_state.connections.discard(self)
        transport = self.transport
        if transport.is_closing():
            return
        http = self.uvicorn_protocol(config=self.config, server_state=self.server_state, app_state=self.app_state)
        transport.set_protocol(http)
        http.connection_made(transport)
        if self.paused:
            http.pause_writing()
        data, self.received = self.received, b""
        transport.resume_reading()
        http.data_received(data)
        if self.stopping:  # as uvicorn's shutdown would have told it: close after this response
            http.shutdown()

    def _head_timed_out(self) -> None:
        self.timer = None
        if self.state == _HEAD and not self.transport.is_closing():
            peer = _address(self.transport.get_extra_info("peername"))
            guard_logger.info(
                "closing a connection from %s: no complete request head within %g s",
                f"{peer[0]}:{peer[1]}" if peer else "an unknown peer",
                self.head_timeout_s,
            )
            self.transport.close()

    def _idle_timed_out(self) -> None:
        self.timer = None
        if self.idle and not self.transport.is_closing():
            self.transport.close()  # (uvicorn's keep-alive timeout logs nothing either)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


async def _nothing(*args: Any) -> Any:
    return None


def _address(info: Any) -> tuple[str, int] | None:
    """(host, port) of a socket address, as uvicorn puts it in the scope."""
    return (str(info[0]), int(info[1])) if isinstance(info, tuple) and len(info) >= 2 else None


def front_protocol(
    opener: Opener,
    uvicorn_protocol: type[HttpToolsProtocol],
    *,
    head_timeout_s: float,
    max_head_bytes: int,
) -> type[FrontProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``: stream opens read by ``opener``,
    everything else by ``uvicorn_protocol`` (the head guard's)."""
    return type(
        "FrontProtocol",
        (FrontProtocol,),
        {
            "opener": opener,
            "uvicorn_protocol": uvicorn_protocol,
            "head_timeout_s": head_timeout_s,
            "max_head_bytes": max_head_bytes,
        },
    )
