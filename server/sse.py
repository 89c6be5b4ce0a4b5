"""Server-Sent Event streams: one job's (``GET /jobs/{id}/events``) or one tenant's (``GET /events``).

Exactly-once replay. A stream first subscribes to the hub (so nothing published from then on is
missed), then reads the event log after the client's last id and sends it, then sends what the hub
buffered meanwhile, dropping every event whose id is not greater than the last one sent. Log and
pub/sub are written by one Lua call, so the two together hold every event: none missing, none
repeated, in order. When the hub reports a gap (Redis reconnect), the stream reads the log again
from its last id.

Why not sse-starlette's ``EventSourceResponse``: it runs four tasks per connection (stream, ping,
disconnect listener, shutdown watcher), keeps a process-global shutdown state, and leaves
``send_timeout`` off by default, with pings outside it. At ten thousand streams that is ~45 KB and
a scheduler queue four times longer than needed. This response runs two tasks (the stream and a
disconnect listener), pings when nothing was written for ``ping_s``, puts every write — pings
included — under ``send_timeout``, and ends on the hub's drain (graceful shutdown).

The ping timer is lazy: one timer per stream, armed for ``ping_s`` after the last write it knows
of; when it fires after later writes it re-arms for ``ping_s`` after the newest one instead of
pinging. A stream that receives events therefore touches no timer per event (only the write's
send timeout), where a wait timeout re-armed on every event was half the server's CPU in a
10k-stream fan-out. It keeps sse-starlette's
wire format (``ServerSentEvent`` encodes the comment lines).

A tenant feed given an :class:`~jobcast.overview.OverviewFeed` also writes ``overview`` events
(see that module): one after its catch-up, then on a second lazy timer, armed for
``MIN_INTERVAL_S`` after events went by and for ``REFRESH_S`` otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass

from redis.exceptions import RedisError
from sse_starlette.event import ServerSentEvent
from starlette.types import Receive, Scope, Send

from jobcast.worker.models import Audience
from jobcast.worker.store import Event, Store

from .hub import TERMINAL, Hub, Item, Subscription, stream_id_key
from .limits import StreamsFull, StreamSlots
from .overview import MIN_INTERVAL_S, REFRESH_S, OverviewFeed
from .problems import TooManyRequests, Unavailable, problem_response

logger = logging.getLogger(__name__)

STREAM_ID_RE = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
REPLAY_PAGE = 500
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # nginx in front must not buffer the stream
]
PING = ServerSentEvent(comment="ping").encode()


class Gone(Exception):
    """The client's last id is older than the retained log: events after it were trimmed."""


@dataclass(frozen=True)
class StreamConfig:
    ping_s: float = 15.0
    send_timeout_s: float = 10.0
    retry_ms: int = 2000


MAX_PART = 2**64 - 1


def valid_stream_id(value: str) -> bool:
    """Of the form of a Redis stream id, within its range, and with room for an event after it."""
    if not STREAM_ID_RE.fullmatch(value):
        return False
    ms, seq = (int(part) for part in value.split("-"))
    return ms <= MAX_PART and seq <= MAX_PART and (ms, seq) != (MAX_PART, MAX_PART)


def frame(event: Event) -> bytes:
    return f"id: {event.id}\nevent: {event.event}\ndata: {event.data}\n\n".encode()


async def check_continuity(store: Store, audience: Audience, key: str, last_id: str) -> None:
    """Raise :class:`Gone` when events after ``last_id`` may have been trimmed from the log."""
    floor = await store.log_floor(audience, key)
    if floor is not None and stream_id_key(last_id) < stream_id_key(floor):
        raise Gone()


