"""The ``overview`` events of ``GET /events``: what the dashboard's live header shows.

A tenant feed sends one when it opens (after its catch-up), then again after events of the tenant
went by — at most once every ``MIN_INTERVAL_S``, and always after the last of a burst — and every
``REFRESH_S`` in any case, so that workers coming and going show without job events. The browser
never polls: the header rides on the one EventSource the page already has.

An overview is computed at most once per ``MIN_INTERVAL_S`` per tenant in a process and shared by
all of that tenant's streams (:class:`OverviewFeed`), so ten thousand dashboards of one tenant cost
one Redis round trip a second, not ten thousand. Overview events carry no ``id:`` line: they are
not in the event log, and a client's Last-Event-ID stays the last job event it saw.

Like pings, overviews come from one schedule per process (:meth:`OverviewFeed.run_forever`), not a
timer per stream: every ``MIN_INTERVAL_S`` it writes to each following stream that is idle and saw
job events since its last overview, or has had none for ``REFRESH_S``. A stream busy writing (its
client is slow) is skipped and served on a later tick: an overview is a snapshot, the next one
supersedes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from jobcast.worker.clock import now
from jobcast.worker.overview import read_overview

from .frames import unnumbered_frame
from .resources import OverviewEvent

logger = logging.getLogger(__name__)

EVENT_NAME = "overview"
MIN_INTERVAL_S = 1.0
REFRESH_S = 10.0


class Follower(Protocol):
    """A stream that asked for overviews (:class:`jobcast.sse.Stream`)."""

    tenant: str

    def overview_wanted(self, now: float) -> bool: ...

    def write_overview(self, frame: bytes, now: float) -> None: ...


class OverviewFeed:
    """Encoded ``overview`` frames per tenant, each reused for ``MIN_INTERVAL_S``, and the schedule
    that writes them to the streams following them."""

    def __init__(self, redis: Redis, *, cell: int = 0) -> None:
        self._redis = redis
        self._cell = cell
        self._frames: dict[str, tuple[float, bytes]] = {}
        self._reading: dict[str, asyncio.Task[bytes]] = {}
        self._followers: set[Follower] = set()

    def follow(self, stream: Follower) -> None:
        self._followers.add(stream)

    def unfollow(self, stream: Follower) -> None:
        self._followers.discard(stream)

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(MIN_INTERVAL_S)
            now = loop.time()
            due: dict[str, list[Follower]] = {}
            for stream in self._followers:
                if stream.overview_wanted(now):
                    due.setdefault(stream.tenant, []).append(stream)
            for tenant, streams in due.items():
                try:
                    frame = await self.frame(tenant)
                except (RedisError, OSError) as exc:
                    logger.warning("overview of %s not read: %s", tenant, exc)
                    continue
                now = loop.time()
                for stream in streams:
                    stream.write_overview(frame, now)

    async def frame(self, tenant: str) -> bytes:
        cached = self._frames.get(tenant)
        if cached is not None and time.monotonic() - cached[0] < MIN_INTERVAL_S:
            return cached[1]
        task = self._reading.get(tenant)
        if task is None:
            task = asyncio.create_task(self._read(tenant), name=f"overview-{tenant}")
            self._reading[tenant] = task
            task.add_done_callback(self._done)
        # shield: one stream leaving must not cancel the read the others wait for.
        return await asyncio.shield(task)

    def _done(self, task: asyncio.Task[bytes]) -> None:
        self._reading.pop(task.get_name().removeprefix("overview-"), None)
        if not task.cancelled():
            task.exception()  # retrieved here: the streams that waited for it have their own copy

    async def _read(self, tenant: str) -> bytes:
        overview = await read_overview(self._redis, tenant, cell=self._cell)
        event = OverviewEvent(
            counts=overview.counts, workers=overview.workers, queue_depth=overview.queue_depth, at=now()[0]
        )
        frame = unnumbered_frame(EVENT_NAME, event.model_dump_json())
        self._frames[tenant] = (time.monotonic(), frame)
        return frame
