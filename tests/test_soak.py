"""Soak: the load users bring, held (opt-in: ``pytest -m soak``), and a short run of it in the default suite.

Real processes: a ``jobcast web`` server, ONE ``jobcast worker`` and the suite's Redis.

1. **Calibrate.** ``CALIBRATION_JOBS`` no-op jobs are queued, then one worker drains them: its maximum
   job throughput is their count over the span from the first start to the last finish (the job
   records' own times, so neither process start-up nor the test's polling counts).
2. **Hold.** Jobs are submitted at half of that rate, each one's event stream opened as it is
   submitted and read until its terminal event, ``STREAMS`` streams open at once: the jobs sleep
   ``STREAMS / rate`` seconds in two steps, so as many jobs run as streams are open.

Checked every time: every job completes, every stream's events are exactly its job's log (none
lost, none repeated, in order). Checked in the soak only (a loaded test machine makes them noise
in a short run): the RSS of the web server, the worker and Redis is flat after warm-up (the last
quarter's median within ``GROWTH_LIMIT`` of the second quarter's), and the p99 event latency
(arrival at the client minus the time Redis gave the event's id) of the last minute is within
``STEADY_LIMIT`` of the first minute after warm-up. The figures are printed (``-s``) and recorded
in BENCHMARKS.md.

``JOBCAST_SOAK_SECONDS`` (default 600) and ``JOBCAST_SOAK_STREAMS`` (default 5000) set the soak's size.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from jobcast.worker import schema
from jobcast.worker.settings import Settings

from .conftest import ACME, WebProcess, WorkerProcess

GROWTH_LIMIT = 1.25
STEADY_LIMIT = 2.0
#: Below this a p99 is noise from the machine, not a trend of the server.
STEADY_FLOOR_MS = 50.0
FRAME = re.compile(rb"id: (\d+)-(\d+)\nevent: ([a-z._]+)\n")
TERMINAL = (b"job.completed", b"job.failed", b"job.cancelled")
SUBMITTING = 64


@dataclass(frozen=True)
class Size:
    seconds: float
    streams: int
    calibration_jobs: int
    checks_trends: bool


SOAK = Size(
    seconds=float(os.environ.get("JOBCAST_SOAK_SECONDS", "600")),
    streams=int(os.environ.get("JOBCAST_SOAK_STREAMS", "5000")),
    calibration_jobs=2000,
    checks_trends=True,
)
SHORT = Size(seconds=8, streams=100, calibration_jobs=200, checks_trends=False)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def flat(samples: list[int]) -> bool:
    quarter = max(1, len(samples) // 4)
    warm = statistics.median(samples[quarter : 2 * quarter])
    late = statistics.median(samples[-quarter:])
    return late <= warm * GROWTH_LIMIT


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class Stream(asyncio.Protocol):
    """One job's event stream over a raw connection (``Connection: close``): the bytes as they
    arrive, with the arrival time of each read, parsed when the server ends the response."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.buffer = bytearray()
        self.arrivals: list[tuple[int, float]] = []  # (end offset of a read, wall clock ms)
        self.done = done

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.arrivals.append((len(self.buffer), time.time() * 1000))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def frames(self) -> list[tuple[str, bytes, float]]:
        """(stream id, event, latency ms) of every event received."""
        found = []
        reads = iter(self.arrivals)
        end, at = next(reads, (0, 0.0))
        for match in FRAME.finditer(self.buffer):
            while match.end() > end:
                end, at = next(reads)
            ms, seq = int(match[1]), int(match[2])
            found.append((f"{ms}-{seq}", match[3], at - ms))
        return found


@dataclass
class Figures:
    max_jobs_per_s: float = 0.0
    rate: float = 0.0
    achieved: float = 0.0
    jobs: int = 0
    streams_checked: int = 0
    open: int = 0
    open_peak: int = 0
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (arrival ms, latency ms)
    memory: dict[str, list[int]] = field(default_factory=dict)


