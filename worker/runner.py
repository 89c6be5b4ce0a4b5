"""Runs jobs inside an arq worker: one run of one job, from ``processing`` to its outcome.

arq gives us the queue and the concurrency limit; the job's life is ours:

- the worker's claim of the runs it read from the queue starts them (``claim`` in ``lua/jobs.lua``:
  queued -> processing, only for a run that is its job's current one, which is the lock), and the
  runner runs what was started (:meth:`Runner.claim`, :meth:`Runner.run`), not arq's ``run_job``,
- the handler runs as its own task, under the job type's timeout,
- a heartbeat renews the lease of every running job every ``JOBCAST_HEARTBEAT_S`` seconds and learns
  of cancellations (also pushed on the control channel, so they usually land at once) and of lost
  leases (another worker took over: stop, write nothing),
- the outcome is recorded: completed, retry with backoff, failed, or cancelled,
- on worker shutdown past the grace period a running job is handed back (queued, same attempt),
  and so are the runs of a claim under way (:meth:`Runner.claim`).

A maintenance loop in every worker promotes due retries onto the queue and reaps jobs whose
lease lapsed (their worker died): they are retried, or failed with ``WorkerLost`` after the last
attempt. A killed worker's job is therefore noticed within lease + sweep (< 30 s with defaults),
whatever the job type's timeout. A worker never reaps a run it is running itself (a Redis paused
past the lease lapses every lease; its next heartbeat renews them), and only that run: a stale older
run of the job it still runs does not keep it from reaping the newer one. A newer run of a job it
still runs stops the older one (docs/design/redis-layout.md, "A Redis paused past a lease").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from . import schema
from .context import JobContext
from .errors import PermanentError, RetryableError
from .logs import current_job
from .models import JobError, JobStatus
from .settings import Settings
from .store import Claimed, Started, Store
from .types import JobType, Registry

logger = logging.getLogger(__name__)

LEASE_HEARTBEATS = 3
#: How long a worker keeps trying to write a finished attempt's outcome through a Redis outage.
OUTCOME_RETRY_S = 60.0
MESSAGE_MAX = 2000


@dataclass
class _Running:
    run: int
    task: asyncio.Task[Any]
    #: Why the handler task was cancelled by us: "cancel" (user asked), "lost" (lease gone).
    stop_reason: str | None = None
    started: float = field(default_factory=time.monotonic)


def _error(exc: BaseException, attempt: int, *, retryable: bool, message: str | None = None) -> JobError:
    text = message if message is not None else (str(exc) or repr(exc))
    return JobError(type=type(exc).__name__, message=text[:MESSAGE_MAX], retryable=retryable, attempt=attempt)


def _encode_result(result: Any) -> str:
    def default(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    return orjson.dumps(result, default=default).decode()


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class Runner:
    def __init__(self, store: Store, registry: Registry, settings: Settings, worker_id: str = "") -> None:
        self.store = store
        self.worker_id = worker_id
        self.registry = registry
        self.settings = settings
        self.running: dict[str, _Running] = {}
        self.lease_ms = int(settings.heartbeat_s * LEASE_HEARTBEATS * 1000)
        self._retry_scheduled = asyncio.Event()

    def _lease_deadline(self) -> int:
        return time.time_ns() // 1_000_000 + self.lease_ms

    # --- one run ------------------------------------------------------------------------------------

    async def claim(
        self, run_ids: list[str], limit: int, *, stopping: Callable[[], bool] | None = None
    ) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        """Start at most ``limit`` of the runs read from the queue (:meth:`Store.claim`, one call):
        what to run, each known by its arq run id. A start that fails leaves the runs queued (or,
        when only the answer was lost, leased to nobody: the reaper takes them over).

        The worker's shutdown does not lose a claim's runs: cancelled while the call is in flight
        (arq cancels the poll loop past the grace period, wherever it is), the claim still reads its
        reply, since Redis may have started the runs, and hands them back (same attempt) before the
        cancellation goes on; so it does when ``stopping()`` says the worker stopped taking jobs
        meanwhile. Otherwise they would wait for their lease to lapse and be retried as
        ``WorkerLost``, an attempt used."""
        call = asyncio.ensure_future(self.store.claim(run_ids, self._lease_deadline(), limit))
        try:
            claimed = await asyncio.shield(call)
        except asyncio.CancelledError:
            await self._hand_back_claim(call, run_ids)
            raise
        except (RedisError, OSError) as exc:
            jobs = ", ".join(schema.run_of(rid)[0] for rid in run_ids)
            logger.warning("jobs %s: start failed (%s); they stay queued", jobs, exc)
            raise
        if stopping is not None and stopping():
            await self._hand_back_claim(call, run_ids)
            return []
        return [(schema.arq_run_id(c.job_id, c.run, cell=self.store.cell), self.run(c)) for c in claimed]

    async def _hand_back_claim(self, call: asyncio.Future[list[Claimed]], run_ids: list[str]) -> None:
        """Hand back the runs of a claim the worker will not run, once its reply is in: within a
        lease (after that the reaper has them anyway)."""
        try:
            async with asyncio.timeout(self.lease_ms / 1000):
                claimed = await call
                for c in claimed:
                    await self._durably("hand back", c.job_id, self.store.hand_back, c.job_id, c.run)
        except (TimeoutError, RedisError, OSError) as exc:
            jobs = ", ".join(schema.run_of(rid)[0] for rid in run_ids)
            logger.warning(
                "jobs %s: the claim under way at the stop was not handed back (%r); the reaper retries them", jobs, exc
            )
            return
        for c in claimed:
            logger.info("job %s run %s: claimed as the worker stopped; handed back", c.job_id, c.run)

    async def run(self, claimed: Claimed) -> None:
        """Run a started run to its outcome. Cancelled (the worker stops past its grace period), it
        hands the job back and ends as arq ends a cancelled job: normally (arq's close gathers the
        tasks of its runs, and a cancelled one would end the process with the CancelledError)."""
        token = current_job.set(claimed.job_id)
        try:
            await self._run(claimed.job_id, claimed.run, claimed.started)
        except asyncio.CancelledError:
            logger.info("job %s run %s: stopped by the worker's shutdown", claimed.job_id, claimed.run)
        finally:
            current_job.reset(token)

    async def _run(self, job_id: str, run: int, started: Started) -> None:
        attempt = started.attempt
        jt = self.registry.get(started.type)
        if jt is None:
            await self.store.fail(
                job_id,
                run,
                JobError(
                    type="UnknownJobType",
                    message=f"this worker has no job type {started.type!r}; "
                    "start workers with the same JOBCAST_JOB_MODULES as the server",
                    retryable=False,
                    attempt=attempt,
                ),
            )
            return
        try:
            params = jt.params.model_validate_json(started.params_json)
        except ValidationError as exc:
            await self.store.fail(job_id, run, _error(exc, attempt, retryable=False))
            return

        ctx = JobContext(
            job_id=job_id,
            job_type=jt.name,
            attempt=attempt,
            max_attempts=started.max_attempts,
            run=run,
            store=self.store,
            interval_s=1.0 / self.settings.progress_rate,
        )
        task: asyncio.Task[Any] = asyncio.create_task(_await(jt.handler(ctx, params)), name=f"job-{job_id}")
        entry = _Running(run=run, task=task)
        stale = self.running.get(job_id)
        if stale is not None:
            # A newer run of this job started here while an older one still runs (its lease lapsed
            # and it was retried, e.g. Redis was paused past the lease): the older one is stale.
            self.stop_job(job_id, "lost", run=stale.run)
        self.running[job_id] = entry
        try:
            try:
                done, _ = await asyncio.wait({task}, timeout=jt.timeout_s)
            except asyncio.CancelledError:
                # The worker is shutting down past its grace period: stop the handler, hand the job back.
                await self._stop(job_id, task)
                ctx.close()
                await asyncio.shield(self._durably("hand back", job_id, self.store.hand_back, job_id, run))
                raise
            # Still in self.running while the outcome is written: heartbeats keep its lease.
            await self._record_outcome(jt, ctx, entry, timed_out=not done)
        finally:
            if self.running.get(job_id) is entry:  # not a newer run's
                del self.running[job_id]
            ctx.close()

    async def _durably(self, what: str, job_id: str, write: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Write a job's outcome, retrying through a Redis blip (the run's fence makes a repeated
        write harmless). Past ``OUTCOME_RETRY_S`` the error propagates; the lease then lapses and
        the reaper retries the job."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OUTCOME_RETRY_S
        delay = 0.1
        while True:
            try:
                return await write(*args)
            except (RedisError, OSError) as exc:
                if loop.time() > deadline:
                    logger.error("job %s: could not %s for %ss (%s); giving up", job_id, what, OUTCOME_RETRY_S, exc)
                    raise
                logger.warning("job %s: %s failed (%s); retrying in %.1fs", job_id, what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _outcome(
        self, what: str, write: Callable[..., Awaitable[Any]], job_id: str, run: int, *args: Any
    ) -> None:
        """Write a run's outcome (:meth:`_durably`); when it is refused, say whether it was lost."""
        if await self._durably(what, job_id, write, job_id, run, *args) is None:
            await self._undone(job_id, run)

    async def _undone(self, job_id: str, run: int) -> None:
        """A run whose job is queued *at this very run* was never started as far as Redis knows: its
        start was undone (a failover lost it). Its queue entry was lost with the start, so it is
        still on the queue and a worker claims it again; this is only said."""
        record = await self.store.get(job_id)
        if record is not None and record.status is JobStatus.QUEUED and record.run == run:
            logger.warning("job %s run %s: its start was lost (Redis failover); it runs again", job_id, run)

    async def _stop(self, job_id: str, task: asyncio.Task[Any]) -> None:
        """Cancel a handler and wait for it to end. Waited on, not awaited: a cancellation of our
        own task still propagates, and what the handler raised while stopping is logged, not lost."""
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            failure = task.exception()
            logger.warning("job %s: handler raised %r while being stopped", job_id, failure, exc_info=failure)

    async def _record_outcome(self, jt: JobType, ctx: JobContext, entry: _Running, *, timed_out: bool) -> None:
        job_id, run, attempt, task = ctx.job_id, ctx.run, ctx.attempt, entry.task
        if timed_out:
            await self._stop(job_id, task)
            exc: BaseException = TimeoutError()
            error = _error(exc, attempt, retryable=True, message=f"attempt exceeded the {jt.timeout_s:g} s timeout")
            await self._failed(jt, ctx, error, None)
            return
        if task.cancelled():
            if entry.stop_reason == "lost":
                logger.warning("job %s run %s: lease lost, another run owns the job; nothing recorded", job_id, run)
                return
            await ctx.drain()
            await self._outcome("record the cancellation", self.store.mark_cancelled, job_id, run)
            return
        failure = task.exception()
        if failure is None:
            try:
                result_json = _encode_result(task.result())
            except TypeError as exc:
                await self._outcome("record the failure", self.store.fail, job_id, run,
                                    _error(exc, attempt, retryable=False))  # fmt: skip
                return
            await ctx.drain()
            await self._outcome("record the result", self.store.complete, job_id, run, result_json)
            return
        if isinstance(failure, PermanentError):
            error = _error(failure, attempt, retryable=False)
        else:
            error = _error(failure, attempt, retryable=True)
            if not isinstance(failure, RetryableError):
                logger.warning("job %s attempt %s raised %r", job_id, attempt, failure, exc_info=failure)
        retry_after = failure.retry_after_s if isinstance(failure, RetryableError) else None
        await self._failed(jt, ctx, error, retry_after)

    async def _failed(self, jt: JobType, ctx: JobContext, error: JobError, retry_after_s: float | None) -> None:
        await ctx.drain()
        if error.retryable and ctx.attempt < ctx.max_attempts:
            delay = max(jt.backoff_s(ctx.attempt), retry_after_s or 0.0)
            await self._outcome("schedule the retry", self.store.retry, ctx.job_id, ctx.run, error, delay)
            self._retry_scheduled.set()  # the maintenance loop may need to wake earlier
        else:
            await self._outcome("record the failure", self.store.fail, ctx.job_id, ctx.run, error)

    # --- signals from outside -------------------------------------------------------------------------

    def stop_job(self, job_id: str, reason: str, *, run: int | None = None) -> None:
        """Stop the handler of ``job_id`` (of its run ``run`` only, when given)."""
        entry = self.running.get(job_id)
        if entry is not None and entry.stop_reason is None and run in (None, entry.run):
            logger.info("job %s: stopping handler (%s)", job_id, reason)
            entry.stop_reason = reason
            entry.task.cancel()

    async def heartbeat_once(self) -> None:
        if self.worker_id:
            await self.store.worker_seen(self.worker_id)
        runs = [(job_id, entry.run) for job_id, entry in self.running.items()]
        states = await self.store.heartbeat(self._lease_deadline(), runs)
        for (job_id, run), state in states.items():
            if state in ("cancel", "lost"):
                self.stop_job(job_id, state, run=run)

    async def heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            try:
                await self.heartbeat_once()
            except (RedisError, OSError) as exc:
                logger.warning("heartbeat failed (leases not renewed): %s", exc)

    async def maintain_once(self) -> float:
        """Promote due retries and reap lost jobs; returns seconds until the next due retry."""
        _, next_due = await self.store.promote()
        now_ms = time.time_ns() // 1_000_000
        for lapsed in await self.store.overdue(now_ms):
            ours = self.running.get(lapsed.job_id)
            if ours is not None and ours.run == lapsed.run:
                # Ours, and running: its lease lapsed only because it could not be renewed (Redis
                # paused or away longer than a lease); the next heartbeat renews it. An older run
                # of the job that still runs here is stale: the lapsed lease is another's.
                continue
            error = JobError(
                type="WorkerLost",
                message="the worker running this attempt stopped renewing its lease (killed, crashed or hung)",
                retryable=True,
                attempt=lapsed.attempt,
            )
            await self.store.reap(lapsed.job_id, error)
        wait = self.settings.maintenance_s
        if next_due is not None:
            wait = min(wait, max(0.0, (next_due - now_ms) / 1000))
        return wait

    async def maintain_forever(self) -> None:
        while True:
            try:
                wait = await self.maintain_once()
            except (RedisError, OSError) as exc:
                logger.warning("maintenance sweep failed: %s", exc)
                wait = self.settings.maintenance_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._retry_scheduled.wait()
            self._retry_scheduled.clear()
