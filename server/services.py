"""What every endpoint works with: one :class:`Services`, built by the app's lifespan.

The lifespan yields ``{"jobcast": Services(...)}`` as Starlette's documented lifespan state, so a
request reaches it as ``request.state.jobcast``; :func:`services` is the one place that does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from jobcast.worker.destinations import DestinationStore
from jobcast.worker.records import JobRecord
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store
from jobcast.worker.types import Registry
from jobcast.worker.webhooks import WebhookStore

from .auth import Authenticator
from .hub import Hub
from .limits import RateLimiter, StreamSlots
from .overview import OverviewFeed
from .problems import NotFound
from .ws.registry import Sockets

STATE_KEY = "jobcast"


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    redis: Redis
    store: Store
    hub: Hub
    registry: Registry
    auth: Authenticator
    rate_limiter: RateLimiter | None
    stream_slots: StreamSlots
    openapi: bytes
    webhooks: WebhookStore
    overview: OverviewFeed
    destinations: DestinationStore
    asyncapi: bytes
    #: The open WebSockets of this process (``GET /ws``).
    sockets: Sockets
    #: Whether GET /metrics answers without JOBCAST_METRICS_TOKEN: in development, or in production
    #: when the server is bound to a private address (jobcast.app.is_private_bind).
    metrics_open: bool = False

    async def load_job(self, job_id: str, tenant: str) -> JobRecord:
        """The tenant's job, or a 404 that says how to find the right id."""
        record = await self.store.get(job_id, tenant)
        if record is None:
            raise job_not_found(job_id)
        return record


def services(request: HTTPConnection) -> Services:
    return cast(Services, getattr(request.state, STATE_KEY))


def job_not_found(job_id: str) -> NotFound:
    return NotFound(f"No job {job_id[:100]!r} for this tenant. Check the id; GET /jobs lists your jobs.")
