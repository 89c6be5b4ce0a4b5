"""Workers that die or are stopped mid-job: real worker processes, real signals."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker import doorbell, schema
from jobcast.worker.main import JobcastWorker
from jobcast.worker.models import JobStatus, Priority
from jobcast.worker.runner import LEASE_HEARTBEATS, Runner
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store
from jobcast.worker.types import load_registry

from .conftest import make_settings, running_worker, submit, subscribed, wait_for_status, wait_until


async def _said(proc: Any, text: str) -> bool:
    return text in proc.output()


def test_default_settings_notice_a_dead_worker_within_30_seconds() -> None:
    defaults = Settings(env="development")
    lease = defaults.heartbeat_s * LEASE_HEARTBEATS
    assert lease + defaults.maintenance_s < 30


async def test_a_sigkilled_worker_s_job_is_retried_on_another_worker(
    client: httpx.AsyncClient, settings: Settings, worker_processes: Any, redis: Redis
) -> None:
    doomed = worker_processes()
    ticket = await submit(client, params={"seconds": 1.5, "steps": 3})
    await wait_for_status(client, ticket["id"], "processing", timeout=20)
    doomed.signal(signal.SIGKILL)
    async with running_worker(settings):  # noticed once the lease lapses (how soon: the first test)
        job = await wait_for_status(client, ticket["id"], "completed", timeout=60)
    assert job["attempt"] == 2
    assert [(h["status"], h["attempt"]) for h in job["history"]] == [
        ("queued", 1), ("processing", 1), ("queued", 2), ("processing", 2), ("completed", 2),
    ]  # fmt: skip
    retrying = [
        orjson.loads(f["data"])
        for _, f in await redis.xrange(schema.job_log_key(ticket["id"]))
        if f["event"] == "job.retrying"
    ]
    assert len(retrying) == 1 and retrying[0]["error"]["type"] == "WorkerLost"
    assert await redis.zcard(schema.RUNNING) == 0


async def test_a_sigkilled_worker_s_job_fails_with_a_reason_after_its_last_attempt(
    client: httpx.AsyncClient, settings: Settings, worker_processes: Any
) -> None:
    doomed = worker_processes()
    ticket = await submit(client, "fragile", params={"seconds": 60})
    await wait_for_status(client, ticket["id"], "processing", timeout=20)
    doomed.signal(signal.SIGKILL)
    async with running_worker(settings):  # any live worker's sweep notices the lapsed lease
        job = await wait_for_status(client, ticket["id"], "failed", timeout=15)
    assert job["error"]["type"] == "WorkerLost"
    assert job["error"]["attempt"] == 1 and job["error"]["retryable"] is True
    assert "lease" in job["error"]["message"]


async def test_sigterm_lets_running_jobs_finish_and_takes_no_new_ones(
    client: httpx.AsyncClient, settings: Settings, worker_processes: Any
) -> None:
    proc = worker_processes()
    running = await submit(client, params={"seconds": 0.8, "steps": 2})
    # Running, not only started: "processing" is written by the claim in Redis, and a worker that
    # stops before the claim's reply reaches it hands the run back unrun (Runner.claim). The job's
    # first progress report comes from the running job itself.
    job = await wait_for_status(client, running["id"], "processing", timeout=20)
    while job["status"] == "processing" and job["progress"]["percent"] == 0:
        job = (await client.get(f"/jobs/{running['id']}", params={"wait": "5"})).json()
    proc.signal(signal.SIGTERM)
    await wait_until(lambda: _said(proc, "taking no new jobs"))
    late = await submit(client, params={"seconds": 0})
    assert proc.wait(timeout=settings.shutdown_grace_s + 5) == 0, proc.output()
    assert (await wait_for_status(client, running["id"], "completed", timeout=5))["attempt"] == 1
    still = await client.get(f"/jobs/{late['id']}")
    assert still.json()["status"] == "queued"


async def test_sigterm_hands_back_a_job_that_outlives_the_grace_period(
    client: httpx.AsyncClient, settings: Settings, worker_processes: Any
) -> None:
    proc = worker_processes()
    ticket = await submit(client, params={"seconds": 30, "steps": 30})
    await wait_for_status(client, ticket["id"], "processing", timeout=20)
    proc.signal(signal.SIGTERM)
    # Bounded well short of the job's 30 s: a worker that waited for the job instead of handing it
    # back after its grace would not have exited yet (and the job would read completed below).
    assert proc.wait(timeout=settings.shutdown_grace_s + 20) == 0, proc.output()
    job = (await client.get(f"/jobs/{ticket['id']}")).json()
    assert job["status"] == "queued"
    # Handed back, not failed: the same attempt runs again on the next worker.
    assert [(h["status"], h["attempt"]) for h in job["history"]] == [
        ("queued", 1), ("processing", 1), ("queued", 1),
    ]  # fmt: skip
    assert job["error"] is None


async def test_a_worker_whose_redis_connections_are_killed_finishes_its_job_and_hears_the_doorbell(
    client: httpx.AsyncClient,
    settings: Settings,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No fallback poll within the test's time: only a doorbell listener that subscribed again can
    # wake the idle worker for the second job.
    monkeypatch.setattr(doorbell, "IDLE_FALLBACK_S", 3600.0)
    async with running_worker(settings) as worker:
        ticket = await submit(client, params={"seconds": 1.5, "steps": 3})
        await wait_for_status(client, ticket["id"], "processing", timeout=20)
        # Every connection but the test's own, as a Redis restart or a proxy failover drops them:
        # the worker's, arq's, its doorbell listener's and the server's.
        killed = await redis.client_kill_filter(_type="normal", skipme=True)
        killed += await redis.client_kill_filter(_type="pubsub", skipme=True)
        assert killed >= 3
        job = await wait_for_status(client, ticket["id"], "completed", timeout=30)
        await wait_until(lambda: _logged(caplog, "doorbell connection lost"))  # the listener was among them
        await wait_until(lambda: subscribed(redis, schema.DOORBELL_CHANNEL))
        await wait_until(lambda: _is_set(worker.idle))
        second = await submit(client, params={"seconds": 0})
        await wait_for_status(client, second["id"], "completed", timeout=30)
    # Once, on its first attempt: the job's lease and outcome survived the dropped connections.
    assert job["attempt"] == 1 and [h["status"] for h in job["history"]] == ["queued", "processing", "completed"]
    assert await redis.zcard(schema.RUNNING) == 0


async def _is_set(event: asyncio.Event) -> bool:
    return event.is_set()


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def test_a_run_whose_start_fails_stays_queued_for_a_retry(
    client: httpx.AsyncClient, redis_server: RedisProcess, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # A real fault, aimed at the start: the worker connects as a Redis user (ACL) that may use every
    # key but the tenant's job indexes, so arq's claim of the run succeeds and the state machine's
    # start is refused by Redis itself part-way (the record, which the call declares, is readable;
    # the index, which the script finds from the record, is not). Once it has been refused, the
    # user gets every key: arq must still hold the run and run it again. (Connection faults cannot
    # be aimed this way: arq's claim writes one round trip before the start, so a paused Redis
    # holds the claim first, and a connection killed while idle is replaced by the pool when it is
    # next checked out.)
    ticket = await submit(client, params={"seconds": 0})
    cell = schema.PREFIX  # indexes: jobcast:{c0}:jobs:<tenant>...; untagged: jobcast:cell, the old layout's
    every_key_but_the_indexes = ["arq:*", "jobcast:[^{]*", f"{cell}[^j]*", f"{cell}job:*"]
    await redis.acl_setuser(
        WORKER_USER, reset=True, enabled=True, passwords=[f"+{WORKER_PASSWORD}"], categories=["+@all"],
        channels=["*"], keys=every_key_but_the_indexes,
    )  # fmt: skip
    await redis.acl_log_reset()
    url = redis_server.url.replace("redis://", f"redis://{WORKER_USER}:{WORKER_PASSWORD}@", 1)
    try:
        async with running_worker(make_settings(url)):
            refusals = await wait_until(lambda: _acl_refusals(redis))
            await redis.acl_setuser(WORKER_USER, enabled=True, keys=["*"])
            job = await wait_for_status(client, ticket["id"], "completed", timeout=15)
    finally:
        await redis.acl_deluser(WORKER_USER)
    assert {(r["username"], r["reason"], r["context"], r["object"]) for r in refusals} == {
        (WORKER_USER, "key", "lua", schema.index_key("acme", status="queued"))  # the client is acme's
    }
    failed_starts = [r.getMessage() for r in caplog.records if "start failed" in r.getMessage()]
    assert failed_starts and all(ticket["id"] in m and "can't access" in m for m in failed_starts), failed_starts
    assert job["attempt"] == 1 and [h["status"] for h in job["history"]] == ["queued", "processing", "completed"]
    assert await redis.get(schema.QUEUED_COUNT) == "0"


WORKER_USER = "jobcast-test-worker"
WORKER_PASSWORD = "worker-password-0123456789"


async def _acl_refusals(redis: Redis) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = await redis.acl_log()
    return entries


class ReplyHolder:
    """A TCP relay in front of redis-server (a fault at the process edge): it passes everything
    through, but once a command containing ``marker`` has gone to Redis, Redis's replies on that
    connection are held back until :meth:`release`. So the command has run, and its caller has
    not read the reply yet."""

    def __init__(self, redis_port: int, marker: bytes) -> None:
        self.redis_port = redis_port
        self.marker: bytes | None = marker
        self._released = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    def release(self) -> None:
        self._released.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ReplyHolder]:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self._writers += [client_writer, redis_writer]
        hold = False

        async def to_redis() -> None:
            nonlocal hold
            while data := await client_reader.read(65536):
                if self.marker is not None and self.marker in data:
                    self.marker, hold = None, True  # before Redis can answer it
                redis_writer.write(data)
                await redis_writer.drain()

        async def to_client() -> None:
            while data := await redis_reader.read(65536):
                if hold:
                    await self._released.wait()
                client_writer.write(data)
                await client_writer.drain()

        try:
            await asyncio.gather(to_redis(), to_client())
        except (ConnectionError, OSError):
            pass
        finally:
            client_writer.close()
            redis_writer.close()


async def _in_status(store: Store, job_id: str, status: JobStatus) -> bool:
    record = await store.get(job_id)
    return record is not None and record.status is status


async def _told_to_stop(worker: JobcastWorker) -> bool:
    task = worker.main_task
    return task is not None and (task.done() or task.cancelling() > 0)


async def test_a_claim_under_way_when_the_worker_stops_hands_its_runs_back(
    redis_server: RedisProcess, redis: Redis, store: Store
) -> None:
    """Review finding 3 (fix-worker): arq stops a worker by cancelling its poll loop wherever it is
    (at once on SIGTERM when nothing runs, else past the grace period). A claim whose FCALL Redis
    had run (its runs started) but whose reply was not read yet lost those runs: they waited for
    their lease to lapse and were retried as WorkerLost, an attempt used. Now the claim's reply is
    still read and its runs are handed back."""
    claim = b"\r\n$5\r\nclaim\r\n"  # the claim op's argument, as the worker sends it
    # A long lease: the worker's own sweep, still running while it stops, must not reap the run
    # first (that is what happened without the fix: it was retried as WorkerLost, attempt 2).
    async with (
        ReplyHolder(redis_server.port, claim).running() as relay,
        running_worker(make_settings(relay.url, heartbeat_s=60.0)) as worker,
    ):
        created = await store.create(
            tenant="acme", job_type="sleep", params={"seconds": 0}, priority=Priority.NORMAL, max_attempts=3
        )
        assert created.job_id is not None
        job_id = created.job_id
        await wait_until(lambda: _in_status(store, job_id, JobStatus.PROCESSING))  # claimed; reply held
        worker.handle_sig_wait_for_completion(signal.SIGTERM)  # nothing runs: arq cancels the poll at once
        await wait_until(lambda: _told_to_stop(worker))
        relay.release()
        await wait_until(lambda: _in_status(store, job_id, JobStatus.QUEUED))
    record = await store.get(job_id)
    assert record is not None and (record.attempt, record.run, record.error) == (1, 2, None)
    events = [f["event"] for _, f in await redis.xrange(schema.job_log_key(job_id))]
    assert events == ["job.queued", "job.processing", "job.queued"]  # handed back, not retried
    assert await redis.zcard(schema.RUNNING) == 0


async def test_a_claim_that_returns_after_the_worker_stopped_taking_jobs_hands_its_runs_back(
    settings: Settings, redis: Redis, store: Store
) -> None:
    """The other half of finding 3: a claim whose reply comes once the worker no longer takes jobs
    (a stop signal, or ``halt``, while it was under way) hands its runs back instead of starting
    them: arq may cancel a run's task before it ever ran, which would leave the run to the reaper."""
    created = await store.create(
        tenant="acme", job_type="sleep", params={"seconds": 0}, priority=Priority.NORMAL, max_attempts=3
    )
    assert created.job_id is not None
    runner = Runner(store, load_registry(settings), settings)
    assert await runner.claim([schema.arq_run_id(created.job_id, 1)], 1, stopping=lambda: True) == []
    record = await store.get(created.job_id)
    assert record is not None and (record.status, record.attempt, record.run) == (JobStatus.QUEUED, 1, 2)
