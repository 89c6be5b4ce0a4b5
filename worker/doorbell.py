"""arq's ``Worker``, woken by a doorbell instead of polling: the base of Jobcast's two workers.

arq polls its queue every ``poll_delay`` (0.5 s by default, so a job waits ~250 ms on average before
an idle worker sees it). Jobcast's scripts PUBLISH on a doorbell channel whenever they queue
something; the process's listener calls :meth:`DoorbellWorker.wake`, and an idle worker waits for
that, for a finished job (a slot is free), or for :meth:`DoorbellWorker._idle_timeout` — a 1 s
fallback, or less when the subclass knows something falls due sooner — instead of sleeping.

A worker reads at most as many queue entries as it has free slots, so a high-priority job submitted
behind a backlog is next, not behind a batch already read. When Redis is away the worker keeps its
process, backs off and tries again (what it would run is safe in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from arq.worker import Worker
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

IDLE_FALLBACK_S = 1.0
RECONNECT_MAX_S = 5.0


class DoorbellWorker(Worker):
    """Also Jobcast's conventions for both queues: job payloads are JSON (``lua/jobs.lua`` writes
    them in arq's format), results are neither kept nor logged (outcomes live in Jobcast's records)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            poll_delay=0,
            job_serializer=orjson.dumps,
            job_deserializer=orjson.loads,
            keep_result=0,
            log_results=False,
            **kwargs,
        )
        self._wakeup = asyncio.Event()
        self._read = 0
        self._poll_failures = 0
        self._stopping = False
        self._parked = asyncio.Event()

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
            await super()._poll_iteration()
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
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        self._read = len(job_ids)
        before = set(self.tasks)
        await super().start_jobs(job_ids)
        for job_id in self.tasks.keys() - before:
            # Registered after arq's own callback, so the slot is already counted free when the
            # poll loop wakes (arq's after_job_end hook fires too early for that).
            self.tasks[job_id].add_done_callback(self._slot_freed)

    def _slot_freed(self, task: asyncio.Task[None]) -> None:
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
