"""The arq worker process: arq's ``Worker``, woken by a doorbell instead of polling.

arq polls its queue every ``poll_delay`` (0.5 s by default, so a job waits ~250 ms on average before
an idle worker sees it). Jobcast's enqueue script PUBLISHes on ``jobcast:doorbell``; this worker
keeps one pub/sub connection, and an idle worker waits for the doorbell (or a finished job, or a
1 s fallback) instead of sleeping, so pickup takes milliseconds. The same connection carries
``cancel {id}`` messages for running jobs.

Two more departures from arq's defaults, both deliberate:

- every job run gets its own arq id (``{job id}.{run}``, see ``lua/jobs.lua``), and arq's own retry
  and abort machinery is not used: retries, cancellation and lost workers are handled by
  :mod:`worker.runner` against the job record, which is the source of truth;
- a worker reads at most as many queue entries as it has free slots, so a high-priority job
  submitted behind a backlog is next, not behind a batch already read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import Any

import orjson
from arq.connections import RedisSettings
from arq.worker import Worker, func
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import schema
from .runner import Runner
from .settings import Settings
from .store import Store, redis_client
from .types import Registry, load_registry

logger = logging.getLogger(__name__)

IDLE_FALLBACK_S = 1.0
RECONNECT_MAX_S = 5.0


async def run_job(ctx: dict[str, Any], job_id: str, run: int) -> None:
    """The one arq function: run ``run`` of job ``job_id``."""
    runner: Runner = ctx["runner"]
    await runner.execute(job_id, run)


class JobcastWorker(Worker):
    def __init__(self, settings: Settings, registry: Registry, *, handle_signals: bool = True) -> None:
        self.settings = settings
        self.registry = registry
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        super().__init__(
            functions=[func(run_job, name=schema.ARQ_FUNCTION, timeout=registry.max_timeout_s + 60, max_tries=1000)],
            redis_settings=RedisSettings.from_dsn(settings.redis_url),
            queue_name=schema.ARQ_QUEUE,
            job_serializer=orjson.dumps,
            job_deserializer=orjson.loads,
            keep_result=0,
            max_jobs=settings.worker_concurrency,
            poll_delay=0,
            handle_signals=handle_signals,
            job_completion_wait=settings.shutdown_grace_s,
            on_startup=self._startup,
            on_shutdown=self._shutdown,
            log_results=False,
        )
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._parked = asyncio.Event()
        self._read = 0
        self._background: list[asyncio.Task[None]] = []
        self._redis: Redis | None = None
        self._poll_failures = 0

    # --- lifecycle --------------------------------------------------------------------------------

    async def _startup(self, ctx: dict[str, Any]) -> None:
        self._redis = redis_client(self.settings)
        store = Store(self._redis, self.settings)
        runner = Runner(store, self.registry, self.settings)
        ctx["runner"] = runner
        self._background = [
            asyncio.create_task(runner.heartbeat_forever(), name="jobcast-heartbeat"),
            asyncio.create_task(runner.maintain_forever(), name="jobcast-maintenance"),
            asyncio.create_task(self._listen(runner), name="jobcast-doorbell"),
        ]
        logger.info(
            "worker %s ready: %d job types (%s), concurrency %d",
            self.worker_id,
            len(self.registry),
            ", ".join(jt.name for jt in self.registry),
            self.max_jobs,
        )

    async def _shutdown(self, ctx: dict[str, Any]) -> None:
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._redis is not None:
            await self._redis.aclose()
        logger.info("worker %s stopped", self.worker_id)

    # --- the doorbell ------------------------------------------------------------------------------

    async def _listen(self, runner: Runner) -> None:
        delay = 0.1
        while True:
            pubsub = redis_client(self.settings).pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(schema.DOORBELL_CHANNEL, schema.CONTROL_CHANNEL)
                self._wakeup.set()  # anything queued while we were not listening
                delay = 0.1
                async for message in pubsub.listen():
                    if message["channel"] == schema.DOORBELL_CHANNEL:
                        self._wakeup.set()
                    else:
                        verb, _, job_id = str(message["data"]).partition(" ")
                        if verb == "cancel":
                            runner.stop_job(job_id, "cancel")
            except (RedisError, OSError) as exc:
                logger.warning("doorbell connection lost (%s); reconnecting in %.1fs", exc, delay)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    # --- arq overrides -----------------------------------------------------------------------------

    async def _poll_iteration(self) -> None:
        if self._stopping:
            # stop() is waiting to cancel us: do it here, outside any Redis call.
            self._parked.set()
            await asyncio.Event().wait()
        self._wakeup.clear()
        self._read = 0
        self.queue_read_limit = max(1, self.max_jobs - self.job_counter)
        try:
            await super()._poll_iteration()
            self._poll_failures = 0
        except (RedisError, OSError) as exc:
            # Redis is away: keep the process, back off, try again (jobs are safe in Redis).
            self._poll_failures += 1
            delay = min(0.1 * 2**self._poll_failures, RECONNECT_MAX_S)
            logger.warning("cannot read the queue (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            return
        if self._read < self.queue_read_limit or self.job_counter >= self.max_jobs:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_FALLBACK_S):
                    await self._wakeup.wait()

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        logger.info(
            "worker %s: %s received: taking no new jobs; %d running get %ss to finish",
            self.worker_id,
            signal.Signals(signum).name,
            len(self.tasks),
            self.settings.shutdown_grace_s,
        )
        super().handle_sig_wait_for_completion(signum)

    async def stop(self) -> None:
        """Stop a worker started with ``async_run()`` inside another program (tests, embedding):
        running jobs are cancelled and handed back, connections closed."""
        self.allow_pick_jobs = False
        self._stopping = True
        self._wakeup.set()
        if self.main_task is not None and not self.main_task.done():
            # Let the poll loop finish the Redis round trip it may be in (a cancellation in the
            # middle of one leaves a connection behind).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._parked.wait()
        running = [t for t in self.tasks.values() if not t.done()]
        for task in running:
            task.cancel()
        if self.main_task is not None:
            self.main_task.cancel()
        await asyncio.gather(*running, *([self.main_task] if self.main_task else []), return_exceptions=True)
        if self._pool is not None:
            await self._shutdown(self.ctx)
            await self.pool.aclose()
            self._pool = None

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        self._read = len(job_ids)
        before = set(self.tasks)
        await super().start_jobs(job_ids)
        for job_id in self.tasks.keys() - before:
            # Registered after arq's own callback, so the slot is already counted free when the
            # poll loop wakes (arq's after_job_end hook fires too early for that).
            self.tasks[job_id].add_done_callback(self._slot_freed)

    def _slot_freed(self, task: asyncio.Task[None]) -> None:
        self._wakeup.set()


def build_worker(settings: Settings, *, handle_signals: bool = True) -> JobcastWorker:
    return JobcastWorker(settings, load_registry(settings), handle_signals=handle_signals)


def run(settings: Settings) -> None:
    """Run a worker in this process until SIGTERM/SIGINT (the Procfile's ``worker`` line)."""
    import uvloop

    # arq logs every pickup with a "delayed=" figure computed from the queue score, which our
    # priority boost makes meaningless; the lifecycle is logged by worker.store instead.
    logging.getLogger("arq.worker").setLevel(max(logging.WARNING, logging.getLogger().level))

    asyncio.set_event_loop(uvloop.new_event_loop())
    build_worker(settings).run()
