"""The event hub: ONE Redis pub/sub connection per server process (and cell), fanned out in memory.

Every state change PUBLISHes one message on its tenant's channel
(``jobcast:{c<cell>}:events:<tenant>``, see ``worker/lua/jobs.lua``):
``{job stream id}\\n{tenant stream id}\\n{tenant}\\n{job id}\\n{event}\\n{data}``. The hub is
subscribed only to the channels of the tenants it has listeners of, while it has them
(:mod:`jobcast.channels`), so what it receives follows its own clients, not the whole system. It
parses each message once and encodes it once per audience — the SSE frame for the job's own stream
(with the job-log id) and the one for the tenant feed (with the tenant-log id) — then hands the
same bytes to every local listener of that job or tenant.

Listeners are event streams (:class:`jobcast.sse.Stream`), which write what they are handed at
once, from inside this call, when their connection can take it; long-polls
(:class:`jobcast.polls.Subscription`), which wake their request; and WebSocket channels
(:mod:`jobcast.ws.source`). Either way no task is woken for an idle stream. A listener attaches
(:meth:`Hub.attach`, naming its tenant), then waits for its tenant's subscription to be confirmed
(:meth:`Hub.ready`) before it reads the log: then log and pub/sub together hold every event.

The hub also keeps the one ping schedule of the process: every quarter of ``ping_s`` it asks each
listener to ping if it wrote nothing for three quarters of ``ping_s``, so an idle stream is never
silent longer than ``ping_s``, with one timer for all of them instead of one per stream.

When the Redis connection drops, the hub reconnects with backoff, subscribes again to every tenant
it has listeners of, and then flags every listener ``resync``: something may have been published
while nobody listened, so streams re-read the log from the last id they sent, and long-polls
re-read the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError, RedisError

from jobcast.worker.models import TERMINAL_EVENTS, Audience
from jobcast.worker.supervision import supervise

from . import streamids
from .channels import TenantChannels
from .frames import chunk, event_frame
from .polls import Subscription

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


class Hub:
    def __init__(
        self,
        redis: Redis,
        config: StreamConfig | None = None,
        *,
        cell: int = 0,
        on_connect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._redis = redis
        self._on_connect = on_connect
        #: The tenant channels this hub is subscribed to (its cell's), and who waits for which.
        self.channels = TenantChannels(cell)
        self.config = config if config is not None else StreamConfig()
        self._tables: dict[Audience, dict[str, set[Listener]]] = {"job": {}, "tenant": {}}
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()
        self.draining = False
        #: For /metrics (this process): events handed to listeners; streams cut off as too slow;
        #: writes made at once by the hub and writes a stream's own writer task had to finish.
        self.delivered = 0
        #: Messages read from the pub/sub connection (the events of the tenants it listens to).
        self.received = 0
        self.slow_consumers = 0
        #: Pub/sub connections lost (a reconnect followed, each flagging every listener ``resync``).
        self.reconnects = 0
        self.direct_writes = 0
        self.deferred_writes = 0

    async def start(self) -> None:
        # Supervised: should a loop ever die of a bug, it is logged and runs again; like every
        # (re)connect, the rerun makes every stream re-read its log once subscribed again.
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

    def attach(self, audience: Audience, key: str, tenant: str, listener: Listener) -> None:
        """Hand ``listener`` the events of one job (``audience="job"``) or one tenant from now on;
        ``tenant``: the job's tenant. Await :meth:`ready` before reading the log."""
        listeners = self._tables[audience].setdefault(key, set())
        if listener not in listeners:
            listeners.add(listener)
            self.channels.ref(tenant)

    def detach(self, audience: Audience, key: str, tenant: str, listener: Listener) -> None:
        table = self._tables[audience]
        listeners = table.get(key)
        if listeners is not None and listener in listeners:
            listeners.remove(listener)
            if not listeners:
                del table[key]
            self.channels.unref(tenant)

    async def ready(self, tenant: str) -> None:
        """Return once what is published for ``tenant`` reaches its attached listeners (Redis has
        confirmed the subscription); raises a Redis ``TimeoutError`` if Redis does not answer."""
        await self.channels.ready(tenant)

    @contextlib.asynccontextmanager
    async def subscribe(self, audience: Audience, key: str, tenant: str) -> AsyncIterator[Subscription]:
        """Be told of the events of one job (``audience="job"``) or one tenant, inside the block
        (entered once the subscription is confirmed)."""
        sub = Subscription()
        sub.closed = self.draining
        self.attach(audience, key, tenant, sub)
        try:
            await self.ready(tenant)
            yield sub
        finally:
            self.detach(audience, key, tenant, sub)

    @property
    def subscriber_count(self) -> int:
        """Listeners that receive events now (their tenant's subscription is confirmed)."""
        return self.channels.live_listeners()

    def dispatch(self, raws: list[str]) -> None:
        """Hand a burst of published messages to the listeners: each event encoded once per
        audience, and each listener given all of its events of the burst together (one write)."""
        bursts: dict[tuple[Audience, str], list[Item]] = {}
        self.received += len(raws)
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
            pubsub = self._redis.pubsub()
            tasks: list[asyncio.Task[None]] = []
            try:
                # Every tenant with listeners, in one SUBSCRIBE; its last reply flags them resync.
                await self.channels.subscribe(pubsub, self.channels.online())
                # redis-py re-opens a pub/sub connection closed while nobody was reading it (a
                # failover's drop) and re-subscribes by itself: taken as the loss it is (below).
                pubsub.connection.register_connect_callback(self._reopened)  # type: ignore[attr-defined]
                if self._on_connect is not None:
                    await self._on_connect()
                if not first:
                    logger.info("hub: reconnected to Redis")
                first, delay = False, 0.1
                tasks = [
                    asyncio.create_task(self._read_forever(pubsub), name="jobcast-hub-read"),
                    asyncio.create_task(self.channels.send_forever(pubsub), name="jobcast-hub-subscribe"),
                ]
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # what ended it (they only end by raising)
            except (RedisError, OSError) as exc:
                self.reconnects += 1
                self.connected.clear()
                self._flag_all(resync=True)
                logger.warning("hub: Redis connection lost (%s); reconnecting in %.1fs", exc, delay)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if pubsub.connection is not None:  # it goes back to the pool: no callback of ours on it
                    pubsub.connection.deregister_connect_callback(self._reopened)
                self.connected.clear()
                self.channels.offline()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _reopened(self, connection: object) -> None:
        """redis-py's connect callback: the pub/sub connection was opened again by redis-py itself
        (closed while nobody was reading it, then used). What was published meanwhile reached no
        one, and the subscriptions' state is redis-py's, not ours: end this connection as a lost
        one, so that the hub reconnects, subscribes and flags every listener ``resync``."""
        raise ConnectionError("redis-py re-opened the pub/sub connection")

    async def _read_forever(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            if message["type"] != "message":
                await self._reply(message)
                continue
            self.dispatch([message["data"]])  # at once: a lone event waits for nothing
            # What else has already arrived goes out together: a server that fell behind catches
            # up with one write per stream per burst, not per event. Asked only when bytes are
            # there: a read that finds nothing costs a timer, a cancelled read and a loop turn
            # (~20 µs, once per event when events come one at a time).
            burst: list[str] = []
            connection = pubsub.connection
            while len(burst) < BURST_MAX and _has_buffered_data(connection):
                more = await pubsub.get_message(timeout=0)
                if more is None:
                    break
                if more["type"] == "message":
                    burst.append(more["data"])
                else:
                    await self._reply(more)
            if burst:
                self.dispatch(burst)

    async def _reply(self, message: dict[str, Any]) -> None:
        """A (UN)SUBSCRIBE reply: the subscription of one channel stands (or ends) from here."""
        kind, name = message["type"], message["channel"]
        if kind != "subscribe" and kind != "unsubscribe":
            return
        hook = self.channels.hook
        if kind == "subscribe" and hook is not None:
            await hook("confirmed", [name])
        if self.channels.reply(kind == "subscribe", name):
            # Every tenant with listeners is subscribed again: what was published meanwhile is
            # in the logs, which every listener now re-reads from its last id.
            self.connected.set()
            self._flag_all(resync=True)


def _has_buffered_data(connection: Any) -> bool:
    """Whether the pub/sub connection has bytes nobody read yet (jobcast.worker.connections'
    connections tell; any other: assumed, and a read finds out)."""
    check = getattr(connection, "has_buffered_data", None)
    return True if check is None else bool(check())
