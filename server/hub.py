"""The event hub: ONE Redis pub/sub connection per server process, fanned out in memory.

Every state change PUBLISHes one message on ``jobcast:events`` (see ``worker/lua/jobs.lua``):
``{job stream id}\\n{tenant stream id}\\n{tenant}\\n{job id}\\n{event}\\n{data}``. The hub parses it
once and encodes it once per audience — the SSE frame for the job's own stream (with the job-log
id) and the one for the tenant feed (with the tenant-log id) — then appends the same bytes to every
local subscriber's buffer. No per-subscriber work happens beyond one append and, if the subscriber
was idle, one wake-up.

Buffers are bounded. A subscriber that falls ``BUFFER_MAX`` events behind is marked
``overflowed`` and gets nothing more; its stream ends and the client reconnects with
``Last-Event-ID``, losing nothing, because the event log (Redis Streams) is the source of truth
and pub/sub only the doorbell.

When the Redis connection drops, the hub reconnects with backoff and marks every subscriber
``resync``: something may have been published while nobody listened, so streams re-read the log
from the last id they sent, and long-polls re-read the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterator
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from jobcast.worker import schema
from jobcast.worker.models import TERMINAL_EVENTS
from jobcast.worker.supervision import supervise

logger = logging.getLogger(__name__)

BUFFER_MAX = 512
RECONNECT_MAX_S = 5.0
TERMINAL = frozenset(e.value for e in TERMINAL_EVENTS)

Audience = Literal["job", "tenant"]


def stream_id_key(stream_id: str) -> tuple[int, int]:
    """Order of Redis stream ids ("ms-seq"), for dropping events a stream already sent."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def sse_frame(stream_id: str, event: str, data: str) -> bytes:
    return f"id: {stream_id}\nevent: {event}\ndata: {data}\n\n".encode()


class Item:
    """One event as a subscriber receives it: already encoded."""

    __slots__ = ("frame", "job_id", "key", "stream_id", "terminal")

    def __init__(self, stream_id: str, frame: bytes, job_id: str, terminal: bool) -> None:
        self.stream_id = stream_id
        self.key = stream_id_key(stream_id)
        self.frame = frame
        self.job_id = job_id
        self.terminal = terminal


class Subscription:
    """A bounded buffer of items plus flags, with a single waiter (the stream's own task)."""

    __slots__ = ("_waiter", "closed", "items", "overflowed", "resync")

    def __init__(self) -> None:
        self.items: deque[Item] = deque()
        self.overflowed = False
        self.resync = False
        self.closed = False  # the server is draining, or the client went away
        self._waiter: asyncio.Future[None] | None = None

    def deliver(self, item: Item) -> None:
        if self.overflowed or self.closed:
            return
        if len(self.items) >= BUFFER_MAX:
            self.overflowed = True
            self.items.clear()
        else:
            self.items.append(item)
        self.wake()

    def flag(self, *, resync: bool = False, closed: bool = False) -> None:
        self.resync = self.resync or resync
        self.closed = self.closed or closed
        self.wake()

    def reset(self) -> None:
        """Forget what was delivered and flagged (not ``closed``): the reader is about to re-read
        the log, which holds all of it."""
        self.items.clear()
        self.resync = self.overflowed = False

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def pending(self) -> bool:
        return bool(self.items) or self.overflowed or self.resync or self.closed

    async def wait(self, timeout: float | None) -> bool:
        """Wait until something is pending, ``wake()`` is called, or ``timeout`` passes (None: no
        timeout); True if something is pending."""
        if self.pending:
            return True
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            if timeout is None:
                # No timer: arming and cancelling one on every wait is the largest cost of a
                # fan-out to thousands of streams (see BENCHMARKS.md).
                await self._waiter
            else:
                async with asyncio.timeout(timeout):
                    await self._waiter
        except TimeoutError:
            pass
        finally:
            self._waiter = None
        return self.pending


class Hub:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._subs: dict[Audience, dict[str, set[Subscription]]] = {"job": {}, "tenant": {}}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.draining = False
        #: For /metrics (this process): events handed to subscribers, subscribers cut off as too slow.
        self.delivered = 0
        self.slow_consumers = 0

    async def start(self) -> None:
        # Supervised: should the loop ever die of a bug, it is logged and runs again, and every
        # stream re-reads its log (events may have been published while nobody listened).
        self._task = supervise("jobcast-hub", self._run, rerun=lambda: self._run(resync=True))

    async def stop(self) -> None:
        self.drain()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def drain(self) -> None:
        """End every stream now (graceful shutdown); clients resume elsewhere with Last-Event-ID."""
        self.draining = True
        self._flag_all(closed=True)

    @contextlib.contextmanager
    def subscribe(self, audience: Audience, key: str) -> Iterator[Subscription]:
        """Receive the events of one job (``audience="job"``) or one tenant, inside the block."""
        sub = Subscription()
        if self.draining:
            sub.closed = True
        table = self._subs[audience]
        table.setdefault(key, set()).add(sub)
        try:
            yield sub
        finally:
            subs = table.get(key)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del table[key]

    @property
    def subscriber_count(self) -> int:
        return sum(len(subs) for table in self._subs.values() for subs in table.values())

    def dispatch(self, raw: str) -> None:
        try:
            job_sid, tenant_sid, tenant, job_id, event, data = raw.split("\n", 5)
            terminal = event in TERMINAL
            job_subs = self._subs["job"].get(job_id)
            if job_subs:
                item = Item(job_sid, sse_frame(job_sid, event, data), job_id, terminal)
                for sub in job_subs:
                    sub.deliver(item)
                self.delivered += len(job_subs)
            tenant_subs = self._subs["tenant"].get(tenant)
            if tenant_subs:
                item = Item(tenant_sid, sse_frame(tenant_sid, event, data), job_id, terminal)
                for sub in tenant_subs:
                    sub.deliver(item)
                self.delivered += len(tenant_subs)
        except ValueError:
            logger.warning("hub: ignoring malformed event message %r", raw[:200])

    def _flag_all(self, *, resync: bool = False, closed: bool = False) -> None:
        for table in self._subs.values():
            for subs in table.values():
                for sub in subs:
                    sub.flag(resync=resync, closed=closed)

    async def _run(self, *, resync: bool = False) -> None:
        delay = 0.1
        first = not resync
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(schema.EVENTS_CHANNEL)
                self.connected.set()
                if not first:
                    logger.info("hub: reconnected to Redis")
                    self._flag_all(resync=True)
                first, delay = False, 0.1
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        self.dispatch(message["data"])
            except (RedisError, OSError) as exc:
                self.connected.clear()
                self._flag_all(resync=True)
                logger.warning("hub: Redis connection lost (%s); reconnecting in %.1fs", exc, delay)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
