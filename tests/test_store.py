"""The state machine in jobs.lua, driven directly through the store against a real Redis."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from jobcast.worker import schema
from jobcast.worker.models import JobError, JobStatus, Priority
from jobcast.worker.records import JobRecord
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store, redis_client

ALLOWED = {
    ("queued", "processing"),
    ("queued", "cancelled"),
    ("processing", "queued"),
    ("processing", "completed"),
    ("processing", "failed"),
    ("processing", "cancelled"),
}
TERMINAL = {"completed", "failed", "cancelled"}
ERR = JobError(type="Boom", message="boom", retryable=True, attempt=1)


async def new_job(store: Store, tenant: str = "acme", max_attempts: int = 3) -> str:
    created = await store.create(
        tenant=tenant, job_type="sleep", params={"seconds": 1}, priority=Priority.NORMAL, max_attempts=max_attempts
    )
    assert created.outcome == "created" and created.job_id
    return created.job_id


async def record(store: Store, job_id: str) -> JobRecord:
    rec = await store.get(job_id)
    assert rec is not None
    return rec


async def log(redis: Redis, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [(f["event"], orjson.loads(f["data"])) for _, f in await redis.xrange(schema.job_log_key(job_id))]


async def expire_lease(redis: Redis, job_id: str) -> None:
    await redis.zadd(schema.RUNNING, {job_id: 0}, xx=True)


def check_invariants(rec: JobRecord, events: list[tuple[str, dict[str, Any]]]) -> None:
    statuses = [h["status"] for h in rec.history]
    assert statuses[0] == "queued"
    for before, after in itertools.pairwise(statuses):
        assert (before, after) in ALLOWED, statuses
    terminal_at = [i for i, s in enumerate(statuses) if s in TERMINAL]
    assert terminal_at in ([], [len(statuses) - 1]), statuses
    assert rec.status.value == statuses[-1]
    assert (rec.finished_at is not None) == (rec.status.value in TERMINAL)
    assert 1 <= rec.attempt <= rec.max_attempts
    # The log holds one event per transition, carrying the status it moved to, in the same order.
    transitions = [data["status"] for name, data in events if name != "job.progress"]
    assert transitions == statuses
    # Progress only while processing, never going down within one attempt.
    last: dict[int, float] = {}
    for name, data in events:
        if name == "job.progress":
            assert data["status"] == "processing"
            assert data["progress"]["percent"] >= last.get(data["attempt"], 0.0)
            last[data["attempt"]] = data["progress"]["percent"]
    assert events[-1][1]["status"] == rec.status.value


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "start",
                "progress",
                "complete",
                "fail",
                "retry",
                "handback",
                "worker_cancelled",
                "cancel",
                "reap",
                "promote",
            ]
        ),
        st.booleans(),  # use the current run (True) or a stale one (False)
        st.floats(min_value=0, max_value=100, allow_nan=False),
    ),
    max_size=25,
)


@hyp_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
async def test_random_operation_sequences_keep_every_invariant(
    ops: list[tuple[str, bool, float]], redis: Redis, store: Store
) -> None:
    job_id = await new_job(store)
    for op, current, percent in ops:
        before = await record(store, job_id)
        run = before.run if current else before.run - 1
        if op == "start":
            await store.start(job_id, run, 10**15)
        elif op == "progress":
            await store.progress(job_id, run, percent, "step", None)
        elif op == "complete":
            await store.complete(job_id, run, '{"ok": true}')
        elif op == "fail":
            await store.fail(job_id, run, ERR)
        elif op == "retry":
            await store.retry(job_id, run, ERR, 0)
        elif op == "handback":
            await store.hand_back(job_id, run)
        elif op == "worker_cancelled":
            await store.mark_cancelled(job_id, run)
        elif op == "cancel":
            await store.cancel(job_id, "acme")
        elif op == "reap":
            await expire_lease(redis, job_id)
            await store.reap(job_id, ERR)
        else:
            await store.promote()
        after = await record(store, job_id)
        if before.terminal:
            assert after.version == before.version, f"{op} changed a terminal job"
        if not current and op not in ("cancel", "reap", "promote"):
            assert after.version == before.version, f"{op} with a stale run changed the job"
        check_invariants(after, await log(redis, job_id))


async def test_terminal_states_are_final(redis: Redis, store: Store) -> None:
    job_id = await new_job(store)
    started = await store.start(job_id, 1, 10**15)
    assert started is not None
    assert await store.complete(job_id, 1, '{"done": 1}') == "completed"
    version = (await record(store, job_id)).version
    assert await store.fail(job_id, 1, ERR) is None
    assert await store.retry(job_id, 1, ERR, 0) is None
    assert await store.mark_cancelled(job_id, 1) is None
    assert await store.cancel(job_id, "acme") == ("terminal", "completed")
    assert await store.progress(job_id, 1, 100, None, None) is False
    assert await store.start(job_id, 1, 10**15) is None
    rec = await record(store, job_id)
    assert rec.version == version and rec.status is JobStatus.COMPLETED and rec.result == {"done": 1}


async def _race_once(settings: Settings, store: Store) -> list[str | None]:
    """Complete, fail and a worker-side cancel of one running job, each on its own connection."""
    job_id = await new_job(store)
    assert await store.start(job_id, 1, 10**15) is not None
    clients = [redis_client(settings) for _ in range(3)]
    try:
        stores = [Store(c, settings) for c in clients]
        outcomes = await asyncio.gather(
            stores[0].complete(job_id, 1, "1"),
            stores[1].fail(job_id, 1, ERR),
            stores[2].mark_cancelled(job_id, 1),
        )
    finally:
        for c in clients:
            await c.aclose()
    rec = await record(store, job_id)
    winners = [o for o in outcomes if o is not None]
    assert winners == [rec.status.value]
    assert [h["status"] for h in rec.history].count(rec.status.value) == 1
    return winners


async def test_concurrent_terminal_updates_have_exactly_one_winner(settings: Settings, store: Store) -> None:
    seen = set()
    for _ in range(30):
        seen.update(w for w in await _race_once(settings, store) if w)
    assert seen <= {"completed", "failed", "cancelled"}


async def test_api_cancel_racing_a_worker_start_has_one_outcome(settings: Settings, store: Store) -> None:
    outcomes = set()
    for _ in range(30):
        job_id = await new_job(store)
        a, b = redis_client(settings), redis_client(settings)
        try:
            started, (cancel, _) = await asyncio.gather(
                Store(a, settings).start(job_id, 1, 10**15), Store(b, settings).cancel(job_id, "acme")
            )
        finally:
            await a.aclose()
            await b.aclose()
        rec = await record(store, job_id)
        if started is None:
            assert cancel == "cancelled" and rec.status is JobStatus.CANCELLED
        else:
            assert cancel == "requested" and rec.status is JobStatus.PROCESSING and rec.cancel_requested
        outcomes.add(cancel)
    assert outcomes  # at least one case observed; both are valid serialisations


async def test_a_worker_that_lost_its_lease_cannot_overwrite_its_successor(redis: Redis, store: Store) -> None:
    job_id = await new_job(store)
    assert await store.start(job_id, 1, 10**15) is not None
    await expire_lease(redis, job_id)
    assert await store.reap(job_id, ERR) == "queued"
    rec = await record(store, job_id)
    assert rec.run == 2 and rec.attempt == 2 and rec.status is JobStatus.QUEUED
    # Run 2 is on the arq queue; run 1's entries are gone.
    assert await redis.zscore(schema.ARQ_QUEUE, schema.arq_run_id(job_id, 2)) is not None
    assert await redis.zscore(schema.ARQ_QUEUE, schema.arq_run_id(job_id, 1)) is None
    assert await store.start(job_id, 2, 10**15) is not None
    # The old worker wakes up and tries to finish: refused, and its progress is ignored.
    assert await store.progress(job_id, 1, 99, None, None) is False
    assert await store.complete(job_id, 1, '"stale"') is None
    assert await store.complete(job_id, 2, '"fresh"') == "completed"
    assert (await record(store, job_id)).result == "fresh"


async def test_reap_fails_the_job_after_its_last_attempt(redis: Redis, store: Store) -> None:
    job_id = await new_job(store, max_attempts=1)
    assert await store.start(job_id, 1, 10**15) is not None
    assert await store.reap(job_id, ERR) == "alive"  # lease still valid: nothing happens
    await expire_lease(redis, job_id)
    lost = JobError(type="WorkerLost", message="gone", retryable=True, attempt=1)
    assert await store.reap(job_id, lost) == "failed"
    rec = await record(store, job_id)
    assert rec.status is JobStatus.FAILED and rec.error == lost.model_dump()
    assert await redis.zscore(schema.RUNNING, job_id) is None


async def test_retry_waits_in_the_schedule_until_due(redis: Redis, store: Store) -> None:
    job_id = await new_job(store)
    assert await store.start(job_id, 1, 10**15) is not None
    assert await store.retry(job_id, 1, ERR, 60) == "queued"
    moved, next_due = await store.promote()
    assert moved == 0 and next_due is not None
    assert await redis.zscore(schema.ARQ_QUEUE, schema.arq_run_id(job_id, 2)) is None
    await redis.zadd(schema.SCHEDULED, {schema.arq_run_id(job_id, 2): 0})  # make it due
    assert await store.promote() == (1, None)
    assert await redis.zscore(schema.ARQ_QUEUE, schema.arq_run_id(job_id, 2)) is not None


async def test_progress_never_goes_down_within_an_attempt(redis: Redis, store: Store) -> None:
    job_id = await new_job(store)
    assert await store.start(job_id, 1, 10**15) is not None
    assert await store.progress(job_id, 1, 40, "a", None) is True
    assert await store.progress(job_id, 1, 30, "b", None) is False
    assert await store.progress(job_id, 1, 40, "c", "same percent, new step") is True
    assert (await record(store, job_id)).progress == {
        "percent": 40.0,
        "eta": None,
        "step": "c",
        "message": "same percent, new step",
    }
    # A new attempt starts from zero again.
    assert await store.retry(job_id, 1, ERR, 0) == "queued"
    assert await store.start(job_id, 2, 10**15) is not None
    assert await store.progress(job_id, 2, 10, None, None) is True


async def test_tenant_log_receives_every_event_of_the_tenant(redis: Redis, store: Store) -> None:
    a = await new_job(store, "acme")
    b = await new_job(store, "globex")
    assert await store.start(a, 1, 10**15) is not None
    acme = await store.log_events("tenant", "acme")
    assert [(e.job_id, e.event) for e in acme] == [(a, "job.queued"), (a, "job.processing")]
    assert [(e.job_id, e.event) for e in await store.log_events("tenant", "globex")] == [(b, "job.queued")]
    # Reading after an id gives exactly the later events.
    assert [e.event for e in await store.log_events("tenant", "acme", after=acme[0].id)] == ["job.processing"]


async def test_terminal_jobs_expire_after_the_retention_period(redis: Redis, store: Store, settings: Settings) -> None:
    job_id = await new_job(store)
    assert await redis.ttl(schema.job_key(job_id)) == -1  # live jobs never expire
    await store.cancel(job_id, "acme")
    ttl = await redis.ttl(schema.job_key(job_id))
    assert 0 < ttl <= settings.retention_s
    assert 0 < await redis.ttl(schema.job_log_key(job_id)) <= settings.retention_s


@pytest.mark.parametrize("limit", [1, 2, 5])
async def test_listing_skips_expired_records_and_cleans_the_index(redis: Redis, store: Store, limit: int) -> None:
    ids = [await new_job(store) for _ in range(5)]
    await redis.delete(schema.job_key(ids[2]))  # as if its retention ran out
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = await store.list_jobs("acme", limit=limit, before=cursor)
        seen += [r.id for r in page]
        if cursor is None:
            break
    assert seen == [i for i in reversed(ids) if i != ids[2]]
    assert await redis.zscore(schema.index_key("acme"), ids[2]) is None


async def test_an_accepted_cancel_wins_over_a_retry_or_a_hand_back(redis: Redis, store: Store) -> None:
    for finish_attempt in (store.retry, store.hand_back):
        job_id = await new_job(store)
        assert await store.start(job_id, 1, 10**15) is not None
        version = (await record(store, job_id)).version
        assert await store.cancel(job_id, "acme") == ("requested", None)
        # The request itself is a new version: ETags change, cancel_requested shows.
        assert (await record(store, job_id)).version == version + 1
        if finish_attempt is store.retry:
            assert await store.retry(job_id, 1, ERR, 0) == "cancelled"
        else:
            assert await store.hand_back(job_id, 1) == "cancelled"
        rec = await record(store, job_id)
        assert rec.status is JobStatus.CANCELLED and rec.run == 1
        assert await redis.zscore(schema.ARQ_QUEUE, schema.arq_run_id(job_id, 2)) is None
        check_invariants(rec, await log(redis, job_id))


async def test_a_redis_that_lost_the_functions_library_gets_it_again_on_the_next_call(
    redis: Redis, store: Store
) -> None:
    """A Redis restarted without persistence has no functions: the state machine's next call
    loads its library and runs, whichever connection it goes out on; calls in flight together
    each get their own outcome."""
    job_id = await new_job(store)
    await redis.execute_command("FUNCTION", "FLUSH")
    assert await store.start(job_id, 1, 10**15) is not None
    await redis.execute_command("FUNCTION", "FLUSH")
    others = await asyncio.gather(*(new_job(store) for _ in range(20)))
    assert len(set(others)) == 20
    for other in others:
        assert (await record(store, other)).status is JobStatus.QUEUED
    assert (await record(store, job_id)).status is JobStatus.PROCESSING
