"""The move of finished jobs to the archive, on a real SQLite file and a real PostgreSQL database:
what moves, that it loses and duplicates nothing (a kill between copy and evict, two archivers at
once), and that the tiered store reads one history."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
from redis.asyncio import Redis

from jobcast.worker import schema
from jobcast.worker.archive import Archive, ArchiveUnavailable, tables
from jobcast.worker.archive.engine import create_engine
from jobcast.worker.archiver import Archiver
from jobcast.worker.history import JobQuery
from jobcast.worker.models import JobStatus, Priority
from jobcast.worker.settings import Settings
from jobcast.worker.store import Event, Store
from jobcast.worker.webhooks import Attempt, WebhookStore

from .conftest import ROOT, make_settings, wait_until
from .sqldb import archive_url

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["sqlite", "postgresql"])
def archive_settings(request: pytest.FixtureRequest, tmp_path: Path, settings: Settings) -> Iterator[Settings]:
    with archive_url(request.param, tmp_path) as url:
        yield make_settings(settings.redis_url, archive_url=url, archive_after_s=0, archive_batch=5)


@pytest.fixture
async def archive(archive_settings: Settings) -> AsyncIterator[Archive]:
    archive = Archive(archive_settings.archive_url)
    await archive.migrate()
    yield archive
    await archive.close()


@pytest.fixture
async def tiered(redis: Redis, archive_settings: Settings, archive: Archive) -> Store:
    return Store(redis, archive_settings, archive)


@pytest.fixture
async def archiver(redis: Redis, archive_settings: Settings, archive: Archive) -> Archiver:
    return Archiver(redis, archive_settings, archive)


async def finished_job(
    store: Store,
    tenant: str = "acme",
    job_type: str = "sleep",
    params: dict[str, object] | None = None,
    webhook: dict[str, object] | None = None,
) -> str:
    created = await store.create(
        tenant=tenant,
        job_type=job_type,
        params=params or {"seconds": 0},
        priority=Priority.NORMAL,
        max_attempts=3,
        webhook=webhook,
    )
    assert created.job_id is not None
    assert await store.start(created.job_id, 1, time.time_ns() // 1_000_000 + 60_000) is not None
    await store.progress(created.job_id, 1, 50.0, "half", None)
    assert await store.complete(created.job_id, 1, '{"ok":true}') == "completed"
    return created.job_id


async def in_redis(redis: Redis, job_id: str) -> bool:
    return bool(await redis.exists(schema.job_key(job_id), schema.job_log_key(job_id)))


async def rows(archive: Archive, table: sa.Table) -> int:
    engine = create_engine(archive.url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())
    finally:
        await engine.dispose()


async def test_migrations_make_the_tables_the_code_queries(archive: Archive) -> None:
    engine = create_engine(archive.url)
    try:
        async with engine.connect() as conn:

            def columns(sync_conn: sa.Connection) -> dict[str, set[str]]:
                inspector = sa.inspect(sync_conn)
                return {t: {c["name"] for c in inspector.get_columns(t)} for t in tables.metadata.tables}

            found = await conn.run_sync(columns)
    finally:
        await engine.dispose()
    assert found == {name: set(table.columns.keys()) for name, table in tables.metadata.tables.items()}
    assert await archive.migrate() == ("0001", "0001")  # a second run changes nothing


async def test_a_finished_job_moves_with_its_log_and_reads_back_the_same(
    redis: Redis, tiered: Store, archive: Archive, archiver: Archiver
) -> None:
    job_id = await finished_job(tiered, params={"seconds": 0, "steps": 3})
    live = await tiered.get(job_id, "acme")
    live_events = await tiered.log_events("job", job_id)
    assert live is not None and [e.event for e in live_events] == [
        "job.queued",
        "job.processing",
        "job.progress",
        "job.completed",
    ]

    assert await archiver.move_once() == 1
    assert not await in_redis(redis, job_id)
    assert await redis.zscore(schema.FINISHED, job_id) is None
    assert job_id not in await redis.zrange(schema.index_key("acme"), 0, -1)

    assert await tiered.get(job_id, "acme") == live
    assert await tiered.log_events("job", job_id) == live_events
    assert await tiered.log_events("job", job_id, after=live_events[1].id) == live_events[2:]
    assert await tiered.log_floor("job", job_id) is None
    page, cursor = await tiered.list_jobs("acme")
    assert [r.id for r in page] == [job_id] and cursor is None
    assert await tiered.cancel(job_id, "acme") == ("terminal", "completed")


async def test_tenants_stay_apart_in_the_archive(tiered: Store, archiver: Archiver) -> None:
    job_id = await finished_job(tiered, tenant="acme")
    await archiver.move_once()
    assert await tiered.get(job_id, "acme") is not None
    assert await tiered.get(job_id, "globex") is None
    assert await tiered.list_jobs("globex") == ([], None)
    assert await tiered.cancel(job_id, "globex") == ("missing", None)


async def test_a_job_whose_delivery_is_pending_waits_and_moves_once_it_is_settled(
    redis: Redis, archive_settings: Settings, tiered: Store, archive: Archive, archiver: Archiver
) -> None:
    webhook = {"url": "https://example.com/hook", "events": ["job.completed"]}
    job_id = await finished_job(tiered, webhook=webhook)
    webhooks = WebhookStore(redis, archive_settings, archive)
    assert await archiver.move_once() == 1
    assert await in_redis(redis, job_id)  # its delivery is still pending: it stays
    assert await archive.get(job_id) is None

    (wid,) = await redis.lrange(schema.job_deliveries_key(job_id), 0, -1)
    delivery = await webhooks.get(wid)
    assert delivery is not None
    attempt = Attempt(at="2026-12-02T10:00:00.000000Z", duration_ms=3.5, status_code=200, error=None)
    assert await webhooks.record(delivery, "delivered", attempt) == "delivered"
    live = await webhooks.for_job(job_id)
    # Rescheduled by the first pass: due again (ARCHIVE_AFTER_S is 0 here).
    assert await archiver.move_once() == 1
    assert not await in_redis(redis, job_id)
    assert not await redis.exists(schema.delivery_key(wid), schema.delivery_attempts_key(wid))
    assert await webhooks.for_job(job_id) == live
    assert live[0]["status"] == "delivered" and live[0]["attempts"][0]["status_code"] == 200


async def test_eviction_refuses_a_job_that_changed_after_its_copy(
    redis: Redis, tiered: Store, archive: Archive, archiver: Archiver
) -> None:
    job_id = await finished_job(tiered)
    picked = await archiver.pick([job_id])
    await archiver.copy(picked.jobs)
    await redis.hincrby(schema.job_key(job_id), "version", 1)  # as any write to the job would
    assert await archiver.evict(picked.jobs) == 0
    assert await in_redis(redis, job_id)
    assert await redis.zscore(schema.FINISHED, job_id) is not None  # still queued for archiving
    await archiver.move_once()  # copies the new version, then evicts it
    assert not await in_redis(redis, job_id)
    archived = await archive.get(job_id)
    assert archived is not None and archived["version"] == str(int(picked.jobs[0].record["version"]) + 1)


CRASHING_ARCHIVER = """
import asyncio, os, signal, sys
from jobcast.worker.archive import Archive
from jobcast.worker.archiver import Archiver
from jobcast.worker.settings import Settings
from jobcast.worker.store import redis_client

