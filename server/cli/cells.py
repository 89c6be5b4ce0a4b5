"""``jobcast cells``: where each known tenant lives, and the line that keeps it there.

A tenant is known when it has an API key (``JOBCAST_API_KEYS`` or ``jobcast keys``), an override
in ``JOBCAST_CELL_PLACEMENT``, or jobs in a cell's Redis. For each it prints the cell it is placed
in now (by ``hash`` or by ``override``) and the cells that hold its jobs: a tenant whose jobs are in
another cell than its own was moved (its older jobs stay readable by id; see docs/design/cells.md).

``--if-cells N`` shows where each would be placed with N cells, and which would move. The last
line is the ``JOBCAST_CELL_PLACEMENT`` value that pins every known tenant where it is now: set it
before appending a cell, so no tenant moves (new tenants are then placed by the hash over all cells).

Also here: :func:`check_cells`, which ``jobcast web`` and ``jobcast worker`` run before they start.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from jobcast.worker import schema
from jobcast.worker.cells import Placement
from jobcast.worker.connections import redis_for
from jobcast.worker.settings import ConfigError, Settings
from jobcast.worker.store import redis_client

from ..keys import ApiKeys

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TenantPlace:
    tenant: str
    cell: int
    placed_by: str
    data_in: list[int]
    #: Where it would be placed with ``--if-cells`` cells (None without it).
    would_be: int | None = None


async def tenants_with_jobs(redis: Redis, cell: int) -> set[str]:
    """The tenants that have a job index in cell ``cell``'s Redis (one SCAN over the index keys)."""
    prefix = schema.index_key("", cell=cell)
    tenants = set()
    async for key in redis.scan_iter(match=schema.index_key("*", cell=cell), count=1000):
        tenants.add(str(key)[len(prefix) :].split(":", 1)[0])
    return tenants


async def survey(settings: Settings, if_cells: int | None) -> list[TenantPlace]:
    placement = settings.placement
    clients = [redis_client(settings, cell) for cell in range(len(settings.cell_urls))]
    try:
        per_cell = await asyncio.gather(*(tenants_with_jobs(redis, cell) for cell, redis in enumerate(clients)))
        keyed = {info.tenant for info in await ApiKeys(clients[0]).list()}
    finally:
        for redis in clients:
            await redis.aclose()
    known = set(settings.tenant_keys.values()) | keyed | set(placement.overrides) | set().union(*per_cell)
    after = Placement(if_cells, placement.overrides) if if_cells else None
    return [
        TenantPlace(
            tenant=tenant,
            cell=placement.tenant_cell(tenant),
            placed_by="override" if tenant in placement.overrides else "hash",
            data_in=[cell for cell, tenants in enumerate(per_cell) if tenant in tenants],
            would_be=after.tenant_cell(tenant) if after else None,
        )
        for tenant in sorted(known)
    ]


def report(settings: Settings, places: list[TenantPlace], *, as_json: bool) -> str:
    pin = settings.placement.pinning_line(place.tenant for place in places)
    if as_json:
        return json.dumps(
            {"cells": len(settings.cell_urls), "tenants": [p.__dict__ for p in places], "pin": pin}, indent=2
        )
    lines = [f"{len(settings.cell_urls)} cell(s). Tenants:", f"  {'tenant':<24} cell  placed by  jobs in"]
    for p in places:
        moved = f"   -> cell {p.would_be} unless pinned" if p.would_be is not None and p.would_be != p.cell else ""
        held = ",".join(map(str, p.data_in)) or "-"
        note = "  (moved: older jobs in another cell)" if any(c != p.cell for c in p.data_in) else ""
        lines.append(f"  {p.tenant:<24} {p.cell:>4}  {p.placed_by:<9}  {held}{note}{moved}")
    lines.append("")
    lines.append("To keep every tenant where it is when a cell is appended to JOBCAST_REDIS_URLS, set first:")
    lines.append(f"JOBCAST_CELL_PLACEMENT='{pin}'")
    return "\n".join(lines)


def run_cells(settings: Settings, *, if_cells: int | None, as_json: bool) -> None:
    print(report(settings, asyncio.run(survey(settings, if_cells)), as_json=as_json))


async def check_cell(url: str, index: int) -> None:
    """Remember in ``url``'s Redis that it is cell ``index``, or refuse when it was another one."""
    redis = redis_for(url)
    try:
        if await redis.set(schema.CELL_INDEX, index, nx=True):
            return
        claimed = await redis.get(schema.CELL_INDEX)
    finally:
        await redis.aclose()
    if str(claimed) != str(index):
        raise ConfigError(
            f"the Redis of cell {index} in JOBCAST_REDIS_URLS was cell {claimed}: the list was reordered or an "
            "entry removed, which would move tenants away from their jobs. Restore the previous order (cells "
            "are only ever appended)."
        )


async def check_cells(urls: list[str]) -> None:
    """:func:`check_cell` for every cell, at once; a cell not reachable now is skipped (the process
    starts and reconnects by itself, as with one Redis), with a warning."""
    results = await asyncio.gather(*(check_cell(url, i) for i, url in enumerate(urls)), return_exceptions=True)
    for index, result in enumerate(results):
        if isinstance(result, (RedisError, OSError)):
            logger.warning("cell %d not reachable to check its index (%s); not checked", index, result)
        elif isinstance(result, BaseException):
            raise result
