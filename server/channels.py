"""The tenant channels a hub's pub/sub connection is subscribed to, and who waits for which.

Every event is published on its tenant's channel (``jobcast:{c<cell>}:events:<tenant>``,
:func:`jobcast.worker.schema.tenant_channel`). A hub subscribes to a tenant's channel only while it
has a listener of that tenant or of one of its jobs (:meth:`TenantChannels.ref`), and unsubscribes
``linger_s`` after the last one left (:meth:`TenantChannels.unref`): a client that reconnects at
once (a long-poll loop, an EventSource retrying) does not pay a new SUBSCRIBE round trip.

**Confirmed before the log is read.** A listener must not read the log before Redis has confirmed
its channel's subscription (the SUBSCRIBE reply), or an event published between the read and the
subscription would reach it neither way. :meth:`TenantChannels.ready` waits for that reply; the
listeners of a tenant that attach while its SUBSCRIBE is on its way share that one command and all
wait for its reply.

**One command in flight per channel.** A channel goes unsubscribed -> SUBSCRIBE sent -> subscribed
-> UNSUBSCRIBE sent -> unsubscribed; when its reply arrives, the channel is brought to what its
listeners want then (a listener that came while the UNSUBSCRIBE was on its way gets a new
SUBSCRIBE, and waits for that one's reply). Replies come in the order the commands were sent, so
this never confuses one reply for another. The commands of all channels that changed together go
out as one ``SUBSCRIBE a b c`` (:meth:`TenantChannels.send_forever`): a thousand streams of a
thousand tenants connecting at once cost a few commands.

**Reconnects.** When the connection is lost every channel is forgotten (:meth:`offline`) and the
listeners waiting for a reply are let go: they read the log at once, and the hub flags every
listener ``resync`` once the new connection has subscribed (in one command, :meth:`online`) every
tenant that still has listeners, so what they read early is read again, from their last id, after
the subscriptions are confirmed. The hub's own channel (:func:`~jobcast.worker.schema.hub_channel`,
nothing is published on it) goes last in that command: its reply says that every tenant of the
batch is subscribed. It also keeps the connection in subscriber mode with no tenant subscribed,
where redis-py would otherwise check the connection's health before a command by reading a PING's
reply on the connection the hub's reader is reading.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal

from redis.asyncio.client import PubSub
from redis.exceptions import TimeoutError as RedisTimeoutError

from jobcast.worker import schema

#: How long a tenant's channel stays subscribed after its last listener left.
LINGER_S = 5.0
#: How long a listener waits for Redis to confirm its channel's subscription before its request
#: is answered "store unavailable" (the connection is up but Redis does not answer).
CONFIRM_TIMEOUT_S = 10.0

#: Called, when set, with "sending" and the channels just before a SUBSCRIBE is written,
#: "unsubscribing" just before an UNSUBSCRIBE is, and "confirmed" and the channel when a SUBSCRIBE's
#: reply has been read, before its waiters are let go: the points where a test acts to make the
#: subscribe races happen deterministically.
Hook = Callable[[Literal["sending", "unsubscribing", "confirmed"], list[str]], Awaitable[None]]


class Channel:
    """One tenant's channel: how many local listeners it has and where its subscription stands."""

    __slots__ = ("confirmed", "in_flight", "linger", "refs", "subscribed")

    def __init__(self) -> None:
        self.refs = 0
        #: Redis confirmed our SUBSCRIBE (and no UNSUBSCRIBE of ours was confirmed since).
        self.subscribed = False
        #: A (UN)SUBSCRIBE of ours is on its way (queued or sent) and its reply not read yet.
        self.in_flight = False
        #: Set by the next SUBSCRIBE reply: what listeners waiting for the subscription await.
        self.confirmed: asyncio.Future[None] | None = None
        #: The timer that unsubscribes after the last listener left.
        self.linger: asyncio.TimerHandle | None = None

    @property
    def live(self) -> bool:
        """What is published on it reaches its listeners (and no UNSUBSCRIBE is on its way)."""
        return self.subscribed and not self.in_flight


