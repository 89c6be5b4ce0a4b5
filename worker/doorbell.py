"""arq's ``Worker``, woken by a doorbell instead of polling: the base of Jobcast's two workers.

**This module is the arq seam.** Jobcast keeps arq as its worker runtime (the queue format, the
in-progress locks of webhook attempts, timeouts, the function registry, signal handling) but changes
how a worker picks jobs up, which arq offers no public hook for. Everything that depends on arq's
internals is here, listed in :data:`ARQ_INTERNALS`, and nowhere else: the other modules use only what
:class:`DoorbellWorker` offers (``wake``, ``halt``, ``pool_open``, ``close_pool``, ``running_jobs``,
the ``lock_timeout_s`` argument, ``_on_stop_signal``, and ``claim``, which a subclass may override).
``tests/test_arq_seam.py`` fingerprints each listed arq internal, so an arq upgrade that changes one
fails loudly and says what to re-check; ``lua/jobs.lua`` and ``lua/claim.lua`` write arq's queue
entries and locks in arq's own format, which the same test checks against arq's own reader, and it
plays a worker of the previous version (which ran job runs through arq) against this one's claim.
docs/DESIGN.md ("The arq seam") says how to upgrade.

arq polls its queue every ``poll_delay`` (0.5 s by default, so a job waits ~250 ms on average before
an idle worker sees it). Jobcast's scripts PUBLISH on a doorbell channel whenever they queue
something; the process's listener calls :meth:`DoorbellWorker.wake`, and an idle worker waits for
that, for a finished job (a slot is free), or for :meth:`DoorbellWorker._idle_timeout` — a 1 s
fallback, or less when the subclass knows something falls due sooner — instead of sleeping.

A worker reads at most as many queue entries as it has free slots, so a high-priority job submitted
behind a backlog is next, not behind a batch already read. The runs read are claimed in one call
(:meth:`DoorbellWorker.claim`) instead of arq's four sequential round trips per run, which capped one
worker at about a thousand no-op jobs a second (see BENCHMARKS.md): by default ``lua/claim.lua``
(arq's own checks and lock, for the whole batch) and then arq's ``run_job`` for each, which is how
the webhook delivery worker runs its attempts; the job worker overrides ``claim`` to start its runs
in the same call and run them itself (:mod:`jobcast.worker.main`). When Redis is away the worker
keeps its process, backs off and tries again (what it would run is safe in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import Coroutine
from importlib import resources
from typing import Any

import orjson
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.exceptions import RedisError

from .schema import Script

logger = logging.getLogger(__name__)

IDLE_FALLBACK_S = 1.0
RECONNECT_MAX_S = 5.0

#: The arq internals this module depends on, and how (tests/test_arq_seam.py fingerprints each).
ARQ_INTERNALS = {
    "Worker.__init__": "sets sem, job_counter, tasks, main_task, queue_read_limit, in_progress_timeout_s, "
    "allow_pick_jobs and _pool, which the overrides below read and write",
    "Worker._poll_iteration": "replaced: reads as many runs as there are free slots, starts them and calls "
    "heart_beat, as arq's does, but neither aborts, bursts nor walks every task; then waits for the doorbell",
    "Worker.heart_beat": "called once per poll, as arq's poll iteration calls it (health-check key, cron jobs)",
    "Worker.start_jobs": "replaced: claims the read runs in one call (DoorbellWorker.claim; lua/claim.lua "
    "mirrors arq's checks) and runs each under arq's sem, job_counter and tasks",
    "Worker._release_sem_dec_counter_on_complete": "called when a run's task ends, as arq's own done-callback",
    "Worker.run_job": "called to run a delivery attempt exactly as arq would (job runs do not go through it)",
    "Worker.handle_sig_wait_for_completion": "overridden to log what a stop signal leaves running",
    "Worker.close": "runs on_shutdown and then sets _pool to None, which pool_open reads",
    "arq.jobs.deserialize_job_raw": "reads the payloads lua/jobs.lua writes in arq's format",
}


class DoorbellWorker(Worker):
    """Also Jobcast's conventions for both queues: job payloads are JSON (``lua/jobs.lua`` writes
    them in arq's format), results are neither kept nor logged (outcomes live in Jobcast's records)."""

    def __init__(self, *, lock_timeout_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(
            poll_delay=0,
            job_serializer=orjson.dumps,
            job_deserializer=orjson.loads,
            keep_result=0,
            log_results=False,
            **kwargs,
        )
        self._wakeup = asyncio.Event()
        #: Set while the worker waits for its doorbell (nothing to read, or no free slot).
        self.idle = asyncio.Event()
        self._read = 0
        self._poll_failures = 0
        self._stopping = False
        self._parked = asyncio.Event()
        self._claim_source = resources.files(__package__).joinpath("lua/claim.lua").read_text()
        self._claim: Any = None  # the script, bound to arq's pool once it exists
        if lock_timeout_s is not None:
            # How long arq's in-progress lock on a taken run lasts (arq: the longest timeout + 10 s).
            self.in_progress_timeout_s = lock_timeout_s

    @property
    def running_jobs(self) -> int:
        return sum(not task.done() for task in self.tasks.values())

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        self._on_stop_signal(signum)
        super().handle_sig_wait_for_completion(signum)

    def _on_stop_signal(self, signum: signal.Signals) -> None:
        """Called when SIGTERM/SIGINT arrives, before arq stops taking jobs."""

    @property
    def pool_open(self) -> bool:
        """Whether arq's Redis pool is open (arq's ``close()`` closes it, after ``on_shutdown``)."""
        return self._pool is not None

    async def close_pool(self) -> None:
        """Close arq's Redis pool, when this worker made it."""
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    def wake(self) -> None:
        """Something was queued: look at the queue now."""
        self._wakeup.set()

    async def _idle_timeout(self) -> float:
        """How long an idle worker waits for the doorbell before it looks at the queue anyway."""
        return IDLE_FALLBACK_S

    async def _poll_iteration(self) -> None:
        if self._stopping:
            # halt() is waiting to cancel us: be cancelled here, outside any Redis call.
            self._parked.set()
            await asyncio.Event().wait()
        self._wakeup.clear()
        self._read = 0
        self.queue_read_limit = max(1, self.max_jobs - self.job_counter)
        try:
            await self._read_and_start()
            idle = self._read < self.queue_read_limit or self.job_counter >= self.max_jobs
            timeout = await self._idle_timeout() if idle else 0.0
            self._poll_failures = 0
        except (RedisError, OSError) as exc:
            self._poll_failures += 1
            delay = min(0.1 * 2**self._poll_failures, RECONNECT_MAX_S)
            logger.warning("cannot read the queue %s (%s); retrying in %.1fs", self.queue_name, exc, delay)
            await asyncio.sleep(delay)
            return
        if timeout > 0:
            self.idle.set()
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wakeup.wait()
            finally:
                self.idle.clear()

    async def _read_and_start(self) -> None:
        """arq's poll iteration, less what Jobcast does not use (bursts, aborts) and less its walk
        over every task on every poll (a cost that grew with the jobs running): a run's task leaves
        ``tasks`` by itself when it ends (:meth:`_run_ended`)."""
        if self.allow_pick_jobs and self.job_counter < self.max_jobs:
            job_ids = await self.pool.zrangebyscore(
                self.queue_name, min=float("-inf"), max=timestamp_ms(), start=0, num=self.queue_read_limit
            )
            await self.start_jobs(job_ids)
        await self.heart_beat()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Start the runs read from the queue: :meth:`claim` them (one round trip), then run each
        under arq's semaphore and job counter, as arq would."""
        self._read = len(job_ids)
        free = self.max_jobs - self.job_counter
        if not job_ids or free <= 0:
            return
        for key, coroutine in await self.claim([raw.decode() for raw in job_ids], free):
            await self.sem.acquire()  # never waits: at most `free` runs were claimed
            self.job_counter += 1
            task = self.loop.create_task(coroutine)
            task.add_done_callback(functools.partial(self._run_ended, key))
            self.tasks[key] = task

    async def claim(self, run_ids: list[str], free: int) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        """Claim at most ``free`` of the runs read (best first): what to run, each with the key it is
        known by in ``tasks``. By default, arq's way: ``lua/claim.lua`` (arq's checks and
        in-progress lock, for the whole batch), then arq's ``run_job``. A subclass that starts its
        runs itself overrides this (:class:`jobcast.worker.main.JobcastWorker`)."""
        if self._claim is None:
            self._claim = Script(self.pool, self._claim_source)
        lock_ms = int(self.in_progress_timeout_s * 1000)
        args = [in_progress_key_prefix, timestamp_ms(), lock_ms, free, *run_ids]
        claimed = await self._claim(keys=[self.queue_name], args=args)
        return [
            (raw_id.decode(), self.run_job(raw_id.decode(), int(float(score))))
            for raw_id, score in zip(claimed[::2], claimed[1::2], strict=True)
        ]

    def _run_ended(self, key: str, task: asyncio.Task[None]) -> None:
        """A run's task ended: its slot is free (arq's own accounting), it leaves ``tasks`` (so
        nothing walks finished runs; arq's poll loop walked them all on every poll), and what it
        raised is logged (arq's loop re-raised it, ending the worker)."""
        self._release_sem_dec_counter_on_complete()
        if self.tasks.get(key) is task:
            del self.tasks[key]
        if not task.cancelled() and task.exception() is not None:
            failure = task.exception()
            logger.error("run %s ended with an unexpected error: %r", key, failure, exc_info=failure)
        self.wake()

    async def halt(self, grace_s: float = 0.0) -> None:
        """Stop taking jobs, give running ones ``grace_s`` seconds, cancel the rest and end the poll
        loop. (arq puts a cancelled job back on its queue; Jobcast's runner hands a cancelled run back.)"""
        self.allow_pick_jobs = False
        self._stopping = True
        self.wake()
        if self.main_task is not None and not self.main_task.done():
            # Let the poll loop finish the Redis round trip it may be in (a cancellation in the
            # middle of one leaves a connection behind).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._parked.wait()
        running = [t for t in self.tasks.values() if not t.done()]
        if running and grace_s > 0:
            await asyncio.wait(running, timeout=grace_s)
        for task in running:
            task.cancel()
        if self.main_task is not None:
            self.main_task.cancel()
        await asyncio.gather(*running, *([self.main_task] if self.main_task else []), return_exceptions=True)
