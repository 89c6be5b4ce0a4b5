"""The event hub: ONE Redis pub/sub connection per server process, fanned out in memory.

Every state change PUBLISHes one message on ``jobcast:events`` (see ``worker/lua/jobs.lua``):
``{job stream id}\\n{tenant stream id}\\n{tenant}\\n{job id}\\n{event}\\n{data}``. The hub parses
each message once and hands it to the local subscribers of that job and of that tenant, each
through a bounded queue. A subscriber whose queue is full is marked ``overflowed`` and gets no
more messages: it must resynchronise from the event log, which is the source of truth; pub/sub
is only the doorbell.

When the Redis connection drops, the hub reconnects with backoff and marks every subscriber
``resync`` (something may have been published while nobody listened), so long-polls re-read the
record and streams replay the gap from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker import schema

logger = logging.getLogger(__name__)

QUEUE_MAX = 256
RECONNECT_MAX_S = 5.0


@dataclass(frozen=True)
class Message:
    job_stream_id: str
    tenant_stream_id: str
    tenant: str
    job_id: str
    event: str
    data: str

    @classmethod
    def parse(cls, raw: str) -> Message:
        job_sid, tenant_sid, tenant, job_id, event, data = raw.split("\n", 5)
        return cls(job_sid, tenant_sid, tenant, job_id, event, data)


@dataclass(eq=False)
class Subscription:
    queue: asyncio.Queue[Message] = field(default_factory=lambda: asyncio.Queue(QUEUE_MAX))
    #: Set when messages may have been missed (queue overflow, lost Redis connection).
    resync: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set on every delivery and on resync: "something happened".
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, message: Message) -> None:
        if self.resync.is_set():
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.mark_resync()
            return
        self.changed.set()

    def mark_resync(self) -> None:
        self.resync.set()
        self.changed.set()


class Hub:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._by_job: dict[str, set[Subscription]] = {}
        self._by_tenant: dict[str, set[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="jobcast-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def job(self, job_id: str) -> Iterator[Subscription]:
        """Subscribe to one job's events for the duration of the ``with`` block."""
        with self._subscribed(self._by_job, job_id) as sub:
            yield sub

    @contextlib.contextmanager
    def tenant(self, tenant: str) -> Iterator[Subscription]:
        """Subscribe to all events of one tenant."""
        with self._subscribed(self._by_tenant, tenant) as sub:
            yield sub

    @contextlib.contextmanager
    def _subscribed(self, table: dict[str, set[Subscription]], key: str) -> Iterator[Subscription]:
        sub = Subscription()
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
        return sum(map(len, self._by_job.values())) + sum(map(len, self._by_tenant.values()))

    def _dispatch(self, raw: str) -> None:
        try:
            message = Message.parse(raw)
        except ValueError:
            logger.warning("hub: ignoring malformed event message %r", raw[:200])
            return
        for sub in self._by_job.get(message.job_id, ()):
            sub.deliver(message)
        for sub in self._by_tenant.get(message.tenant, ()):
            sub.deliver(message)

    def _resync_all(self) -> None:
        for table in (self._by_job, self._by_tenant):
            for subs in table.values():
                for sub in subs:
                    sub.mark_resync()

    async def _run(self) -> None:
        delay = 0.1
        first = True
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(schema.EVENTS_CHANNEL)
                self.connected.set()
                if not first:
                    logger.info("hub: reconnected to Redis")
                    self._resync_all()
                first, delay = False, 0.1
                async for item in pubsub.listen():
                    if item["type"] == "message":
                        self._dispatch(item["data"])
            except (RedisError, OSError) as exc:
                self.connected.clear()
                self._resync_all()
                logger.warning("hub: Redis connection lost (%s); reconnecting in %.1fs", exc, delay)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
