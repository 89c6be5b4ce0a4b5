"""The archive's hot read (``Archive.get``, on the driver: worker/archive/point.py), on a real
SQLite file and a real PostgreSQL database: right answers under concurrency, tenants apart, a lost
PostgreSQL connection answering ``ArchiveUnavailable`` once and then reading again, no transaction
left open on the kept connections, and a closed archive that reads again."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from redis.asyncio import Redis

from jobcast.worker.archive import Archive, ArchiveUnavailable
from jobcast.worker.archive.point import LANES
from jobcast.worker.archiver import Archiver
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store

from .test_archive import archive, archive_settings, finished_job, tiered  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def archived_ids(redis: Redis, archive_settings: Settings, archive: Archive, tiered: Store) -> list[str]:  # noqa: F811
    ids = [await finished_job(tiered, tenant="acme" if i % 2 else "umbrella") for i in range(12)]
    archiver = Archiver(redis, archive_settings, archive)
    while await archiver.move_once():
        pass
    assert await redis.zcard("jobcast:finished") == 0
    return ids


async def test_many_reads_at_once_each_get_their_own_job_and_tenants_stay_apart(
    archive: Archive,  # noqa: F811
    archived_ids: list[str],
) -> None:
    tenants = ["acme" if i % 2 else "umbrella" for i in range(len(archived_ids))]
    # More reads at once than PostgreSQL's kept connections: the others borrow from the pool.
    assert len(archived_ids) * 2 > LANES
    for _ in range(3):
        own = await asyncio.gather(*(archive.get(j, t) for j, t in zip(archived_ids, tenants, strict=True)))
        assert [r["id"] if r else None for r in own] == archived_ids
        assert [r["tenant"] if r else None for r in own] == tenants
        other = await asyncio.gather(
            *(archive.get(j, "umbrella" if t == "acme" else "acme") for j, t in zip(archived_ids, tenants, strict=True))
        )
        assert other == [None] * len(archived_ids)
        anyone = await asyncio.gather(*(archive.get(j) for j in archived_ids))
        assert [r["id"] if r else None for r in anyone] == archived_ids
    assert await archive.get("job_01ARZ3NDEKTSV4RRFFQ69G5FAV", "acme") is None


async def test_a_closed_archive_reads_again(archive: Archive, archived_ids: list[str]) -> None:  # noqa: F811
    first = await archive.get(archived_ids[1], "acme")
    await archive.close()
    assert await archive.get(archived_ids[1], "acme") == first
    assert first is not None and first["id"] == archived_ids[1]


def _backends(url: str, *states: str) -> list[tuple[int, str]]:
    """(pid, state) of the other sessions connected to the archive's database."""
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return [(pid, state) for pid, state in rows if not states or state in states]


async def test_kept_postgresql_connections_hold_no_transaction_open(
    archive: Archive,  # noqa: F811
    archived_ids: list[str],
) -> None:
    if archive.dialect != "postgresql":
        pytest.skip("PostgreSQL's sessions")
    await archive.close()  # the archiver's connections leave: what remains is the reads'
    for _ in range(3):
        await asyncio.gather(*(archive.get(j) for j in archived_ids))
    sessions = _backends(archive.url)
    assert sessions, "the reads keep connections"
    assert all(state == "idle" for _, state in sessions), sessions  # not "idle in transaction"


async def test_a_lost_postgresql_connection_fails_one_read_and_the_next_reads_again(
    archive: Archive,  # noqa: F811
    archived_ids: list[str],
) -> None:
    if archive.dialect != "postgresql":
        pytest.skip("a PostgreSQL server ending a session")
    await archive.close()
    job_id = archived_ids[1]
    assert await archive.get(job_id, "acme") is not None  # one kept connection now
    reads = _backends(archive.url)
    assert reads
    with psycopg.connect(archive.url, autocommit=True) as admin:
        for pid, _ in reads:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(ArchiveUnavailable, match="cannot be read"):
        await archive.get(job_id, "acme")
    record = await archive.get(job_id, "acme")
    assert record is not None and record["id"] == job_id
