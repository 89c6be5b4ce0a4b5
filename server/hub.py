"""The event hub: ONE Redis pub/sub connection per server process, fanned out in memory.

Every state change PUBLISHes one message on ``jobcast:events`` (see ``worker/lua/jobs.lua``):
``{job stream id}\\n{tenant stream id}\\n{tenant}\\n{job id}\\n{event}\\n{data}``. The hub parses it
once and encodes it once per audience — the SSE frame for the job's own stream (with the job-log
id) and the one for the tenant feed (with the tenant-log id) — then hands the same bytes to every
local listener of that job or tenant.

Listeners are event streams (:class:`jobcast.sse.Stream`), which write what they are handed at
once, from inside this call, when their connection can take it; and long-polls
(:class:`Subscription`), which wake their request. Either way no task is woken for an idle stream.

The hub also keeps the one ping schedule of the process: every quarter of ``ping_s`` it asks each
listener to ping if it wrote nothing for three quarters of ``ping_s``, so an idle stream is never
silent longer than ``ping_s``, with one timer for all of them instead of one per stream.

When the Redis connection drops, the hub reconnects with backoff and flags every listener
``resync``: something may have been published while nobody listened, so streams re-read the log
from the last id they sent, and long-polls re-read the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from jobcast.worker import schema
from jobcast.worker.models import TERMINAL_EVENTS, Audience
from jobcast.worker.supervision import supervise

from . import streamids
from .frames import chunk, event_frame

logger = logging.getLogger(__name__)

RECONNECT_MAX_S = 5.0
#: Published messages dispatched together at most, when they arrive faster than they are handed out.
BURST_MAX = 256
#: Event names that end a job (and its stream).
TERMINAL = frozenset(TERMINAL_EVENTS)




@dataclass(frozen=True)
class StreamConfig:
    """How this process's event streams behave (``JOBCAST_SSE_*``)."""

    ping_s: float = 15.0
    send_timeout_s: float = 10.0
    retry_ms: int = 2000


class Item:
    """One event as a listener receives it: already encoded (``chunk``: as an HTTP chunk too)."""

    __slots__ = ("chunk", "frame", "job_id", "key", "stream_id", "terminal")

    def __init__(self, stream_id: str, frame: bytes, job_id: str, terminal: bool) -> None:
        self.stream_id = stream_id
        self.key = streamids.order(stream_id)
        self.frame = frame
        self.chunk = chunk(frame)
        self.job_id = job_id
        self.terminal = terminal


class Listener(Protocol):
    def deliver(self, item: Item, now: float) -> None:
        """Take one event (``now``: the loop's time, read once per event for all listeners)."""

    def deliver_many(self, items: list[Item], now: float) -> None:
        """Take several events at once, in order (a burst the hub read in one go)."""

    def flag(self, *, resync: bool = False, closed: bool = False) -> None:
        """``resync``: events may have been missed; ``closed``: the server is draining."""

    def ping(self, now: float, quiet_since: float) -> None:
        """Write a keep-alive if nothing was written since ``quiet_since``."""


class Subscription:
    """A long-poll's listener: remembers that something happened and wakes its one waiter."""

    __slots__ = ("_waiter", "closed", "dirty", "resync")

    def __init__(self) -> None:
        self.dirty = False
        self.resync = False
        self.closed = False  # the server is draining
        self._waiter: asyncio.Future[None] | None = None

    def deliver(self, item: Item, now: float) -> None:
        self.dirty = True
        self._wake()

    def deliver_many(self, items: list[Item], now: float) -> None:
        self.deliver(items[-1], now)

    def flag(self, *, resync: bool = False, closed: bool = False) -> None:
        self.resync = self.resync or resync
        self.closed = self.closed or closed
        self._wake()

    def ping(self, now: float, quiet_since: float) -> None:
        pass

    def reset(self) -> None:
        """Forget what was delivered and flagged (not ``closed``): the reader is about to re-read."""
        self.dirty = self.resync = False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def pending(self) -> bool:
        return self.dirty or self.resync or self.closed

    async def wait(self, timeout: float) -> bool:
        """Wait until something is pending or ``timeout`` passes; True if something is pending."""
        if self.pending:
            return True
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        except TimeoutError:
            pass
        finally:
            self._waiter = None
        return self.pending