class TenantChannels:
    """The subscriptions of one pub/sub connection to the tenant channels of one cell."""

    def __init__(self, cell: int = 0, *, linger_s: float | None = None) -> None:
        self.prefix = schema.tenant_channel_prefix(cell)
        self.anchor = schema.hub_channel(cell)
        self.linger_s = LINGER_S if linger_s is None else linger_s
        self.hook: Hook | None = None
        self._channels: dict[str, Channel] = {}
        self._online = False
        self._subscribe: list[str] = []
        self._unsubscribe: list[str] = []
        self._outbox = asyncio.Event()
        #: For /metrics and tests: SUBSCRIBE and UNSUBSCRIBE of tenant channels sent.
        self.subscribes = 0
        self.unsubscribes = 0

    @property
    def subscribed(self) -> int:
        """How many tenant channels are subscribed (confirmed), lingering ones included."""
        return sum(1 for channel in self._channels.values() if channel.subscribed)

    def listeners(self, tenant: str) -> int:
        channel = self._channels.get(tenant)
        return 0 if channel is None else channel.refs

    def live_listeners(self) -> int:
        """Listeners whose tenant's subscription is confirmed: they receive what is published."""
        return sum(channel.refs for channel in self._channels.values() if channel.live)

    # --- listeners come and go -------------------------------------------------------------------

    def ref(self, tenant: str) -> None:
        """One more local listener of the tenant (or of one of its jobs)."""
        channel = self._channels.get(tenant)
        if channel is None:
            channel = self._channels[tenant] = Channel()
        channel.refs += 1
        if channel.linger is not None:
            channel.linger.cancel()
            channel.linger = None
        self._reconcile(tenant, channel)

    def unref(self, tenant: str) -> None:
        channel = self._channels.get(tenant)
        if channel is None:
            return
        channel.refs -= 1
        if channel.refs > 0:
            return
        if self._online and self.linger_s > 0 and channel.linger is None:
            channel.linger = asyncio.get_running_loop().call_later(self.linger_s, self._expire, tenant)
        else:
            self._reconcile(tenant, channel)

    async def ready(self, tenant: str) -> None:
        """Return once Redis has confirmed the tenant's subscription, so that the log read next
        misses nothing published after it. Returns at once while the hub is offline: then the
        listener is flagged ``resync`` once the next connection is subscribed."""
        channel = self._channels.get(tenant)
        if channel is None or not self._online or channel.live:
            return
        if channel.confirmed is None:
            channel.confirmed = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT_S):
                # shielded: one waiter leaving must not cancel what the others wait for
                await asyncio.shield(channel.confirmed)
        except TimeoutError:
            raise RedisTimeoutError(f"Redis did not confirm a subscription within {CONFIRM_TIMEOUT_S}s") from None

    def _expire(self, tenant: str) -> None:
        channel = self._channels.get(tenant)
        if channel is not None:
            channel.linger = None
            self._reconcile(tenant, channel)

    def _reconcile(self, tenant: str, channel: Channel) -> None:
        """Send what brings the channel to what its listeners want, unless a reply is awaited."""
        if channel.in_flight:
            return  # brought up to date when the reply comes
        wanted = channel.refs > 0 or channel.linger is not None
        if wanted and not channel.subscribed:
            if self._online:
                channel.in_flight = True
                self._subscribe.append(tenant)
                self._outbox.set()
        elif not wanted:
            if channel.subscribed:
                channel.in_flight = True
                self._unsubscribe.append(tenant)
                self._outbox.set()
            else:
                del self._channels[tenant]

    # --- the connection ----------------------------------------------------------------------------

    def online(self) -> list[str]:
        """A new connection: the channels to subscribe first (every tenant with listeners, then the
        hub's own channel, whose reply says they are all confirmed). From now on, new listeners'
        subscriptions go out after these."""
        tenants = [tenant for tenant, channel in self._channels.items() if channel.refs > 0]
        for tenant in tenants:
            self._channels[tenant].in_flight = True
        self._online = True
        self.subscribes += len(tenants)
        return [self.prefix + tenant for tenant in tenants] + [self.anchor]

    def offline(self) -> None:
        """The connection is gone: nothing is subscribed any more. Listeners waiting for a reply
        are let go (the hub flags them ``resync`` once the next connection is subscribed)."""
        self._online = False
        self._subscribe.clear()
        self._unsubscribe.clear()
        self._outbox.clear()
        for tenant, channel in list(self._channels.items()):
            channel.subscribed = channel.in_flight = False
            if channel.linger is not None:
                channel.linger.cancel()
                channel.linger = None
            self._release(channel)
            if channel.refs <= 0:
                del self._channels[tenant]

    def reply(self, subscribed: bool, name: str) -> bool:
        """Redis's reply to one channel of our (UN)SUBSCRIBE; True if it is the hub's own channel's
        SUBSCRIBE (every tenant subscribed on connecting is confirmed)."""
        if name == self.anchor:
            return subscribed
        channel = self._channels.get(tenant := name[len(self.prefix) :]) if name.startswith(self.prefix) else None
        if channel is None:
            return False
        channel.in_flight = False
        channel.subscribed = subscribed
        if subscribed:
            self._release(channel)
        self._reconcile(tenant, channel)
        return False

    @staticmethod
    def _release(channel: Channel) -> None:
        if channel.confirmed is not None:
            if not channel.confirmed.done():
                channel.confirmed.set_result(None)
            channel.confirmed = None

    async def subscribe(self, pubsub: PubSub, names: list[str]) -> None:
        if self.hook is not None:
            await self.hook("sending", names)
        await pubsub.subscribe(*names)

    async def send_forever(self, pubsub: PubSub) -> None:
        """Send the (UN)SUBSCRIBEs the listeners' comings and goings call for, batched."""
        while True:
            await self._outbox.wait()
            self._outbox.clear()
            subscribe, self._subscribe = self._subscribe, []
            unsubscribe, self._unsubscribe = self._unsubscribe, []
            if unsubscribe:
                self.unsubscribes += len(unsubscribe)
                names = [self.prefix + tenant for tenant in unsubscribe]
                if self.hook is not None:
                    await self.hook("unsubscribing", names)
                await pubsub.unsubscribe(*names)
            if subscribe:
                self.subscribes += len(subscribe)
                await self.subscribe(pubsub, [self.prefix + tenant for tenant in subscribe])
