"""One history across two tiers: what a listing asks for, and how the two tiers' pages merge.

A listing (``GET /jobs``) is newest first by job id (ids sort by creation time) with the last id
shown as the cursor, in both tiers: a Redis sorted set read by lex range, an indexed SQL range. A
page is read from Redis *first*, then from the archive. A job moves by being copied to the archive
and only then deleted from Redis, so a job that Redis no longer has when it is read is already in
the archive when the archive is read next: none is skipped. A job read from both (copied, not yet
evicted) is the same job and appears once. Because the cursor is an id, not an offset, a job
moving between two page requests is found on its page in whichever tier holds it then.

Each tier may stop early (Redis bounds the work of one request; SQL reads one page): it says down
to which id it looked (its *bound*). Of the merged ids, only those at or above the higher bound
are certain to be complete, so the page keeps those and the next cursor starts below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

from redis.asyncio import Redis

from . import schema
from .archive import Archive
from .ids import id_floor
from .models import JobStatus
from .records import JobRecord


class HasId(Protocol):
    @property
    def id(self) -> str: ...


@dataclass(frozen=True)
class JobQuery:
    """The filters of a listing (all optional, all combined)."""

    status: JobStatus | None = None
    job_type: str | None = None
    #: Epoch ms: jobs created at or after it, and strictly before it.
    created_after_ms: int | None = None
    created_before_ms: int | None = None
    #: A substring of the job's type or params (their JSON), case-insensitive.
    search: str | None = None

    def upper(self, before: str | None) -> str | None:
        """The exclusive upper id bound: the cursor, or ``created_before``, whichever is lower."""
        bounds = [before] if before else []
        if self.created_before_ms is not None:
            bounds.append(id_floor(self.created_before_ms))
        return min(bounds) if bounds else None

    def lowest(self) -> str | None:
        """The inclusive lower id bound (``created_after``)."""
        return None if self.created_after_ms is None else id_floor(self.created_after_ms)

    def searched(self, job_type: str, params_json: str) -> bool:
        """Whether a live job matches ``search`` exactly as the archive's SQL would."""
        return self.search is None or self.search.lower() in f"{job_type} {params_json}".lower()

    @property
    def archive_may_match(self) -> bool:
        """Archived jobs are all finished: a filter on a running status needs no SQL."""
        return self.status is None or self.status.terminal


T = TypeVar("T", bound=HasId)


def merge_pages(
    live: list[T], live_bound: str | None, archived: list[T], archived_bound: str | None, limit: int
) -> tuple[list[T], str | None]:
    """One page from the two tiers' pages (each newest first, each with its bound: None when that
    tier has no more matches, else the id it looked down to). Returns the page and the cursor."""
    bounds = [b for b in (live_bound, archived_bound) if b is not None]
    floor = max(bounds) if bounds else None
    seen: dict[str, T] = {}
    for item in [*live, *archived]:  # live first: a job in both tiers is shown as Redis has it
        if (floor is None or item.id >= floor) and item.id not in seen:
            seen[item.id] = item
    merged = sorted(seen.values(), key=lambda item: item.id, reverse=True)
    if len(merged) > limit:
        return merged[:limit], merged[limit - 1].id
    return merged, floor


async def list_jobs(
    redis: Redis,
    archive: Archive | None,
    tenant: str,
    query: JobQuery,
    limit: int,
    before: str | None,
    *,
    cell: int = 0,
) -> tuple[list[JobRecord], str | None]:
    """A page of the tenant's jobs, newest first, strictly older than job id ``before``: Redis's
    page (the tenant's cell, ``cell``), then the archive's, merged. Returns the records and the
    cursor for the next page (the last id returned when another match may exist, else None)."""
    upper, lowest = query.upper(before), query.lowest()
    if upper is not None and lowest is not None and upper <= lowest:
        return [], None
    live, live_bound = await _list_live(redis, tenant, query, limit, upper, lowest, cell)
    if archive is None or not query.archive_may_match:
        return live, live_bound
    raws, archived_bound = await archive.page(
        tenant,
        status=query.status.value if query.status else None,
        job_type=query.job_type,
        before=upper,
        lowest=lowest,
        search=query.search,
        limit=limit,
    )
    archived = [JobRecord.from_hash(raw) for raw in raws]
    return merge_pages(live, live_bound, archived, archived_bound, limit)


async def _list_live(
    redis: Redis, tenant: str, query: JobQuery, limit: int, upper: str | None, lowest: str | None, cell: int
) -> tuple[list[JobRecord], str | None]:
    """The Redis tier's page. With both status and type the status index is read and filtered by
    type. Work is bounded (20 index reads); past that the bound is the last id examined, so a
    sparse filter still pages on instead of scanning the whole index in one request. Index entries
    whose record expired are dropped on the way."""
    status, job_type = query.status, query.job_type
    key = schema.index_key(tenant, status=status.value if status else None, job_type=job_type, cell=cell)
    batch = max(limit + 1, 50)
    items: list[JobRecord] = []
    cursor = upper
    for _ in range(20):
        ids: list[str] = await redis.zrange(
            key,
            f"({cursor}" if cursor else "+",  # type: ignore[arg-type]
            f"[{lowest}" if lowest else "-",  # type: ignore[arg-type]
            desc=True,
            bylex=True,
            offset=0,
            num=batch,
        )
        if not ids:
            return items, None
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(schema.job_key(job_id, cell=cell))
            hashes = await pipe.execute()
        expired = []
        for job_id, h in zip(ids, hashes, strict=True):
            cursor = job_id
            if not h or "status" not in h:
                expired.append(job_id)
                continue
            record = JobRecord.from_hash(h)
            if (
                (job_type is not None and record.type != job_type)
                or (status is not None and record.status != status)
                or not query.searched(record.type, h.get("params", "{}"))
            ):
                continue
            if len(items) == limit:
                await _forget_index_entries(redis, tenant, key, expired, cell)
                return items, items[-1].id
            items.append(record)
        await _forget_index_entries(redis, tenant, key, expired, cell)
        if len(ids) < batch:
            return items, None
    return items, cursor


async def _forget_index_entries(redis: Redis, tenant: str, key: str, job_ids: list[str], cell: int) -> None:
    if not job_ids:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for index in {key, schema.index_key(tenant, cell=cell)} | {
            schema.index_key(tenant, status=s, cell=cell) for s in JobStatus
        }:
            pipe.zrem(index, *job_ids)
        await pipe.execute()