class KilledAfterCopy(Archiver):
    async def evict(self, jobs):
        print(f"copied {len(jobs)}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no eviction: as a crash would

async def main():
    settings = Settings(_env_file=None, **{"redis_url": sys.argv[1], "archive_url": sys.argv[2],
        "archive_after_s": 0, "archive_batch": 100, "env": "development"})
    await KilledAfterCopy(redis_client(settings), settings, Archive(settings.archive_url)).move_once()

asyncio.run(main())
"""


async def test_killed_between_copy_and_evict_the_job_is_shown_once_and_moved_by_the_next_pass(
    redis: Redis, archive_settings: Settings, tiered: Store, archive: Archive, archiver: Archiver
) -> None:
    ids = [await finished_job(tiered) for _ in range(3)]
    before = {job_id: (await tiered.get(job_id), await tiered.log_events("job", job_id)) for job_id in ids}
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_ARCHIVER, archive_settings.redis_url, archive_settings.archive_url],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "copied 3"
    # Copied, not evicted: in both tiers, read once.
    for job_id in ids:
        assert await in_redis(redis, job_id) and await archive.get(job_id) is not None
    page, cursor = await tiered.list_jobs("acme", limit=10)
    assert sorted(r.id for r in page) == sorted(ids) and len(page) == 3 and cursor is None

    assert await archiver.move_once() == 3
    for job_id in ids:
        assert not await in_redis(redis, job_id)
        assert (await tiered.get(job_id), await tiered.log_events("job", job_id)) == before[job_id]
    assert await rows(archive, tables.jobs) == 3
    assert await rows(archive, tables.events) == sum(len(events) for _, events in before.values())


async def test_two_archivers_at_once_move_every_job_exactly_once(
    redis: Redis, archive_settings: Settings, tiered: Store, archive: Archive
) -> None:
    ids = [await finished_job(tiered, params={"seconds": 0, "n": i}) for i in range(23)]
    events = {job_id: await tiered.log_events("job", job_id) for job_id in ids}
    second_redis = Redis.from_url(archive_settings.redis_url, decode_responses=True)
    second_archive = Archive(archive_settings.archive_url)
    first = Archiver(redis, archive_settings, archive)
    second = Archiver(second_redis, archive_settings, second_archive)
    try:
        for _ in range(10):  # each pass takes a batch of 5; both passes see the same due jobs
            await asyncio.gather(first.move_once(), second.move_once())
            if not await redis.zcard(schema.FINISHED):
                break
    finally:
        await second_redis.aclose()
        await second_archive.close()
    assert len(events) == 23
    await assert_each_moved_once(redis, tiered, archive, events)


async def assert_each_moved_once(redis: Redis, tiered: Store, archive: Archive, events: dict[str, list[Event]]) -> None:
    """Every job of ``events`` (id -> its log) is in SQL once, with its whole log, and gone from Redis."""
    assert await redis.zcard(schema.FINISHED) == 0
    assert await rows(archive, tables.jobs) == len(events)
    assert await rows(archive, tables.events) == sum(len(e) for e in events.values())
    for job_id, log in events.items():
        assert not await in_redis(redis, job_id)
        assert await tiered.log_events("job", job_id) == log


async def test_listing_pages_across_tiers_while_jobs_move_show_each_job_once(tiered: Store, archiver: Archiver) -> None:
    ids = [await finished_job(tiered) for _ in range(17)]
    seen: list[str] = []
    cursor = None
    for _ in range(20):
        page, cursor = await tiered.list_jobs("acme", limit=4, before=cursor)
        seen += [r.id for r in page]
        await archiver.move_once()  # 5 more jobs leave Redis between two pages
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)


async def test_filters_apply_alike_in_both_tiers(tiered: Store, archiver: Archiver) -> None:
    archived = [
        await finished_job(tiered, job_type="report", params={"region": "Zürich North"}),
        await finished_job(tiered, params={"seconds": 0, "label": "nightly-export"}),
    ]
    await archiver.move_once()
    middle_ms = time.time_ns() // 1_000_000 + 2
    while time.time_ns() // 1_000_000 <= middle_ms:  # the next ids are of a later millisecond
        await asyncio.sleep(0.001)
    live = [
        await finished_job(tiered, job_type="report", params={"region": "zürich south"}),
        await finished_job(tiered, params={"seconds": 0, "label": "Nightly-Import"}),
    ]

    async def ids(**filters: object) -> list[str]:
        page, _ = await tiered.list_jobs("acme", query=JobQuery(**filters), limit=50)  # type: ignore[arg-type]
        return [r.id for r in page]

    assert await ids() == [*reversed(live), *reversed(archived)]
    assert await ids(search="ZÜRICH") == [live[0], archived[0]]
    assert await ids(search="nightly-") == [live[1], archived[1]]
    assert await ids(search='"label"') == [live[1], archived[1]]
    assert await ids(search="report") == [live[0], archived[0]]
    assert await ids(search="absent") == []
    assert await ids(job_type="report", search="north") == [archived[0]]
    assert await ids(status=JobStatus.COMPLETED, created_after_ms=middle_ms) == list(reversed(live))
    assert await ids(created_before_ms=middle_ms) == list(reversed(archived))
    assert await ids(status=JobStatus.QUEUED) == []


async def test_retention_deletes_archived_jobs_in_batches(tiered: Store, archive: Archive, archiver: Archiver) -> None:
    ids = [await finished_job(tiered) for _ in range(5)]
    await archiver.move_once()
    assert await archiver.apply_retention() == 0  # finished just now: kept
    assert await archive.expire(time.time_ns() // 1_000_000 + 1000, batch=2) == 2
    assert await archive.expire(time.time_ns() // 1_000_000 + 1000, batch=2) == 2
    assert await rows(archive, tables.jobs) == 1
    survivor = [job_id for job_id in ids if await archive.get(job_id) is not None]
    assert survivor == [ids[-1]]  # the oldest went first
    assert await rows(archive, tables.events) == len(await tiered.log_events("job", ids[-1]))


async def test_idempotent_replay_of_an_archived_job_returns_it(tiered: Store, archiver: Archiver) -> None:
    created = await tiered.create(
        tenant="acme", job_type="sleep", params={"seconds": 0}, priority=Priority.NORMAL, max_attempts=1,
        idempotency_key="order-7", fingerprint="body-1",
    )  # fmt: skip
    assert created.job_id is not None
    await tiered.start(created.job_id, 1, time.time_ns() // 1_000_000 + 60_000)
    await tiered.complete(created.job_id, 1, "{}")
    await archiver.move_once()
    again = await tiered.create(
        tenant="acme", job_type="sleep", params={"seconds": 0}, priority=Priority.NORMAL, max_attempts=1,
        idempotency_key="order-7", fingerprint="body-1",
    )  # fmt: skip
    assert (again.outcome, again.job_id) == ("existing", created.job_id)


async def test_reading_a_sqlite_archive_that_does_not_exist_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "never.sqlite3"
    archive = Archive(f"sqlite:///{path}")
    try:
        assert await archive.get("job_01ARZ3NDEKTSV4RRFFQ69G5FAV") is None
        page = await archive.page("acme", status=None, job_type=None, before=None, lowest=None, search=None, limit=5)
        assert page == ([], None)
        assert await archive.expire(0) == 0
    finally:
        await archive.close()
    assert not path.exists()


async def test_archived_record_is_the_redis_hash_verbatim(
    redis: Redis, tiered: Store, archive: Archive, archiver: Archiver
) -> None:
    job_id = await finished_job(tiered, params={"seconds": 0, "note": "ünïcode ✓"})
    raw = await redis.hgetall(schema.job_key(job_id))
    await archiver.move_once()
    assert await archive.get(job_id, "acme") == raw
    assert orjson.loads(raw["params"])["note"] == "ünïcode ✓"


def test_jobcast_migrate_creates_then_finds_the_schema_up_to_date(tmp_path: Path) -> None:
    from .sqldb import postgres_database

    with postgres_database() as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCAST_")}
        env["JOBCAST_ARCHIVE_URL"] = url
        first = subprocess.run([sys.executable, "-m", "jobcast", "migrate"], env=env, capture_output=True, timeout=60)
        assert first.returncode == 0, first.stderr.decode()
        assert "schema empty -> 0001" in first.stdout.decode()
        second = subprocess.run([sys.executable, "-m", "jobcast", "migrate"], env=env, capture_output=True, timeout=60)
        assert second.returncode == 0 and "up to date (schema 0001)" in second.stdout.decode()


async def test_an_unmigrated_postgresql_archive_says_to_run_jobcast_migrate(redis: Redis, settings: Settings) -> None:
    from .conftest import serving
    from .sqldb import postgres_database

    with postgres_database() as url:
        archive = Archive(url)
        try:
            with pytest.raises(ArchiveUnavailable, match="run `jobcast migrate`"):
                await archive.get("job_01ARZ3NDEKTSV4RRFFQ69G5FAV")
        finally:
            await archive.close()
        async with serving(make_settings(settings.redis_url, archive_url=url)) as client:
            response = await client.get("/jobs/job_01ARZ3NDEKTSV4RRFFQ69G5FAV")
            assert response.status_code == 503
            assert response.json()["type"] == "/problems/unavailable"
            assert "archive" in response.json()["detail"] and "postgres" not in response.json()["detail"]


async def test_search_text_is_plain_text_whatever_query_syntax_it_holds(tiered: Store, archiver: Archiver) -> None:
    tricky = 'a"b*c(d) OR e:f %_\\ NEAR^'
    job_id = await finished_job(tiered, params={"seconds": 0, "expr": tricky})
    await archiver.move_once()

    async def found(text: str) -> bool:
        page, _ = await tiered.list_jobs("acme", query=JobQuery(search=text))
        return [r.id for r in page] == [job_id]

    for text in ("b*c(d) OR", "e:f %_", "%_\\\\", "NEAR^", "near^", '\\"b*'):
        assert await found(text), text
    for text in ('" OR "', "%%%", "___", "b c", "NEAR*", "\x0e\u009aJ\U000fa839"):
        assert not await found(text), text


def test_settings_refuse_an_archive_that_would_come_after_retention_or_an_unknown_url(settings: Settings) -> None:
    from jobcast.worker.settings import ConfigError

    with pytest.raises(ConfigError, match=r"JOBCAST_ARCHIVE_AFTER_S \(3600\) must be less than JOBCAST_RETENTION_S"):
        make_settings(settings.redis_url, retention_s=3600)
    with pytest.raises(ConfigError, match="JOBCAST_ARCHIVE_URL must start with sqlite:/// or postgresql://"):
        make_settings(settings.redis_url, archive_url="mysql://db/jobs")
    assert make_settings(settings.redis_url, retention_s=3601).archive_after_s == 3600


async def rename_table(archive: Archive, old: str, new: str) -> None:
    engine = create_engine(archive.url)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f"ALTER TABLE {old} RENAME TO {new}"))
    finally:
        await engine.dispose()


async def test_a_copy_that_fails_leaves_redis_as_it_was_and_the_archiver_retries(
    redis: Redis, tiered: Store, archive: Archive, archiver: Archiver, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = await finished_job(tiered)
    live = await tiered.get(job_id)
    await rename_table(archive, "archive_events", "archive_events_away")  # the copy's second table fails
    with pytest.raises(ArchiveUnavailable):
        await archiver.move_once()
    assert await in_redis(redis, job_id) and await redis.zscore(schema.FINISHED, job_id) is not None
    assert await archive.get(job_id) is None  # the transaction took nothing
    assert await tiered.get(job_id) == live

    task = asyncio.create_task(archiver.run_forever())
    try:
        await wait_until(lambda: _logged(caplog, "archiver: "), timeout=20)
        await rename_table(archive, "archive_events_away", "archive_events")

        async def moved() -> bool:
            return not await in_redis(redis, job_id)

        await wait_until(moved, timeout=30)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await tiered.get(job_id) == live


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


async def test_a_job_id_carries_the_millisecond_of_its_created_at(store: Store) -> None:
    """created_after/created_before compare ids: a job's own created_at must select it (after)
    and exclude it (before), so the id's time is created_at's millisecond, every time."""
    from datetime import UTC, datetime, timedelta

    from jobcast.worker.ids import id_floor

    for _ in range(300):
        created = await store.create(
            tenant="acme", job_type="sleep", params={}, priority=Priority.NORMAL, max_attempts=1
        )
        assert created.job_id is not None and created.record is not None
        created_at = datetime.fromisoformat(created.record.created_at)
        millis = (created_at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
        assert id_floor(millis) <= created.job_id < id_floor(millis + 1), (created.job_id, created.record.created_at)
