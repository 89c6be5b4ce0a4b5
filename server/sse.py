"""One open Server-Sent Event stream: a job's (``GET /jobs/{id}/events``) or a tenant's (``GET /events``).

**The hub writes.** An idle stream has no task of its own: the hub calls :meth:`Stream.deliver`,
which writes the event's HTTP chunk — encoded once by the hub, the same bytes for every stream —
straight to the client's connection (:class:`jobcast.takeover.StreamConnection`), unless the
transport is paused (the client is not reading). Only then does the stream get a writer task of its
own, which waits for the connection to take data and writes what queued up behind (its bounded
backlog, in order), under ``send_timeout_s`` per write, and hands the stream back to the hub once
the backlog is empty. So the common path costs one ``transport.write`` per event: no task wake-up,
no future, no timer, no ASGI message; a slow client costs a task and a timer while it is slow. A
backlog beyond ``BACKLOG_MAX`` events, or a write that takes longer than the send timeout, cuts the
client off: its connection is closed and it resumes with ``Last-Event-ID``, losing nothing.

**Nothing per idle stream but the stream.** The request's own task opens the stream (see
:mod:`jobcast.routes.events`): uvicorn writes the response head, the stream takes the connection
over (:func:`jobcast.takeover.take_over`), writes the replay, and the task ends — uvicorn's
per-request objects and the app's frames go with it. What stays is this object, its connection
protocol and the transport. Pings come from the hub's one schedule. The stream ends by writing its
last chunk (terminal event, server drain), which hands the connection back to uvicorn for the
client's next request; a client that goes away ends it through the connection (``let_go``).

**Exactly-once replay.** A stream subscribes to the hub (as ``OPENING``: events queue in its
backlog) and waits for Redis to confirm its tenant channel's subscription before it reads the log,
then sends the log after the client's last id, then the backlog,
dropping every event whose id is not greater than the last one sent. Log and pub/sub are written by
one Lua call, so the two together hold every event: none missing, none repeated, in order. When the
hub reports a gap (Redis reconnect), the stream re-reads the log from its last id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.exceptions import RedisError
from starlette.types import Send

from jobcast.worker.models import Audience
from jobcast.worker.store import Event, Store

from . import streamids
from .frames import LAST_CHUNK, PING_CHUNK, chunk, event_frame
from .hub import TERMINAL, Hub, Item
from .limits import StreamSlots
from .overview import MIN_INTERVAL_S, REFRESH_S, OverviewFeed
from .stream_writing import BACKLOG_MAX, WRITING_FAILED, LogUnreadable, Phase, StreamWriting, TooSlow
from .takeover import Closed, StreamConnection, start

logger = logging.getLogger(__name__)

REPLAY_PAGE = 500
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # nginx in front must not buffer the stream
]


def frame(event: Event) -> bytes:
    return event_frame(event.id, event.event, event.data)


class Stream(StreamWriting):
    """One open event stream: a hub listener that writes to its client (how it writes:
    :class:`jobcast.stream_writing.StreamWriting`)."""

    __slots__ = (
        "audience",
        "ending",
        "hub",
        "key",
        "overview",
        "overview_key",
        "overview_sent",
        "slot",
        "slots",
        "store",
        "tenant",
    )

    def __init__(
        self,
        *,
        hub: Hub,
        store: Store,
        slots: StreamSlots,
        audience: Audience,
        key: str,
        tenant: str,
        slot: str,
        overview: OverviewFeed | None = None,
    ) -> None:
        self.hub = hub
        self.store = store
        self.slots = slots
        self.audience = audience
        self.key = key
        self.tenant = tenant
        self.slot = slot
        self.phase = Phase.OPENING
        self.backlog: list[Item] = []
        self.last_key = streamids.BEFORE_ALL
        self.last_write = 0.0
        self.resync = False
        self.ending = hub.draining
        self.conn = None
        self.writer: asyncio.Task[None] | None = None
        #: The tenant's overview events, when asked for (GET /events?overview=true), and when the
        #: last one was written (loop time) at which event (its last_key then).
        self.overview = overview
        self.overview_sent = 0.0
        self.overview_key = streamids.BEFORE_ALL
        hub.attach(audience, key, tenant, self)

    # --- what the hub calls --------------------------------------------------------------------

    def deliver(self, item: Item, now: float) -> None:
        if self.phase is Phase.IDLE:
            if item.key <= self.last_key:
                return
            self.last_key = item.key
            self._write_now(item.chunk, now, last=item.terminal and self.audience == "job")
        elif self.phase is not Phase.ENDED:
            if len(self.backlog) >= BACKLOG_MAX:
                self._cut(f"fell more than {BACKLOG_MAX} events behind")
            else:
                self.backlog.append(item)

    def deliver_many(self, items: list[Item], now: float) -> None:
        if self.phase is not Phase.IDLE:
            for item in items:
                self.deliver(item, now)
            return
        body, last = self._newer(items)
        if body:
            self._write_now(chunk(body), now, last=last)

    def flag(self, *, resync: bool = False, closed: bool = False) -> None:
        self.resync = self.resync or resync
        self.ending = self.ending or closed
        if self.phase is Phase.IDLE:
            if self.resync:
                self._start_writer(None)
            elif self.ending:
                self._write_now(b"", asyncio.get_running_loop().time(), last=True)

    def ping(self, now: float, quiet_since: float) -> None:
        if self.phase is Phase.IDLE and self.last_write < quiet_since:
            self._write_now(PING_CHUNK, now)

    # --- what the overview schedule calls (jobcast.overview) ------------------------------------

    def overview_wanted(self, now: float) -> bool:
        """Idle, and job events went by since the last overview, or it is time for a refresh."""
        if self.phase is not Phase.IDLE:
            return False
        since = now - self.overview_sent
        return since >= REFRESH_S or (self.last_key != self.overview_key and since >= MIN_INTERVAL_S)

    def write_overview(self, frame: bytes, now: float) -> None:
        if self.phase is Phase.IDLE:
            self.overview_sent, self.overview_key = now, self.last_key
            self._write_now(chunk(frame), now)

    async def catch_up(self) -> None:
        """Send the log after the last id sent, page by page (one write per page)."""
        while self.phase is not Phase.ENDED:
            try:
                events = await self.store.log_events(self.audience, self.key, after=self._after(), count=REPLAY_PAGE)
            except (RedisError, OSError) as exc:
                raise LogUnreadable(str(exc)) from None
            await self.write_events(events)
            if len(events) < REPLAY_PAGE:
                return

    async def resume(self) -> None:
        """After a gap: catch up from the last id sent, unless the log no longer has it (a failover
        lost it): then the stream ends, and the client's reconnect with that id is told to resync."""
        if self.last_key != streamids.BEFORE_ALL:
            try:
                kept = await self.store.log_has(self.audience, self.key, self._after())
            except (RedisError, OSError) as exc:
                raise LogUnreadable(str(exc)) from None
            if not kept:
                logger.warning("stream %s %s: its last event is no longer in the log; closed", self.audience, self.key)
                await self._send(b"", last=True)
                return
        await self.catch_up()

    async def write_events(self, events: list[Event]) -> None:
        """Write events read from the log (one write); ends a job's stream at its terminal event."""
        body, last = self._frames(events)
        if body or last:
            await self._send(body, last=last)

    def _frames(self, events: list[Event]) -> tuple[bytes, bool]:
        """The frames of ``events`` (the last id moves on), up to a job's terminal event; and
        whether that ends the stream."""
        parts: list[bytes] = []
        for event in events:
            parts.append(frame(event))
            self.last_key = streamids.order(event.id)
            if self.audience == "job" and event.event in TERMINAL:
                return b"".join(parts), True
        return b"".join(parts), False

    def _after(self) -> str:
        return "-" if self.last_key == streamids.BEFORE_ALL else streamids.render(self.last_key)

    # --- ending ----------------------------------------------------------------------------------

    def _end(self) -> None:
        self.phase = Phase.ENDED
        self.hub.detach(self.audience, self.key, self.tenant, self)
        if self.overview is not None:
            self.overview.unfollow(self)

    def _too_slow(self) -> None:
        self._cut(f"too slow to take a write within {self.hub.config.send_timeout_s}s")

    def _cut(self, why: str) -> None:
        """Stop writing to a client that does not read; its connection is closed."""
        if self.phase is not Phase.BUSY and self.phase is not Phase.OPENING:
            return
        self.hub.slow_consumers += 1
        logger.info("stream %s %s: client %s; cut off", self.audience, self.key, why)
        self._end()
        if self.writer is not None and self.writer is not asyncio.current_task():
            self.writer.cancel()
        if self.conn is not None:
            self.conn.close()  # what it was sent still goes out first: it ends in EOF

    async def _end_unreadable(self) -> None:
        logger.warning("stream %s %s: Redis unavailable; closed", self.audience, self.key)
        try:
            await self._send(b"", last=True)
        except TooSlow:
            self._too_slow()
        except Closed:
            self._end()

    def close(self) -> None:
        """Let go of the hub and of the writer task (the stream is over, or never started)."""
        if self.phase is not Phase.ENDED:
            self._end()
        if self.writer is not None and self.writer is not asyncio.current_task():
            self.writer.cancel()
        self.writer = None

    # --- what the connection calls (jobcast.takeover.Owner) --------------------------------------

    def let_go(self) -> None:
        """The connection is no longer this stream's (the client went away, it was closed, or the
        response is complete): let go of everything, the stream's slot too."""
        self.close()
        self.slots.release_soon(self.tenant, self.slot)

    def shut_down(self) -> None:
        self.flag(closed=True)

    # --- the request's own task ------------------------------------------------------------------

    async def serve(self, send: Send, opening: Callable[[], tuple[bytes, list[Event], bool]]) -> None:
        """Start the response (uvicorn writes the head), take the connection over, write the head
        and the replay (``opening()`` hands them over) and hand the stream to the hub. The request's
        task then ends; the stream lives on in the hub and its connection."""
        started = await start(send, self, HEADERS)
        if started is None:  # the client is gone already (or a request came behind meanwhile)
            self.let_go()
            await send({"type": "http.response.body", "body": b"", "more_body": False})  # (a no-op if gone)
            return
        await self.adopt(*started, opening)

    async def adopt(
        self, connection: StreamConnection, http_head: bytes, opening: Callable[[], tuple[bytes, list[Event], bool]]
    ) -> None:
        """The stream's connection from now on: write the response head (when not written yet), the
        head and the replay, then live in the hub."""
        self.conn = connection
        await self._open(http_head, *opening())
        if self.overview is not None and self.phase is Phase.IDLE:
            # Followed from now on (an end unfollows); the first overview right after the catch-up.
            self.overview.follow(self)
            self.write_overview(await self.overview.frame(self.tenant), asyncio.get_running_loop().time())

    async def _open(self, http_head: bytes, head: bytes, replay: list[Event], more: bool) -> None:
        """Write the response head (when uvicorn left it to us), the stream's head and the first
        replay page in one write; then the rest of the log, then what queued meanwhile."""
        try:
            body, last = self._frames(replay)
            data = http_head + chunk(head + body)
            await self._send_chunks(data + LAST_CHUNK if last else data, last=last)
            if more:
                await self.catch_up()
            await self._flush()
        except WRITING_FAILED as failure:
            await self.end_on(failure)