class Hub:
    def __init__(
        self,
        redis: Redis,
        config: StreamConfig | None = None,
        *,
        on_connect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._redis = redis
        self._on_connect = on_connect
        self.config = config if config is not None else StreamConfig()
        self._tables: dict[Audience, dict[str, set[Listener]]] = {"job": {}, "tenant": {}}
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()
        self.draining = False
        #: For /metrics (this process): events handed to listeners; streams cut off as too slow;
        #: writes made at once by the hub and writes a stream's own writer task had to finish.
        self.delivered = 0
        self.slow_consumers = 0
        self.direct_writes = 0
        self.deferred_writes = 0

    async def start(self) -> None:
        # Supervised: should a loop ever die of a bug, it is logged and runs again; the hub's rerun
        # makes every stream re-read its log (events may have been published while nobody listened).
        self._tasks = [
            supervise("jobcast-hub", self._run, rerun=lambda: self._run(resync=True)),
            supervise("jobcast-hub-pings", self._ping_forever),
        ]

    async def stop(self) -> None:
        self.drain()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def drain(self) -> None:
        """End every stream now (graceful shutdown); clients resume elsewhere with Last-Event-ID."""
        self.draining = True
        self._flag_all(closed=True)

    def attach(self, audience: Audience, key: str, listener: Listener) -> None:
        self._tables[audience].setdefault(key, set()).add(listener)

    def detach(self, audience: Audience, key: str, listener: Listener) -> None:
        table = self._tables[audience]
        listeners = table.get(key)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del table[key]

    @contextlib.contextmanager
    def subscribe(self, audience: Audience, key: str) -> Iterator[Subscription]:
        """Be told of the events of one job (``audience="job"``) or one tenant, inside the block."""
        sub = Subscription()
        sub.closed = self.draining
        self.attach(audience, key, sub)
        try:
            yield sub
        finally:
            self.detach(audience, key, sub)

    @property
    def subscriber_count(self) -> int:
        return sum(len(listeners) for table in self._tables.values() for listeners in table.values())

    def dispatch(self, raws: list[str]) -> None:
        """Hand a burst of published messages to the listeners: each event encoded once per
        audience, and each listener given all of its events of the burst together (one write)."""
        bursts: dict[tuple[Audience, str], list[Item]] = {}
        for raw in raws:
            try:
                job_sid, tenant_sid, tenant, job_id, event, data = raw.split("\n", 5)
            except ValueError:
                logger.warning("hub: ignoring malformed event message %r", raw[:200])
                continue
            terminal = event in TERMINAL
            for audience, key, stream_id in (("job", job_id, job_sid), ("tenant", tenant, tenant_sid)):
                if key in self._tables[audience]:  # type: ignore[index]
                    item = Item(stream_id, event_frame(stream_id, event, data), job_id, terminal)
                    bursts.setdefault((audience, key), []).append(item)  # type: ignore[arg-type]
        now = asyncio.get_running_loop().time()
        for (audience, key), items in bursts.items():
            listeners = self._tables[audience].get(key)
            if not listeners:
                continue
            self.delivered += len(listeners) * len(items)
            # A copy: a listener whose stream ends here leaves the set.
            if len(items) == 1:
                item = items[0]
                for listener in tuple(listeners):
                    listener.deliver(item, now)
            else:
                for listener in tuple(listeners):
                    listener.deliver_many(items, now)

    def _flag_all(self, *, resync: bool = False, closed: bool = False) -> None:
        for table in self._tables.values():
            for listeners in list(table.values()):
                for listener in tuple(listeners):
                    listener.flag(resync=resync, closed=closed)

    async def _ping_forever(self) -> None:
        loop = asyncio.get_running_loop()
        ping_s = self.config.ping_s
        interval = ping_s / 4
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            quiet_since = now - (ping_s - interval)
            for table in self._tables.values():
                for listeners in list(table.values()):
                    for listener in tuple(listeners):
                        listener.ping(now, quiet_since)

    async def _run(self, *, resync: bool = False) -> None:
        delay = 0.1
        first = not resync
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(schema.EVENTS_CHANNEL)
                if self._on_connect is not None:
                    await self._on_connect()
                self.connected.set()
                if not first:
                    logger.info("hub: reconnected to Redis")
                    self._flag_all(resync=True)
                first, delay = False, 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is None or message["type"] != "message":
                        continue
                    self.dispatch([message["data"]])  # at once: a lone event waits for nothing
                    # What else has already arrived goes out together: a server that fell behind
                    # catches up with one write per stream per burst, not per event.
                    burst: list[str] = []
                    while len(burst) < BURST_MAX:
                        more = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
                        if more is None:
                            break
                        if more["type"] == "message":
                            burst.append(more["data"])
                    if burst:
                        self.dispatch(burst)
            except (RedisError, OSError) as exc:
                self.connected.clear()
                self._flag_all(resync=True)
                logger.warning("hub: Redis connection lost (%s); reconnecting in %.1fs", exc, delay)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
