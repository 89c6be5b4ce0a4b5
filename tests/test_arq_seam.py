"""The arq seam (worker/doorbell.py): what Jobcast relies on inside arq, checked against arq itself.

arq offers no public hook for how a worker picks jobs up, so ``DoorbellWorker`` overrides and calls
some of its internals, and Jobcast's Lua writes arq's queue entries in arq's own format. These tests
fail loudly when an arq upgrade changes any of them: re-read each changed function against what
``ARQ_INTERNALS`` says Jobcast does with it (docs/DESIGN.md, "The arq seam"), adapt doorbell.py, and
then record the new fingerprints here.
"""

from __future__ import annotations

import importlib.metadata
import time
import tomllib
from pathlib import Path

import arq.constants
import arq.jobs
import arq.worker
import orjson
from redis.asyncio import Redis

from jobcast.worker import schema
from jobcast.worker.doorbell import ARQ_INTERNALS
from jobcast.worker.models import Priority
from jobcast.worker.store import Store

from .seams import assert_internals_unchanged, source_fingerprint

#: sha256 (first 16 hex digits) of the source of each internal, as of arq 0.28.0.
FINGERPRINTS = {
    "Worker.__init__": "edfb0cd7e05e77cf",
    "Worker._poll_iteration": "f8d39d823a0a59f2",
    "Worker.heart_beat": "2e9959bea66dc551",
    "Worker.start_jobs": "b45797cfa40bed7f",
    "Worker._release_sem_dec_counter_on_complete": "0ed101482e942c33",
    "Worker.run_job": "589a19059ff84ee7",
    "Worker.handle_sig_wait_for_completion": "8f161d86834cc74e",
    "Worker.close": "5bcc9cb356680829",
    "arq.jobs.deserialize_job_raw": "f330dfaff8e2160f",
}
ROOT = Path(__file__).resolve().parent.parent


def fingerprint(name: str) -> str:
    return source_fingerprint(arq.jobs if name.startswith("arq.jobs.") else arq.worker, name.removeprefix("arq.jobs."))


def test_every_arq_internal_jobcast_relies_on_is_unchanged() -> None:
    assert_internals_unchanged("arq", ARQ_INTERNALS, FINGERPRINTS, fingerprint, "worker/doorbell.py")


def test_the_installed_arq_is_the_one_the_seam_was_checked_against() -> None:
    requirement = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                       if r.startswith("arq"))  # fmt: skip
    assert requirement == "arq>=0.28.0,<0.29", "widen the pin only after this file's checks pass on the new arq"
    assert importlib.metadata.version("arq").startswith("0.28.")


async def test_arq_reads_the_runs_jobcast_queues_in_its_own_format(redis: Redis, store: Store) -> None:
    """lua/jobs.lua writes arq's job payload itself; arq's own reader must understand it."""
    created = await store.create(
        tenant="acme", job_type="sleep", params={"seconds": 1}, priority=Priority.NORMAL, max_attempts=3
    )
    run_id = schema.arq_run_id(created.job_id or "", 1)
    assert await redis.zscore(schema.ARQ_QUEUE, run_id) is not None
    raw = await redis.get(arq.constants.job_key_prefix + run_id)
    function, args, kwargs, tries, enqueued_ms = arq.jobs.deserialize_job_raw(raw, deserializer=orjson.loads)
    assert (function, list(args), kwargs, tries) == (schema.ARQ_FUNCTION, [created.job_id, 1], {}, 1)
    assert enqueued_ms > 1_700_000_000_000


# --- A rolling upgrade: a worker that runs job runs through arq shares the queue with one that does not.
# The earlier worker's side is played here exactly as it talks to Redis: lua/claim.lua (arq's checks
# and in-progress lock), arq's run_job reading the payload, the state machine's `start` op, then
# arq's finish_job. The record is the lock both respect: a run starts once, whoever claims first.


async def _old_worker_claims(redis: Redis, run_id: str) -> bool:
    claim = schema.Script(redis, (ROOT / "worker" / "lua" / "claim.lua").read_text())
    now_ms = time.time_ns() // 1_000_000
    claimed = await claim(
        keys=[schema.ARQ_QUEUE], args=[arq.constants.in_progress_key_prefix, now_ms, 60_000, 1, run_id]
    )
    return bool(claimed)


async def _old_worker_runs(redis: Redis, store: Store, job_id: str, run_id: str) -> str | None:
    """arq's run_job, the earlier runner's start and outcome, arq's finish_job: the job's status
    after its outcome, or None when the start was refused (another worker has the run)."""
    assert await redis.get(arq.constants.job_key_prefix + run_id) is not None  # arq reads the payload first
    outcome = None
    if await store.start(job_id, 1, time.time_ns() // 1_000_000 + 60_000) is not None:
        outcome = await store.complete(job_id, 1, '"old"')
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(*(prefix + run_id for prefix in (arq.constants.retry_key_prefix,
                                                    arq.constants.in_progress_key_prefix,
                                                    arq.constants.job_key_prefix)))  # fmt: skip
        pipe.zrem(schema.ARQ_QUEUE, run_id)
        await pipe.execute()
    return outcome


async def _queued_job(store: Store) -> tuple[str, str]:
    created = await store.create(
        tenant="acme", job_type="sleep", params={"seconds": 0}, priority=Priority.NORMAL, max_attempts=3
    )
    job_id = created.job_id or ""
    return job_id, schema.arq_run_id(job_id, 1)


async def _statuses(redis: Redis, job_id: str) -> list[str]:
    return [f["event"] for _, f in await redis.xrange(schema.job_log_key(job_id))]


async def test_a_run_an_earlier_worker_locked_is_started_once_by_whoever_starts_it_first(
    redis: Redis, store: Store
) -> None:
    job_id, run_id = await _queued_job(store)
    assert await _old_worker_claims(redis, run_id)  # arq's lock: this version's claim does not look at it
    (claimed,) = await store.claim([run_id], time.time_ns() // 1_000_000 + 60_000, 1)
    assert (claimed.job_id, claimed.run) == (job_id, 1)
    assert await _old_worker_runs(redis, store, job_id, run_id) is None  # its start is refused: not run
    assert await store.complete(job_id, 1, '"new"') == "completed"
    assert await _statuses(redis, job_id) == ["job.queued", "job.processing", "job.completed"]


async def test_a_run_this_version_started_is_not_claimed_by_an_earlier_worker(redis: Redis, store: Store) -> None:
    job_id, run_id = await _queued_job(store)
    assert len(await store.claim([run_id], time.time_ns() // 1_000_000 + 60_000, 1)) == 1
    assert not await _old_worker_claims(redis, run_id)  # off the queue since its start
    assert await store.complete(job_id, 1, '"new"') == "completed"
    assert await _statuses(redis, job_id) == ["job.queued", "job.processing", "job.completed"]
    assert await redis.keys("arq:*") == []  # the payload went with the run's end


async def test_a_run_an_earlier_worker_started_is_dropped_from_a_claim_that_read_it_before(
    redis: Redis, store: Store
) -> None:
    job_id, run_id = await _queued_job(store)
    assert await _old_worker_claims(redis, run_id)
    assert await _old_worker_runs(redis, store, job_id, run_id) == "completed"
    # This version's worker had read the run off the queue before: its claim starts nothing.
    assert await store.claim([run_id], time.time_ns() // 1_000_000 + 60_000, 1) == []
    assert await _statuses(redis, job_id) == ["job.queued", "job.processing", "job.completed"]
    assert await redis.zcard(schema.ARQ_QUEUE) == 0 and await redis.keys("arq:*") == []
