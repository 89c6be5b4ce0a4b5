"""How an event stream writes (:class:`jobcast.sse.Stream`'s writing half): at once from the
caller's stack while the client's connection takes data, else through a writer task of its own
that finishes the stalled write, then the backlog, under the send timeout, and hands the stream
back to the hub. See :mod:`jobcast.sse` for the whole design.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from enum import Enum
from typing import Any

from starlette.types import Message, Send

from jobcast.worker.models import Audience

from . import streamids
from .coroutines import as_coroutine, finish
from .hub import Hub, Item

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


class StreamWriting:
    """The writing half of a stream; :class:`jobcast.sse.Stream` holds the state (its slots) and
    provides the rest (ending, catching up)."""

    __slots__ = ("backlog", "last_key", "last_write", "phase", "resync", "writer")

    send: Send | None
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

    def _message(self, body: bytes, last: bool) -> Message:
        return {"type": "http.response.body", "body": body, "more_body": not last}

    def _write_now(self, body: bytes, now: float, *, last: bool = False) -> None:
        """Write from the caller's own stack; hand the write to a writer task if it must wait."""
        assert self.send is not None
        step = as_coroutine(self.send(self._message(body, last)))
        try:
            waiting = step.send(None)
        except StopIteration:
            self.hub.direct_writes += 1
            self.last_write = now
            if last:
                self._end()
            return
        except (OSError, RuntimeError) as exc:  # the connection is gone, or the response complete
            logger.info("stream %s %s: write failed (%s); closed", self.audience, self.key, exc)
            self._end()
            return
        self.hub.deferred_writes += 1
        self._start_writer(step, waiting, last=last)

    def _start_writer(self, step: Coroutine[Any, Any, None] | None, waiting: Any, *, last: bool = False) -> None:
        self.phase = Phase.BUSY
        self.writer = asyncio.create_task(self._write_later(step, waiting, last))

    async def _write_later(self, step: Coroutine[Any, Any, None] | None, waiting: Any, last: bool) -> None:
        """The writer task: finish the stalled write, then the backlog; then back to the hub."""
        try:
            if step is not None:
                try:
                    async with asyncio.timeout(self.hub.config.send_timeout_s):
                        await finish(step, waiting)
                except TimeoutError:
                    raise TooSlow() from None
                self.last_write = asyncio.get_running_loop().time()
                if last:
                    self._end()
                    return
            await self._flush()
        except TooSlow:
            self._too_slow()
        except LogUnreadable:
            await self._end_unreadable()
        finally:
            if self.writer is asyncio.current_task():
                self.writer = None

    async def _send(self, body: bytes, *, last: bool = False) -> None:
        assert self.send is not None
        try:
            async with asyncio.timeout(self.hub.config.send_timeout_s):
                await self.send(self._message(body, last))
        except TimeoutError:
            raise TooSlow() from None
        self.last_write = asyncio.get_running_loop().time()
        if last:
            self._end()

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
