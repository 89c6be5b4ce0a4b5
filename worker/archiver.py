"""The archiver: moves finished jobs from Redis to the archive, and applies retention there.

It runs in every worker process, beside the maintenance loop (:class:`Archiver.run_forever`,
started by :mod:`worker.main`): workers are what an installation always runs, they already hold
the Redis connection, and several of them archiving at once is safe (below), so there is no new
process to deploy or to keep single.

A move never loses or duplicates a job, whatever crashes when:

1. **Pick.** ``jobcast:finished`` holds every finished job scored by its finish time
   (``lua/jobs.lua`` adds it in the step that finishes it). Jobs finished more than
   ``JOBCAST_ARCHIVE_AFTER_S`` ago are read in one pipeline: hash, event log, deliveries.
   A job with a delivery still pending (retries) or dead (replayable) is not moved yet: it waits,
   rescheduled, until its deliveries are settled.
2. **Copy.** One SQL transaction upserts the batch (keyed by job id, stream ids, webhook-ids).
   Copying again is harmless: a crash after this step leaves the job in both tiers, which the
   reads show once (:mod:`worker.history`), and the next pass copies and evicts it again.
3. **Evict.** One call of ``jobs.lua``'s ``evict`` deletes each job from Redis only if it is still
   finished and unchanged (version, last event id, deliveries settled) — what was copied is what
   is deleted. A job that changed is left in place and copied again on a later pass.

Two archivers picking the same jobs both copy (the upsert makes that one row) and both evict (the
second finds nothing to delete). Retention (``JOBCAST_RETENTION_S``, counted from the finish)
deletes archived jobs in batches of ``RETENTION_BATCH``, at most once a minute per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import schema
from .archive import Archive, ArchivedJob, ArchiveUnavailable
from .models import JobStatus
from .settings import Settings

logger = logging.getLogger(__name__)

RETENTION_EVERY_S = 60.0
RETENTION_BATCH = 1000
#: Retention batches per round at most, so one round never holds the archiver for long.
RETENTION_ROUNDS = 50
BACKOFF_MAX_S = 30.0
#: Batches one drain moves at most before retention's turn.
DRAIN_BATCHES = 100
UNSETTLED = ("pending", "dead")


@dataclass(frozen=True)
class Picked:
    """What one pass read from Redis: jobs to copy, and ids that need no copy."""

    jobs: list[ArchivedJob]
    gone: list[str]  # no longer in Redis (expired): dropped from the finished set
    waiting: list[str]  # deliveries not settled: rescheduled


def _ms() -> int:
    return time.time_ns() // 1_000_000


class Archiver:
    def __init__(self, redis: Redis, settings: Settings, archive: Archive, cell: int = 0) -> None:
        self.redis = redis
        self.cell = cell
        self._finished = schema.in_cell(schema.FINISHED, cell)
        self.settings = settings
        self.archive = archive
        self._script = schema.JobsScript(redis, settings, cell)
        self._next_retention = 0.0

    async def run_forever(self) -> None:
        """Move due jobs batch after batch; idle for ``maintenance_s`` when none is due."""
        delay = self.settings.maintenance_s
        while True:
            try:
                more = await self.drain()
                if time.monotonic() >= self._next_retention:
                    await self.apply_retention()
                    self._next_retention = time.monotonic() + RETENTION_EVERY_S
                delay = self.settings.maintenance_s
            except (RedisError, OSError, ArchiveUnavailable) as exc:
                logger.warning("archiver: %s; trying again in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            if not more:
                await asyncio.sleep(self.settings.maintenance_s)

    async def move_once(self) -> int:
        """One batch: pick, copy, evict. Returns how many jobs were looked at."""
        due = await self._due(set())
        if due:
            await self._settle(await self.pick(due))
        return len(due)

    async def drain(self, max_batches: int = DRAIN_BATCHES) -> bool:
        """Move due jobs batch after batch, picking the next batch from Redis while the last one is
        copied to SQL and evicted, until a batch is not full or ``max_batches`` were moved (then
        retention gets its turn). Returns whether more may be due.

        Each batch still goes pick, copy, evict in that order; only two batches overlap (the next
        pick skips the ids of the batch in flight), so a move keeps :meth:`move_once`'s guarantees.
        Done one after the other, a batch's Redis reads, SQL writes and eviction each waited for
        the others; overlapped, one archiver moves well ahead of a worker (BENCHMARKS.md section 6)."""
        in_flight: asyncio.Task[None] | None = None
        flying: set[str] = set()
        more = False
        try:
            for _ in range(max_batches):
                due = await self._due(flying)
                more = len(due) == self.settings.archive_batch
                if not due:
                    break
                picked = await self.pick(due)
                if in_flight is not None:
                    await in_flight
                flying = set(due)
                in_flight = asyncio.create_task(self._settle(picked))
                if not more:
                    break
            if in_flight is not None:
                await in_flight
        finally:
            if in_flight is not None and not in_flight.done():
                # This pass failed or was cancelled: the batch in flight stops where it is (copied
                # or not, never evicted uncopied) and a later pass moves it.
                in_flight.cancel()
                with contextlib.suppress(asyncio.CancelledError, RedisError, OSError, ArchiveUnavailable):
                    await in_flight
        return more

    async def _due(self, flying: set[str]) -> list[str]:
        """Up to a batch of jobs due for the move, none of ``flying`` (the batch being moved)."""
        due: list[str] = await self.redis.zrangebyscore(
            self._finished,
            "-inf",
            _ms() - self.settings.archive_after_s * 1000,
            start=0,
            num=self.settings.archive_batch + len(flying),
        )
        return [job_id for job_id in due if job_id not in flying][: self.settings.archive_batch]

    async def _settle(self, picked: Picked) -> None:
        """Copy and evict what was picked; drop the gone ones and reschedule the waiting ones."""
        await self.copy(picked.jobs)
        evicted = await self.evict(picked.jobs)
        async with self.redis.pipeline(transaction=False) as pipe:
            if picked.gone:
                pipe.zrem(self._finished, *picked.gone)
            if picked.waiting:
                pipe.zadd(self._finished, dict.fromkeys(picked.waiting, _ms()), xx=True)
            await pipe.execute()
        logger.info(
            "archiver: %d jobs archived, %d waiting for webhook deliveries, %d already gone",
            evicted,
            len(picked.waiting),
            len(picked.gone),
        )

    async def pick(self, job_ids: list[str]) -> Picked:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(schema.job_key(job_id, cell=self.cell))
                pipe.xrange(schema.job_log_key(job_id, cell=self.cell), "-", "+")
                pipe.lrange(schema.job_deliveries_key(job_id, cell=self.cell), 0, -1)
            replies = await pipe.execute()
        found = []
        gone = []
        for i, job_id in enumerate(job_ids):
            record, log, wids = replies[3 * i : 3 * i + 3]
            if not record or not JobStatus(record.get("status", "queued")).terminal:
                gone.append(job_id)  # expired (or, impossibly, not finished): nothing to move
            else:
                found.append((record, log, wids))
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, _, wids in found:
                for wid in wids:
                    pipe.hgetall(schema.delivery_key(wid, cell=self.cell))
                    pipe.lrange(schema.delivery_attempts_key(wid, cell=self.cell), 0, -1)
            delivery_replies = iter(await pipe.execute())
        jobs, waiting = [], []
        for record, log, wids in found:
            deliveries = [(next(delivery_replies), next(delivery_replies)) for _ in wids]
            if any(d.get("state") in UNSETTLED for d, _ in deliveries if d):
                waiting.append(record["id"])
                continue
            events = [(sid, fields["event"], fields["data"]) for sid, fields in log]
            jobs.append(ArchivedJob(record, events, [(d, attempts) for d, attempts in deliveries if d]))
        return Picked(jobs, gone, waiting)

    async def copy(self, jobs: list[ArchivedJob]) -> None:
        await self.archive.put(jobs)

    async def evict(self, jobs: list[ArchivedJob]) -> int:
        """Delete the copied jobs from Redis, each only if unchanged; returns how many were."""
        if not jobs:
            return 0
        args: list[str | int] = []
        for job in jobs:
            last_sid = job.events[-1][0] if job.events else ""
            args += [job.id, job.record["version"], last_sid, len(job.deliveries)]
        verdicts = await self._script("evict", *args)
        for job, verdict in zip(jobs, verdicts, strict=True):
            if verdict == "changed":
                logger.info("job %s changed while it was archived; it will be copied again", job.id)
        return sum(1 for verdict in verdicts if verdict == "evicted")

    async def apply_retention(self) -> int:
        """Delete archived jobs that finished more than ``retention_s`` ago, in batches."""
        cutoff = _ms() - self.settings.retention_s * 1000
        deleted = 0
        for _ in range(RETENTION_ROUNDS):
            n = await self.archive.expire(cutoff, RETENTION_BATCH)
            deleted += n
            if n < RETENTION_BATCH:
                break
        if deleted:
            logger.info("archiver: %d archived jobs past retention deleted", deleted)
        return deleted
