"""How an event stream writes (:class:`jobcast.sse.Stream`'s writing half): at once from the
caller's stack while the client's connection takes data, else through a writer task of its own
that finishes the stalled write, then the backlog, under the send timeout, and hands the stream
back to the hub. What it writes to is the connection itself (:class:`jobcast.takeover.StreamConnection`):
HTTP chunks, the hub's own for a live event. See :mod:`jobcast.sse` for the whole design.
"""

from __future__ import annotations

import asyncio
import logging
from enum import Enum

from jobcast.worker.models import Audience

from . import streamids
from .frames import LAST_CHUNK, chunk
from .hub import Hub, Item
from .takeover import Closed, StreamConnection

logger = logging.getLogger("jobcast.sse")

#: Events a stream may have queued while its client is not reading before it is cut off.
BACKLOG_MAX = 512


class Phase(Enum):
    OPENING = "opening"  # the request's task writes the replay; events queue
    IDLE = "idle"  # the hub writes each event at once
    BUSY = "busy"  # a writer task finishes a stalled write, then the backlog; events queue
    ENDED = "ended"


class TooSlow(Exception):
    """A write to the client did not complete within the send timeout."""


class LogUnreadable(Exception):
    """The event log could not be read (Redis)."""


#: What ends a stream's writing: :meth:`StreamWriting.end_on` says how.
WRITING_FAILED = (TooSlow, LogUnreadable, Closed)


class StreamWriting:
    """The writing half of a stream; :class:`jobcast.sse.Stream` holds the state (its slots) and
    provides the rest (ending, catching up)."""

    __slots__ = ("backlog", "conn", "last_key", "last_write", "phase", "resync", "writer")

    conn: StreamConnection | None
    hub: Hub
    audience: Audience
    key: str
    phase: Phase
    backlog: list[Item]
    last_key: streamids.Order
    last_write: float
    writer: asyncio.Task[None] | None
    resync: bool
    ending: bool

    def _end(self) -> None:
        raise NotImplementedError

    def _too_slow(self) -> None:
        raise NotImplementedError

    async def _end_unreadable(self) -> None:
        raise NotImplementedError

    async def catch_up(self) -> None:
        raise NotImplementedError

    async def resume(self) -> None:
        """Re-read the log after a gap (the hub reconnected): :meth:`catch_up`, or end the stream."""
        raise NotImplementedError

    def _complete(self) -> None:
        """The last chunk is written: the stream is over, its connection free for another request
        (closed instead when the server drains: clients reconnect elsewhere)."""
        self._end()
        assert self.conn is not None
        self.conn.finish(keep_alive=not self.hub.draining)

    def _write_now(self, data: bytes, now: float, *, last: bool = False) -> None:
        """Write HTTP chunks from the caller's own stack (``last``: and end the response); hand
        the write to a writer task if the connection takes no data now."""
        conn = self.conn
        assert conn is not None
        if last:
            data += LAST_CHUNK
        if conn.write(data):
            self.hub.direct_writes += 1
            self.last_write = now
            if last:
                self._complete()
        elif conn.closed:
            self._end()  # the client is gone; its connection lets go of the stream
        else:
            self.hub.deferred_writes += 1
            self._start_writer(data, last=last)

    def _start_writer(self, pending: bytes | None, *, last: bool = False) -> None:
        self.phase = Phase.BUSY
        self.writer = asyncio.create_task(self._write_later(pending, last))

    async def _write_later(self, pending: bytes | None, last: bool) -> None:
        """The writer task: finish the stalled write, then the backlog; then back to the hub."""
        try:
            if pending is not None:
                await self._send_chunks(pending, last=last)
                if last:
                    return
            await self._flush()
        except WRITING_FAILED as failure:
            await self.end_on(failure)
        finally:
            if self.writer is asyncio.current_task():
                self.writer = None

    async def end_on(self, failure: Exception) -> None:
        """How a stream's writing ends when it fails (one of :data:`WRITING_FAILED`): a client too
        slow is cut, a log Redis cannot read ends the stream (the client resumes), a connection
        already gone just ends it. (Not a context manager: every stream open would pay for one.)"""
        if isinstance(failure, TooSlow):
            self._too_slow()
        elif isinstance(failure, LogUnreadable):
            await self._end_unreadable()
        else:
            self._end()

    async def _send(self, body: bytes, *, last: bool = False) -> None:
        """Write ``body`` (SSE frames) as one chunk, waiting up to the send timeout for the
        connection to take it; raises :class:`TooSlow`, or :class:`Closed` if the client is gone."""
        data = chunk(body)
        await self._send_chunks(data + LAST_CHUNK if last else data, last=last)

    async def _send_chunks(self, data: bytes, *, last: bool) -> None:
        conn = self.conn
        assert conn is not None
        if not conn.write(data):
            try:
                async with asyncio.timeout(self.hub.config.send_timeout_s):
                    await conn.send(data)
            except TimeoutError:
                raise TooSlow() from None
        self.last_write = asyncio.get_running_loop().time()
        if last:
            self._complete()

    async def _flush(self) -> None:
        """Write what queued (re-reading the log first after a gap), then hand the stream to the
        hub; or end it, after its terminal event or when the server drains."""
        while self.phase is not Phase.ENDED:
            if self.resync:
                self.resync = False
                self.backlog = []
                await self.resume()
                continue
            if self.backlog:
                await self._write_backlog()
                continue
            if self.ending:
                await self._send(b"", last=True)
                return
            self.phase = Phase.IDLE  # nothing awaited since the backlog was found empty
            return

    async def _write_backlog(self) -> None:
        items, self.backlog = self.backlog, []
        body, last = self._newer(items)
        if body or last:
            await self._send(body, last=last)

    def _newer(self, items: list[Item]) -> tuple[bytes, bool]:
        """The frames of ``items`` newer than the last one sent, as one body (the last id moves
        on); and whether they end the stream (a job's terminal event: nothing after it is taken)."""
        parts: list[bytes] = []
        for item in items:
            if item.key <= self.last_key:
                continue
            parts.append(item.frame)
            self.last_key = item.key
            if item.terminal and self.audience == "job":
                return b"".join(parts), True
        return b"".join(parts), False