async def follow(host: str, port: int, job_id: str, figures: Figures) -> Stream:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    transport, stream = await loop.create_connection(lambda: Stream(done), host, port)
    request = (
        f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: {ACME['Authorization']}\r\n"
        "Connection: close\r\n\r\n"
    )
    transport.write(request.encode())
    figures.open += 1
    figures.open_peak = max(figures.open_peak, figures.open)
    try:
        await done
    finally:
        figures.open -= 1
    return stream


async def calibrate(c: httpx.AsyncClient, settings: Settings, tmp_path: Path, count: int) -> float:
    """One worker's maximum throughput of no-op jobs, queued ahead of it."""
    sem = asyncio.Semaphore(20)

    async def one() -> str:
        async with sem:
            response = await c.post("/jobs", json={"type": "sleep", "params": {"seconds": 0, "steps": 1}})
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    ids = await asyncio.gather(*(one() for _ in range(count)))
    worker = WorkerProcess(settings, tmp_path / "calibration-worker.log", JOBCAST_LOG_LEVEL="WARNING")
    try:
        jobs = [await wait_completed(c, job_id, timeout=300) for job_id in ids]
    finally:
        worker.close()
    first = min(datetime.fromisoformat(j["started_at"]) for j in jobs)
    last = max(datetime.fromisoformat(j["finished_at"]) for j in jobs)
    return count / max((last - first).total_seconds(), 1e-3)


async def wait_completed(c: httpx.AsyncClient, job_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = (await c.get(f"/jobs/{job_id}", params={"wait": "10"})).json()
        if job["status"] == "completed":
            return job
        assert job["status"] in ("queued", "processing"), job
        assert time.monotonic() < deadline, f"job {job_id} not completed within {timeout}s: {job}"


async def hold(size: Size, settings: Settings, redis: Redis, tmp_path: Path) -> Figures:
    figures = Figures()
    # The caps are far above the streams meant to be open at once: when the worker runs slower than
    # calibrated (a loaded machine), jobs last longer and more of their streams overlap, and a 503 at
    # the cap is not what the soak checks (every event of every stream, once).
    web = WebProcess(settings, tmp_path / "web.log", JOBCAST_LOG_LEVEL="WARNING",
                     JOBCAST_SSE_MAX_STREAMS=str(size.streams * 10),
                     JOBCAST_SSE_MAX_STREAMS_PER_TENANT=str(size.streams * 10))  # fmt: skip
    worker: WorkerProcess | None = None
    try:
        await asyncio.to_thread(web.wait_ready)
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=web.url, headers=ACME, timeout=60, limits=limits) as c:
            figures.max_jobs_per_s = await calibrate(c, settings, tmp_path, size.calibration_jobs)
            figures.rate = figures.max_jobs_per_s / 2
            job_s = size.streams / figures.rate
            worker = WorkerProcess(settings, tmp_path / "worker.log", JOBCAST_LOG_LEVEL="WARNING",
                                   JOBCAST_WORKER_CONCURRENCY=str(size.streams * 2))  # fmt: skip
            pids = {"web": web.process.pid, "worker": worker.process.pid}
            figures.memory = {name: [] for name in pids}
            streams: dict[str, asyncio.Task[Stream]] = {}
            submitting: set[asyncio.Task[None]] = set()

            async def submit_and_follow() -> None:
                # Retried with the same Idempotency-Key when the connection drops mid-request (a
                # keep-alive connection the server closed as the client reused it): one job either way.
                key = {"Idempotency-Key": uuid.uuid4().hex}
                body = {"type": "sleep", "params": {"seconds": job_s, "steps": 2}}
                for attempt in range(3):
                    try:
                        response = await c.post("/jobs", json=body, headers=key)
                        break
                    except httpx.TransportError:
                        if attempt == 2:
                            raise
                assert response.status_code in (200, 202), response.text
                job_id = response.json()["id"]
                streams[job_id] = asyncio.create_task(follow("127.0.0.1", web.port, job_id, figures))

            started = time.monotonic()
            next_sample = started
            while (elapsed := time.monotonic() - started) < size.seconds:
                # At most SUBMITTING requests in flight: a client that queues thousands of requests on
                # its pool spends its time in the pool, not on the wire. Behind schedule, it catches up.
                due = min(int(elapsed * figures.rate) - figures.jobs, SUBMITTING - len(submitting))
                for _ in range(max(0, due)):
                    task = asyncio.create_task(submit_and_follow())
                    submitting.add(task)
                    task.add_done_callback(submitting.discard)
                    figures.jobs += 1
                if time.monotonic() >= next_sample:
                    for name, pid in pids.items():
                        figures.memory[name].append(rss_kib(pid))
                    next_sample += 5
                await asyncio.sleep(0.01)
            figures.achieved = figures.jobs / (time.monotonic() - started)
            async with asyncio.timeout(job_s * 3 + 120):
                while submitting:
                    await asyncio.gather(*submitting)
                await asyncio.gather(*streams.values())
            for job_id, task in streams.items():
                frames = task.result().frames()
                entries = await redis.xrange(schema.job_log_key(job_id))
                stream = task.result()
                assert [sid for sid, *_ in frames] == [sid for sid, _ in entries], (job_id, bytes(stream.buffer[:400]))
                assert frames[-1][1] in TERMINAL
                figures.latencies.extend((latency + (int(sid.split("-")[0])), latency) for sid, _, latency in frames)
                figures.streams_checked += 1
            statuses = [(await c.get(f"/jobs/{j}")).json()["status"] for j in list(streams)[-50:]]
            assert set(statuses) == {"completed"}, statuses
    finally:
        if worker is not None:
            worker.close()
        web.close()
    assert figures.streams_checked == figures.jobs > 0
    return figures


