"""The ``overview`` events of ``GET /events``: what the dashboard's live header shows.

A tenant feed sends one when it opens (after its catch-up), then again after events of the tenant
went by — at most once every ``MIN_INTERVAL_S``, and always after the last of a burst — and every
``REFRESH_S`` in any case, so that workers coming and going show without job events. The browser
never polls: the header rides on the one EventSource the page already has.

An overview is computed at most once per ``MIN_INTERVAL_S`` per tenant in a process and shared by
all of that tenant's streams (:class:`OverviewFeed`), so ten thousand dashboards of one tenant cost
one Redis round trip a second, not ten thousand. Overview events carry no ``id:`` line: they are
not in the event log, and a client's Last-Event-ID stays the last job event it saw.
"""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from jobcast.worker.clock import now
from jobcast.worker.overview import read_overview

from .resources import OverviewEvent

EVENT_NAME = "overview"
MIN_INTERVAL_S = 1.0
REFRESH_S = 10.0


class OverviewFeed:
    """Encoded ``overview`` frames per tenant, each reused for ``MIN_INTERVAL_S``."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._frames: dict[str, tuple[float, bytes]] = {}
        self._reading: dict[str, asyncio.Task[bytes]] = {}

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
        overview = await read_overview(self._redis, tenant)
        event = OverviewEvent(
            counts=overview.counts, workers=overview.workers, queue_depth=overview.queue_depth, at=now()[0]
        )
        frame = f"event: {EVENT_NAME}\ndata: {event.model_dump_json()}\n\n".encode()
        self._frames[tenant] = (time.monotonic(), frame)
        return frame
