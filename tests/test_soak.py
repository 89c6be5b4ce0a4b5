"""Soak: steady submissions with hundreds of open streams, for minutes (opt-in: ``pytest -m soak``).

Real processes: a ``jobcast web`` server, two ``jobcast worker`` processes and the suite's Redis.
Every job's stream is checked against the job's event log (no lost or repeated event), every job
must complete, and the resident memory of the server and the workers, sampled along the way,
must stay flat: the last quarter's median within ``GROWTH_LIMIT`` of the second quarter's.
``JOBCAST_SOAK_SECONDS`` sets the length (default 600).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

import httpx
import orjson
import pytest
from httpx_sse import aconnect_sse
from redis.asyncio import Redis

from jobcast.worker import schema
from jobcast.worker.settings import Settings

from .conftest import ACME, WebProcess, WorkerProcess, submit, wait_for_status

DURATION_S = float(os.environ.get("JOBCAST_SOAK_SECONDS", "600"))
SUBMIT_EVERY_S = 0.05  # ~20 jobs a second
STREAMS = 300
GROWTH_LIMIT = 1.25


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


@pytest.mark.soak
@pytest.mark.timeout(DURATION_S + 300)
async def test_soak(settings: Settings, redis: Redis, tmp_path: Path) -> None:
    web = WebProcess(settings, tmp_path / "web.log", JOBCAST_LOG_LEVEL="WARNING")
    workers = [WorkerProcess(settings, tmp_path / f"w{i}.log", JOBCAST_LOG_LEVEL="WARNING") for i in range(2)]
    url = web.url
    memory: dict[str, list[int]] = {"web": [], "worker-0": [], "worker-1": []}
    checked = opened = 0
    try:
        async with httpx.AsyncClient(base_url=url, headers=ACME, timeout=60,
                                     limits=httpx.Limits(max_connections=STREAMS + 50)) as c:  # fmt: skip
            async with asyncio.timeout(30):
                while True:
                    try:
                        if (await c.get("/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.1)

            streams: set[asyncio.Task[tuple[str, list[str]]]] = set()
            results: list[tuple[str, list[str]]] = []

            async def follow(job_id: str) -> tuple[str, list[str]]:
                seen: list[str] = []
                async with aconnect_sse(c, "GET", f"/jobs/{job_id}/events", headers={}) as source:
                    async for sse in source.aiter_sse():
                        if sse.data:
                            seen.append(sse.id)
                return job_id, seen

            deadline = time.monotonic() + DURATION_S
            next_sample = time.monotonic()
            submitted: list[str] = []
            while time.monotonic() < deadline:
                ticket = await submit(c, params={"seconds": 0.5, "steps": 5})
                submitted.append(ticket["id"])
                if len(streams) < STREAMS:
                    opened += 1
                    task = asyncio.create_task(follow(ticket["id"]))
                    streams.add(task)
                    task.add_done_callback(lambda t: (streams.discard(t), results.append(t.result())))
                if time.monotonic() >= next_sample:
                    memory["web"].append(rss_kib(web.process.pid))
                    for i, w in enumerate(workers):
                        memory[f"worker-{i}"].append(rss_kib(w.process.pid))
                    next_sample += 5
                await asyncio.sleep(SUBMIT_EVERY_S)
            for job_id in submitted[-50:]:
                await wait_for_status(c, job_id, "completed", timeout=120)
            async with asyncio.timeout(120):
                while streams:
                    await asyncio.sleep(0.2)
            for job_id, seen in results:
                entries = await redis.xrange(schema.job_log_key(job_id))
                assert seen == [sid for sid, _ in entries], f"stream of {job_id} differs from its log"
                checked += 1
            lost = [j for j in submitted if orjson.loads((await c.get(f"/jobs/{j}")).content)["status"] != "completed"]
            assert not lost, f"{len(lost)} jobs not completed"
    finally:
        for w in workers:
            w.close()
        web.close()
    assert checked == opened >= STREAMS  # hundreds open at any time, every one checked
    for name, samples in memory.items():
        assert flat(samples), f"{name} memory grew: {samples}"
