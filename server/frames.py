"""The bytes of an event stream: every frame Jobcast sends is encoded here, by sse-starlette's
``ServerSentEvent``, with one line separator (``\\n``) for events, pings and the ``retry`` head alike."""

from __future__ import annotations

from functools import lru_cache

from sse_starlette.event import ServerSentEvent

#: Event frames kept encoded: streams opened together replay the same events (a reconnect storm on
#: one job, a burst of clients of one tenant), each encoded once. Bounded: the size of the
#: largest events times this many.
FRAME_CACHE = 1024

#: The line separator of every frame (the SSE grammar allows \r\n, \r or \n; one is used throughout).
SEPARATOR = "\n"


@lru_cache(maxsize=FRAME_CACHE)
def event_frame(event_id: str, event: str, data: str) -> bytes:
    return ServerSentEvent(data, event=event, id=event_id, sep=SEPARATOR).encode()


def unnumbered_frame(event: str, data: str) -> bytes:
    """An event without an id (not in the log, never replayed: ``overview``)."""
    return ServerSentEvent(data, event=event, sep=SEPARATOR).encode()


def position_frame(event_id: str) -> bytes:
    """A frame with an id and nothing else: where a live stream starts, for the client's Last-Event-ID."""
    return ServerSentEvent(id=event_id, sep=SEPARATOR).encode()


@lru_cache(maxsize=8)
def retry_frame(retry_ms: int) -> bytes:
    return ServerSentEvent(retry=retry_ms, sep=SEPARATOR).encode()


#: The keep-alive comment written to a stream that was silent for ``sse_ping_s``.
PING = ServerSentEvent(comment="ping", sep=SEPARATOR).encode()


# --- on the wire: an event stream is one chunked HTTP/1.1 response ----------------------------------


def chunk(body: bytes) -> bytes:
    """``body`` as one chunk of a chunked response (nothing for an empty body). The hub frames each
    event once, and every stream writes those same bytes (:mod:`jobcast.takeover`)."""
    return b"%x\r\n%b\r\n" % (len(body), body) if body else b""


#: The last chunk of a chunked response: the stream is over.
LAST_CHUNK = b"0\r\n\r\n"
PING_CHUNK = chunk(PING)
