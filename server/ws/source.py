"""Where a channel's events come from: the hub (live) and the event log (catch-up).

This is the one module of the WebSocket package that knows the hub and the SSE stream's helpers;
the rest sees only :class:`Feed`. When the hub changes, this is what to re-point.

Exactly once, as the SSE streams do it (:mod:`jobcast.sse`): subscribe to the hub first and wait
for Redis to confirm the subscription (so nothing published from then on is missed), read the log
after the last id and send it, then send what the hub buffered meanwhile and after, dropping every
event whose id is not greater than the last one sent. When the hub reports a gap (Redis reconnect)
the log is read again from the last id — unless the log no longer has that id (a failover lost it:
:class:`Lost`, the socket is closed 1013, as an SSE stream ends there). Where a subscription with a
``last_event_id`` may resume is checked before, by the SSE streams' own check
(:mod:`jobcast.resumes`). A subscriber that fell ``BUFFER_MAX`` events behind is told
so (:class:`FellBehind`): the socket is closed with 1013 and the client re-subscribes with its last
ids, losing nothing.

Encoded once: the hub encodes an event once per audience (an SSE frame); the WebSocket frame of
that event is made from it once per process (a small cache keyed by the hub's item), however many
sockets follow the channel. The event's ``data`` is spliced in as stored, so ``id``, ``event`` and
``data`` are byte for byte what the SSE stream of the channel sends.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterator

from jobcast.worker.models import Audience
from jobcast.worker.store import Store

from .. import streamids
from ..hub import TERMINAL, Hub, Item
from ..sse import REPLAY_PAGE

#: Events a channel may have buffered (its socket's pump behind) before the socket is told it fell
#: behind (1013): the SSE streams' backlog bound.
BUFFER_MAX = 512


def stream_id_key(stream_id: str) -> streamids.Order:
    return streamids.order(stream_id)


class Subscription:
    """A channel's listener on the hub (its ``Listener`` protocol): a bounded buffer of items and
    flags, with one waiter (the channel's pump)."""

    __slots__ = ("_waiter", "closed", "items", "overflowed", "resync")

    def __init__(self) -> None:
        self.items: deque[Item] = deque()
        self.overflowed = False
        self.resync = False
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None

    def deliver(self, item: Item, now: float) -> None:
        if self.overflowed or self.closed:
            return
        if len(self.items) >= BUFFER_MAX:
            self.overflowed = True
            self.items.clear()
        else:
            self.items.append(item)
        self._wake()

    def deliver_many(self, items: list[Item], now: float) -> None:
        for item in items:
            self.deliver(item, now)

    def flag(self, *, resync: bool = False, closed: bool = False) -> None:
        self.resync = self.resync or resync
        self.closed = self.closed or closed
        self._wake()

    def ping(self, now: float, quiet_since: float) -> None:
        pass  # the socket keeps itself alive (WebSocket pings)

    def reset(self) -> None:
        self.items.clear()
        self.resync = self.overflowed = False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        if self.items or self.overflowed or self.resync or self.closed:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


__all__ = ["Closed", "Feed", "FellBehind", "Lost"]

#: WebSocket frames of recent hub items, by item (a fan-out encodes each event once).
_ENCODED: dict[int, tuple[Item, str]] = {}
_ENCODED_MAX = 256

Key = tuple[int, int]


class FellBehind(Exception):
    """The hub dropped this subscriber's buffer: it fell too far behind."""


class Closed(Exception):
    """The hub is draining (graceful shutdown)."""


class Lost(Exception):
    """After a gap (Redis reconnect) the log no longer holds the last event sent on the channel: a
    failover lost it (or it was trimmed), so the channel cannot resume past the hole. As an SSE
    stream ends there (:meth:`jobcast.sse.Stream.resume`), the socket is closed; the client's
    re-subscription with that id is then told to resync (410)."""


def event_frame(channel: str, stream_id: str, event: str, data: str) -> str:
    # Ids are digits and a dash, event names and channels are from fixed alphabets (checked on the
    # way in), and data is the stored JSON object: concatenation is valid JSON.
    return f'{{"op":"event","channel":"{channel}","id":"{stream_id}","event":"{event}","data":{data}}}'


def _item_frame(channel: str, item: Item) -> str:
    cached = _ENCODED.get(id(item))
    if cached is not None and cached[0] is item:
        return cached[1]
    # The hub's item holds its SSE frame: "id: <id>\nevent: <name>\ndata: <json>\n\n".
    _, event_line, data_line = item.frame.decode().split("\n", 2)
    text = event_frame(channel, item.stream_id, event_line[len("event: ") :], data_line[len("data: ") : -2])
    if len(_ENCODED) >= _ENCODED_MAX:
        _ENCODED.clear()
    _ENCODED[id(item)] = (item, text)
    return text


class Feed:
    """One channel's events for one socket: :meth:`open` (subscribe), then iterate :meth:`frames`,
    then :meth:`close`. ``last_id``: resume after it; without it a job channel starts from the
    job's first event and the tenant channel from the log's tip (:meth:`start_live`)."""

    def __init__(
        self, hub: Hub, store: Store, audience: Audience, key: str, tenant: str, channel: str, last_id: str | None
    ) -> None:
        self.hub = hub
        self.store = store
        self.audience = audience
        self.key = key
        self.tenant = tenant
        self.channel = channel
        self.last_key: Key = stream_id_key(last_id) if last_id is not None else (-1, -1)
        self._sub: Subscription | None = None

    async def open(self) -> None:
        """Subscribe; returns once the subscription is confirmed (the log may be read from then),
        or raises the store's errors, closed."""
        self._sub = Subscription()
        if self.hub.draining:
            self._sub.closed = True
        self.hub.attach(self.audience, self.key, self.tenant, self._sub)
        try:
            await self.hub.ready(self.tenant)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._sub is not None:
            self.hub.detach(self.audience, self.key, self.tenant, self._sub)
            self._sub = None

    async def start_live(self) -> str | None:
        """Start at the log's tip as it is now that the hub subscription is open; returns it."""
        tip = await self.store.log_tip(self.audience, self.key)
        if tip is not None:
            self.last_key = stream_id_key(tip)
        return tip

    async def frames(self) -> AsyncIterator[tuple[str, bool]]:
        """(frame, terminal) pairs; a job channel's ends after its terminal event. Raises
        :class:`FellBehind`, :class:`Closed`, :class:`Lost`, or the store's errors."""
        sub = self._sub
        assert sub is not None, "open() first"
        async for pair in self._catch_up():
            yield pair
            if pair[1]:
                return
        while True:
            if sub.closed:
                raise Closed()
            if sub.overflowed:
                raise FellBehind()
            if sub.resync:
                sub.reset()
                if self.last_key >= (0, 0) and not await self.store.log_has(self.audience, self.key, self._after()):
                    raise Lost()
                async for pair in self._catch_up():
                    yield pair
                    if pair[1]:
                        return
                continue
            for item in self._take(sub):
                terminal = item.terminal and self.audience == "job"
                yield _item_frame(self.channel, item), terminal
                if terminal:
                    return
            if not sub.items:
                await sub.wait()

    def _take(self, sub: Subscription) -> Iterator[Item]:
        items = sub.items
        while items:
            item = items.popleft()
            if item.key > self.last_key:
                self.last_key = item.key
                yield item

    def _after(self) -> str:
        return "-" if self.last_key < (0, 0) else f"{self.last_key[0]}-{self.last_key[1]}"

    async def _catch_up(self) -> AsyncIterator[tuple[str, bool]]:
        after = self._after()
        while True:
            events = await self.store.log_events(self.audience, self.key, after=after, count=REPLAY_PAGE)
            for event in events:
                after = event.id
                self.last_key = stream_id_key(event.id)
                terminal = self.audience == "job" and event.event in TERMINAL
                yield event_frame(self.channel, event.id, event.event, event.data), terminal
                if terminal:
                    return
            if len(events) < REPLAY_PAGE:
                return
