"""``Archiver.drain``, what a worker's archiver runs: batches moved with the next pick overlapping
the last batch's copy and eviction, on a real SQLite file and a real PostgreSQL database. Every job
is moved exactly once (two drains at once too), a drain stops after its batches and says more are
due, and a drain whose copy fails leaves every job in Redis."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from jobcast.worker import schema
from jobcast.worker.archive import Archive, ArchiveUnavailable, tables
from jobcast.worker.archiver import Archiver
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store

from .test_archive import (  # noqa: F401 (fixtures)
    archive,
    archive_settings,
    archiver,
    assert_each_moved_once,
    finished_job,
    in_redis,
    rename_table,
    rows,
    tiered,
)

pytestmark = pytest.mark.timeout(90)


async def test_two_drains_at_once_move_every_job_exactly_once(
    redis: Redis,
    archive_settings: Settings,  # noqa: F811
    tiered: Store,  # noqa: F811
    archive: Archive,  # noqa: F811
) -> None:
    ids = [await finished_job(tiered, params={"seconds": 0, "n": i}) for i in range(23)]  # batches of 5
    events = {job_id: await tiered.log_events("job", job_id) for job_id in ids}
    second_redis = Redis.from_url(archive_settings.redis_url, decode_responses=True)
    second_archive = Archive(archive_settings.archive_url)
    try:
        first = Archiver(redis, archive_settings, archive)
        second = Archiver(second_redis, archive_settings, second_archive)
        assert await asyncio.gather(first.drain(), second.drain()) == [False, False]
    finally:
        await second_redis.aclose()
        await second_archive.close()
    assert len(events) == 23
    await assert_each_moved_once(redis, tiered, archive, events)


async def test_a_drain_stops_after_its_batches_and_says_more_are_due(
    redis: Redis,
    tiered: Store,  # noqa: F811
    archive: Archive,  # noqa: F811
    archiver: Archiver,  # noqa: F811
) -> None:
    ids = [await finished_job(tiered) for _ in range(13)]  # batches of 5
    assert await archiver.drain(max_batches=2) is True
    assert await redis.zcard(schema.FINISHED) == 3
    assert await rows(archive, tables.jobs) == 10
    assert await archiver.drain(max_batches=2) is False
    assert await redis.zcard(schema.FINISHED) == 0
    assert await rows(archive, tables.jobs) == 13
    assert [await in_redis(redis, job_id) for job_id in ids] == [False] * 13
    assert await archiver.drain() is False  # nothing due


async def test_a_drain_whose_copy_fails_leaves_every_job_in_redis(
    redis: Redis,
    tiered: Store,  # noqa: F811
    archive: Archive,  # noqa: F811
    archiver: Archiver,  # noqa: F811
) -> None:
    ids = [await finished_job(tiered) for _ in range(12)]
    await rename_table(archive, "archive_events", "archive_events_away")  # each copy fails
    with pytest.raises(ArchiveUnavailable):
        await archiver.drain()
    assert await redis.zcard(schema.FINISHED) == 12
    assert [await in_redis(redis, job_id) for job_id in ids] == [True] * 12
    assert [await archive.get(job_id) for job_id in ids] == [None] * 12
    await rename_table(archive, "archive_events_away", "archive_events")
    assert await archiver.drain() is False
    assert await rows(archive, tables.jobs) == 12
    assert [await in_redis(redis, job_id) for job_id in ids] == [False] * 12