class EventStream:
    """The ASGI response of one stream. ``end_on_terminal``: the per-job stream ends after its
    job's terminal event; the tenant feed never does."""

    def __init__(
        self,
        *,
        hub: Hub,
        store: Store,
        audience: Audience,
        key: str,
        last_id: str | None,
        replay: bool,
        config: StreamConfig,
        slots: StreamSlots,
        tenant: str,
        overview: OverviewFeed | None = None,
    ) -> None:
        self.hub = hub
        self.store = store
        self.audience = audience
        self.key = key
        self.last_id = last_id
        self.replay = replay
        self.config = config
        self.slots = slots
        self.tenant = tenant
        self.ended = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_write = 0.0
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_due = False
        self.overview = overview
        self._overview_timer: asyncio.TimerHandle | None = None
        self._overview_due = False
        self._overview_sent = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            slot = await self.slots.acquire(self.tenant)
        except StreamsFull as full:
            problem = (
                TooManyRequests(
                    f"This tenant already has {full.cap} event streams open, its limit. Close some, or "
                    "follow many jobs over one GET /events stream.",
                    headers={"Retry-After": "5"},
                )
                if full.scope == "tenant"
                else Unavailable(f"This server has {full.cap} event streams open, its limit; retry shortly.")
            )
            await problem_response(problem)(scope, receive, send)
            return
        try:
            await self._serve(scope, receive, send)
        finally:
            await self.slots.release(self.tenant, slot)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self.hub.subscribe(self.audience, self.key) as sub:
            watcher = asyncio.create_task(self._watch_disconnect(receive, sub))
            try:
                await self._run(send, sub)
            except (RedisError, OSError) as exc:
                # The log cannot be read: end the stream; the client reconnects (with its last id)
                # and gets a 503 until Redis is back, then exactly what it missed.
                logger.warning("stream %s %s: Redis unavailable (%s); closed", self.audience, self.key, exc)
            except TimeoutError:
                self.hub.slow_consumers += 1
                logger.info("stream %s %s: client too slow to take a write; closed", self.audience, self.key)
            finally:
                for timer in (self._ping_timer, self._overview_timer):
                    if timer is not None:
                        timer.cancel()
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def _watch_disconnect(self, receive: Receive, sub: Subscription) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                sub.flag(closed=True)
                return

    async def _write(self, send: Send, body: bytes, *, more: bool = True) -> None:
        async with asyncio.timeout(self.config.send_timeout_s):
            await send({"type": "http.response.body", "body": body, "more_body": more})
        assert self._loop is not None
        self._last_write = self._loop.time()

    def _arm_ping(self, sub: Subscription) -> None:
        assert self._loop is not None
        self._ping_timer = self._loop.call_at(self._last_write + self.config.ping_s, self._ping_check, sub)

    def _ping_check(self, sub: Subscription) -> None:
        """The ping timer: ping when nothing was written for ``ping_s``, else look again then."""
        assert self._loop is not None
        if self._loop.time() < self._last_write + self.config.ping_s - 0.005:
            self._arm_ping(sub)
            return
        self._ping_timer = None
        self._ping_due = True
        sub.wake()

    def _arm_overview(self, sub: Subscription, at: float) -> None:
        """Have an overview written at loop time ``at``, unless one is due sooner already."""
        assert self._loop is not None
        timer = self._overview_timer
        if timer is not None:
            if timer.when() <= at:
                return
            timer.cancel()
        self._overview_timer = self._loop.call_at(at, self._overview_fire, sub)

    def _overview_fire(self, sub: Subscription) -> None:
        self._overview_timer = None
        self._overview_due = True
        sub.wake()

    async def _write_overview(self, send: Send, sub: Subscription) -> None:
        assert self.overview is not None and self._loop is not None
        self._overview_due = False
        await self._write(send, await self.overview.frame(self.tenant))
        self._overview_sent = self._loop.time()
        self._arm_overview(sub, self._overview_sent + REFRESH_S)

    async def _run(self, send: Send, sub: Subscription) -> None:
        self._loop = asyncio.get_running_loop()
        head = f"retry: {self.config.retry_ms}\n\n".encode()
        last_key = (-1, -1)
        if self.last_id is not None:
            last_key = stream_id_key(self.last_id)
        elif not self.replay:
            # Live only (tenant feed without a last id): from the log's tip as it is now that we
            # are subscribed — before the response starts, so a client that sees the headers
            # sees every later event. The "id:" line alone tells the client where it resumes.
            tip = await self.store.log_tip(self.audience, self.key)
            if tip is not None:
                last_key = stream_id_key(tip)
                head += f"id: {tip}\n\n".encode()
        async with asyncio.timeout(self.config.send_timeout_s):
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await self._write(send, head)
        self._arm_ping(sub)

        last_key = await self._catch_up(send, last_key)
        if self.overview is not None:
            await self._write_overview(send, sub)
        while not self.ended:
            if sub.closed or sub.overflowed:
                if sub.overflowed:
                    self.hub.slow_consumers += 1
                    logger.info("stream %s %s: subscriber fell behind; closed", self.audience, self.key)
                break
            if sub.resync:
                sub.reset()
                last_key = await self._catch_up(send, last_key)
                continue
            if sub.items:
                chunk, last_key = self._take(sub, last_key)
                if chunk:
                    await self._write(send, chunk)
                    if self.overview is not None:
                        self._arm_overview(sub, max(self._loop.time(), self._overview_sent + MIN_INTERVAL_S))
                continue
            if self._overview_due:
                await self._write_overview(send, sub)
                continue
            if self._ping_due:
                self._ping_due = False
                await self._write(send, PING)
                self._arm_ping(sub)
                continue
            await sub.wait(None)  # woken by the hub, or by the ping timer
        # End the response (a no-op if the client is already gone).
        with contextlib.suppress(TimeoutError):
            await self._write(send, b"", more=False)

    def _take(self, sub: Subscription, last_key: tuple[int, int]) -> tuple[bytes, tuple[int, int]]:
        """Concatenate the buffered frames newer than ``last_key`` (one write for a burst)."""
        parts: list[bytes] = []
        items = sub.items
        while items:
            item: Item = items.popleft()
            if item.key <= last_key:
                continue
            parts.append(item.frame)
            last_key = item.key
            if item.terminal and self.audience == "job":
                self.ended = True
                break
        return b"".join(parts), last_key

    async def _catch_up(self, send: Send, last_key: tuple[int, int]) -> tuple[int, int]:
        """Send the log after ``last_key``, page by page; returns the new last key."""
        after = "-" if last_key < (0, 0) else f"{last_key[0]}-{last_key[1]}"
        while True:
            events = await self.store.log_events(self.audience, self.key, after=after, count=REPLAY_PAGE)
            if not events:
                return last_key
            parts = []
            for event in events:
                parts.append(frame(event))
                after = event.id
                last_key = stream_id_key(event.id)
                if self.audience == "job" and event.event in TERMINAL:
                    self.ended = True
                    break
            await self._write(send, b"".join(parts))
            if self.ended or len(events) < REPLAY_PAGE:
                return last_key
