"""What every endpoint works with: one :class:`Services`, built by the app's lifespan.

The lifespan yields ``{"jobcast": Services(...)}`` as Starlette's documented lifespan state, so a
request reaches it as ``request.state.jobcast``; :func:`services` is the one place that does.

Everything kept in Redis is reached through a :class:`Cell` (:mod:`jobcast.worker.cells`): a route
about a tenant takes the tenant's cell (:meth:`Services.tenant_cell`), a route about a job the cell
its id names (:meth:`Services.job_cell`), which needs no lookup.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import cast

from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from jobcast.worker import history, schema
from jobcast.worker.cells import Placement
from jobcast.worker.destinations import DestinationStore
from jobcast.worker.history import JobQuery
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
class Cell:
    """One cell's Redis and what this process does with it (one hub: one pub/sub per cell)."""

    index: int
    redis: Redis
    store: Store
    hub: Hub
    stream_slots: StreamSlots
    webhooks: WebhookStore
    destinations: DestinationStore
    overview: OverviewFeed
    rate_limiter: RateLimiter | None


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    #: By index; cell 0 also holds what belongs to no tenant (the API keys of ``jobcast keys``).
    cells: tuple[Cell, ...]
    registry: Registry
    auth: Authenticator
    openapi: bytes
    asyncapi: bytes
    #: The open WebSockets of this process (``GET /ws``).
    sockets: Sockets
    #: Whether GET /metrics answers without JOBCAST_METRICS_TOKEN: in development, or in production
    #: when the server is bound to a private address (jobcast.app.is_private_bind).
    metrics_open: bool = False
    #: ``settings.placement``, read once (a pydantic private attribute is slow to reach: every
    #: request asks for it).
    placement: Placement = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "placement", self.settings.placement)

    def tenant_cell(self, tenant: str) -> Cell:
        """The cell ``tenant`` lives in now (its new jobs, its feed, its limits)."""
        return self.cells[self.placement.tenant_cell(tenant)]

    def job_cell(self, job_id: str) -> Cell:
        """The cell job ``job_id`` lives in (:meth:`Placement.job_cell`); a 404 when it is no job id."""
        index = self.placement.job_cell(job_id)
        if index is None:
            raise job_not_found(job_id)
        return self.cells[index]

    async def list_jobs(
        self, tenant: str, query: JobQuery, limit: int, before: str | None
    ) -> tuple[list[JobRecord], str | None]:
        """A page of the tenant's jobs (``GET /jobs``): its cell's and the archive's, and those still
        in a cell it was moved away from — looked for with one EXISTS per other cell, at once, and
        merged in like a third tier (:func:`jobcast.worker.history.merge_pages`)."""
        home = self.tenant_cell(tenant)
        others = [cell for cell in self.cells if cell is not home]
        held = await asyncio.gather(*(cell.redis.exists(schema.index_key(tenant, cell=cell.index)) for cell in others))
        records, cursor = await home.store.list_jobs(tenant, query=query, limit=limit, before=before)
        for cell, here in zip(others, held, strict=True):
            if here:
                live, bound = await history.list_jobs(cell.redis, None, tenant, query, limit, before, cell=cell.index)
                records, cursor = history.merge_pages(records, cursor, live, bound, limit)
        return records, cursor

    async def load_job(self, job_id: str, tenant: str) -> JobRecord:
        """The tenant's job, or a 404 that says how to find the right id."""
        record = await self.job_cell(job_id).store.get(job_id, tenant)
        if record is None:
            raise job_not_found(job_id)
        return record


def services(request: HTTPConnection) -> Services:
    return cast(Services, getattr(request.state, STATE_KEY))


def job_not_found(job_id: str) -> NotFound:
    return NotFound(f"No job {job_id[:100]!r} for this tenant. Check the id; GET /jobs lists your jobs.")
