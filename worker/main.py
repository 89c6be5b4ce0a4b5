"""The worker process: arq workers woken by a doorbell instead of polling (:mod:`jobcast.worker.doorbell`).

Jobcast's enqueue script PUBLISHes on ``jobcast:doorbell``; this process keeps one pub/sub
connection, and an idle worker waits for the doorbell instead of sleeping, so pickup takes
milliseconds. The same connection carries ``cancel {id}`` messages for running jobs and the webhook
doorbell of the delivery worker that runs beside the jobs, on its own queue
(:mod:`jobcast.worker.delivery`, which says why it is not a process of its own). The process also moves
finished jobs to the archive (:mod:`jobcast.worker.archiver`).

With several cells (:mod:`jobcast.worker.cells`) the process runs one :class:`JobcastWorker` per
cell it serves (all by default; ``jobcast worker --cells 0,2``), each a whole worker of that cell —
its arq queue, doorbell, webhook deliveries, maintenance and archiver — in one event loop, stopped
together by one signal handler. ``JOBCAST_WORKER_CONCURRENCY`` is per cell served.

A departure from arq's defaults, deliberate: every job run gets its own arq id (``{c<cell>}{job id}.{run}``,
see ``lua/jobs.lua``), and arq's own retry and abort machinery is not used: retries, cancellation
and lost workers are handled by :mod:`jobcast.worker.runner` against the job record, which is the source
of truth. Nor is arq's ``run_job``: the worker's claim of the runs it read from the queue starts them
(``claim`` in ``lua/jobs.lua``, one call for the batch) and the runner runs them, so a job run costs
arq no lock, no retry counter and no bookkeeping when it ends (docs/design/redis-layout.md, "Claim is
start"). The queue's entries and payloads stay in arq's format, so a worker of an earlier version,
which runs them through arq, can share the queue during a rolling upgrade. The webhook delivery
worker runs its attempts arq's way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Coroutine
from typing import Any

from arq.worker import func
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import collector, schema
from .archive import Archive
from .archiver import Archiver
from .connections import arq_pool_for, arq_settings_for, follow_primary
from .delivery import DeliveryWorker
from .doorbell import RECONNECT_MAX_S, DoorbellWorker
from .relayout import refuse_old_layout
from .runner import Runner
from .settings import Settings
from .store import Store, redis_client
from .supervision import supervise
from .types import Registry, load_registry

logger = logging.getLogger(__name__)


async def run_job(ctx: dict[str, Any], job_id: str, run: int) -> None:
    """The arq function the queue's payloads name (a worker of an earlier version runs them through
    it). This worker starts its runs itself (:meth:`JobcastWorker.claim`), so arq never calls it
    here; were it called, it would claim and run the run the same way."""
    runner: Runner = ctx["runner"]
    for _, running in await runner.claim([schema.arq_run_id(job_id, run, cell=runner.store.cell)], 1):
        await running


class JobcastWorker(DoorbellWorker):
    """The worker of one cell (``cell``: its index)."""

    def __init__(self, settings: Settings, registry: Registry, *, cell: int = 0, handle_signals: bool = True) -> None:
        self.settings = settings
        self.registry = registry
        self.cell = cell
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        super().__init__(
            functions=[func(run_job, name=schema.ARQ_FUNCTION, timeout=registry.max_timeout_s + 60, max_tries=1000)],
            redis_settings=arq_settings_for(settings.cell_urls[cell]),
            redis_pool=arq_pool_for(settings.cell_urls[cell]),
            queue_name=schema.in_cell(schema.ARQ_QUEUE, cell),
            max_jobs=settings.worker_concurrency,
            handle_signals=handle_signals,
            job_completion_wait=settings.shutdown_grace_s,
            on_startup=self._startup,
            on_shutdown=self._shutdown,
        )
        self._background: list[asyncio.Task[None]] = []
        #: Set once it was told to stop (a signal, or a part of it died).
        self.stop_requested = False
        #: What killed a part of this worker (it then stops, and ``run`` exits with status 1).
        self.died: BaseException | None = None
        self._redis: Redis | None = None
        self.deliveries: DeliveryWorker | None = None
        self._archive: Archive | None = None
        #: In-flight deliveries get this long to finish when the worker stops (jobs had their grace).
        self._delivery_grace_s = min(settings.shutdown_grace_s, settings.webhook_timeout_s)
        self._runner: Runner | None = None

    async def claim(self, run_ids: list[str], free: int) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        """Job runs are started by their claim and run by the runner, not by arq (module docstring)."""
        assert self._runner is not None  # set by _startup, before the first poll
        return await self._runner.claim(run_ids, free, stopping=lambda: not self.allow_pick_jobs)

    # --- lifecycle --------------------------------------------------------------------------------

    async def _startup(self, ctx: dict[str, Any]) -> None:
        self._redis = redis_client(self.settings, self.cell)
        store = Store(self._redis, self.settings, cell=self.cell)
        runner = Runner(store, self.registry, self.settings, self.worker_id)
        # Both at once (the heartbeat lands in the new layout, harmless if this start is refused).
        await asyncio.gather(refuse_old_layout(self._redis), store.worker_seen(self.worker_id))
        ctx["runner"] = self._runner = runner
        self.deliveries = DeliveryWorker(self.settings, redis=self._redis, pool=self.pool, cell=self.cell)
        deliveries = self.deliveries
        self._archive = Archive(self.settings.archive_url)
        archiver = Archiver(self._redis, self.settings, self._archive, cell=self.cell)
        clients: list[Redis] = [self._redis, self.pool]
        # Supervised (worker.supervision): a loop that dies of something unexpected is logged and
        # run again; the delivery worker, an arq worker of its own, cannot be, so the process stops.
        self._background = [
            supervise("jobcast-heartbeat", runner.heartbeat_forever),
            supervise("jobcast-maintenance", runner.maintain_forever),
            supervise("jobcast-doorbell", lambda: self._listen(runner, deliveries)),
            supervise("jobcast-webhooks", deliveries.async_run, on_death=self._die),
            supervise("jobcast-archiver", archiver.run_forever),
            # A Sentinel-managed cell: every connection (arq's pool, ours, the doorbell's) moves to
            # the new primary as soon as the sentinels switch it.
            supervise("jobcast-primary", lambda: follow_primary(self.settings.cell_urls[self.cell], clients)),
        ]
        logger.info(
            "worker %s ready%s: %d job types (%s), concurrency %d, webhook deliveries %d",
            self.worker_id,
            f" for cell {self.cell}" if len(self.settings.cell_urls) > 1 else "",
            len(self.registry),
            ", ".join(jt.name for jt in self.registry),
            self.max_jobs,
            self.deliveries.max_jobs,
        )

    async def _shutdown(self, ctx: dict[str, Any]) -> None:
        try:
            if self.deliveries is not None:
                await self.deliveries.stop(self._delivery_grace_s)
            for task in self._background:
                task.cancel()
            for task in self._background:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            if self._redis is not None:
                await self._redis.aclose()  # whatever happened above: no connection left to the collector
            if self._archive is not None:
                await self._archive.close()
        logger.info("worker %s stopped", self.worker_id)

    def _die(self, exc: BaseException) -> None:
        """A part of the worker died: stop as on SIGTERM (running jobs get their grace), then exit 1."""
        self.died = exc
        self.handle_sig_wait_for_completion(signal.SIGTERM)

    # --- the doorbell ------------------------------------------------------------------------------

    async def _listen(self, runner: Runner, deliveries: DeliveryWorker) -> None:
        assert self._redis is not None  # set by _startup before this task starts
        delay = 0.1
        while True:
            # From the worker's own client (and pool), like the hub's: a client made per reconnect
            # was never closed, and left its pool's connections to the garbage collector.
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(schema.DOORBELL_CHANNEL, schema.CONTROL_CHANNEL, schema.WEBHOOK_DOORBELL_CHANNEL)
                self.wake()  # anything queued while we were not listening
                deliveries.wake()
                delay = 0.1
                async for message in pubsub.listen():
                    if message["channel"] == schema.DOORBELL_CHANNEL:
                        self.wake()
                    elif message["channel"] == schema.WEBHOOK_DOORBELL_CHANNEL:
                        deliveries.wake()
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

    def _on_stop_signal(self, signum: signal.Signals) -> None:
        self.stop_requested = True
        logger.info(
            "worker %s: %s received: taking no new jobs; %d running get %ss to finish",
            self.worker_id,
            signal.Signals(signum).name,
            self.running_jobs,
            self.settings.shutdown_grace_s,
        )

    async def stop(self) -> None:
        """Stop a worker started with ``async_run()`` inside another program (tests, embedding):
        running jobs are cancelled and handed back, in-flight deliveries put back, connections closed."""
        await self.halt()
        if self.pool_open:  # else arq's own close() has already shut down
            self._delivery_grace_s = 0.0
            await self._shutdown(self.ctx)
            await self.close_pool()


def build_worker(settings: Settings, *, cell: int = 0, handle_signals: bool = True) -> JobcastWorker:
    return JobcastWorker(settings, load_registry(settings), cell=cell, handle_signals=handle_signals)


def run(settings: Settings) -> None:
    """Run the workers of the cells this process serves until SIGTERM/SIGINT (the Procfile's
    ``worker`` line); exit 1 when a part of one died (the others then stop as on SIGTERM)."""
    import uvloop

    # arq logs every pickup with a "delayed=" figure computed from the queue score, which our
    # priority boost makes meaningless; the lifecycle is logged by worker.store instead.
    logging.getLogger("arq.worker").setLevel(max(logging.WARNING, logging.getLogger().level))

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    # Built with the loop in place (arq's Worker takes the current one); signals are ours, for all.
    workers = [build_worker(settings, cell=cell, handle_signals=False) for cell in settings.served_cells]
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _stop_all, workers, signum)
    collector.tune()
    try:
        loop.run_until_complete(_run_all(workers))
    finally:
        loop.close()
    if any(worker.died is not None for worker in workers):
        raise SystemExit(1)


def _stop_all(workers: list[JobcastWorker], signum: signal.Signals) -> None:
    """Stop every worker as arq stops one on a signal: no new jobs, running ones get their grace."""
    for worker in workers:
        if not worker.stop_requested:
            worker.handle_sig_wait_for_completion(signum)


async def _run_all(workers: list[JobcastWorker]) -> None:
    """Run the workers until they stop; once one stops (a part of it died, or it could not start),
    the others stop too, and what ended it is raised (a Redis never reached: the CLI says where).
    Each is closed as arq's ``run()`` closes it (its ``on_shutdown``, then its pool)."""
    tasks = [asyncio.ensure_future(worker.async_run()) for worker in workers]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        _stop_all(workers, signal.SIGTERM)
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for worker in workers:
            await worker.close()
    for error in [task.exception() for task in tasks if not task.cancelled()]:
        if error is not None:
            raise error