def report(size: Size, figures: Figures) -> dict[str, float]:
    """Latency p99 per minute (from the first minute after warm-up), printed with the rest."""
    start = min(at for at, _ in figures.latencies)
    minutes: dict[int, list[float]] = {}
    for at, latency in figures.latencies:
        minutes.setdefault(int((at - start) // 60_000), []).append(latency)
    per_minute = {m: p99(values) for m, values in sorted(minutes.items()) if len(values) >= 100}
    print(
        f"\nsoak {size.seconds:.0f}s: one worker's max {figures.max_jobs_per_s:.0f} jobs/s, held "
        f"{figures.rate:.0f} jobs/s (achieved {figures.achieved:.0f}), {figures.jobs} jobs, "
        f"{figures.open_peak} streams open at peak, "
        f"{figures.streams_checked} streams checked; p99 latency per minute (ms): "
        + ", ".join(f"{m}: {v:.0f}" for m, v in per_minute.items())
        + "; RSS MiB (first, last): "
        + ", ".join(f"{n}: {s[0] // 1024}, {s[-1] // 1024}" for n, s in figures.memory.items() if s)
    )
    return {str(m): v for m, v in per_minute.items()}


def check_trends(figures: Figures, per_minute: dict[str, float]) -> None:
    for name, samples in figures.memory.items():
        assert flat(samples), f"{name} memory grew: {samples}"
    minutes = list(per_minute.values())
    assert len(minutes) >= 3, per_minute
    first, last = minutes[1], minutes[-1]  # minute 0 is the warm-up
    assert last <= max(first * STEADY_LIMIT, STEADY_FLOOR_MS), f"p99 latency grew: {per_minute}"


@pytest.mark.soak
@pytest.mark.timeout(SOAK.seconds + 1200)
async def test_soak(settings: Settings, redis: Redis, tmp_path: Path) -> None:
    figures = await hold(SOAK, settings, redis, tmp_path)
    check_trends(figures, report(SOAK, figures))
    assert figures.achieved >= figures.rate * 0.9, "the test client could not submit at the target rate"


async def test_a_short_soak_loses_and_repeats_nothing(settings: Settings, redis: Redis, tmp_path: Path) -> None:
    figures = await hold(SHORT, settings, redis, tmp_path)
    report(SHORT, figures)
    assert figures.open_peak > 0
