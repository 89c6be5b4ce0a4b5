"""Operating Jobcast: metrics, logs, readiness, a Redis outage, scale-out; real processes throughout."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker import jobstats, schema
from jobcast.worker.settings import Settings

from .children import redis_process
from .conftest import (
    ACME,
    ServerHandle,
    WebProcess,
    WorkerProcess,
    hub_of,
    make_settings,
    running_worker,
    submit,
    wait_for_status,
    wait_until,
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_count_what_happened(client: httpx.AsyncClient, settings: Settings, redis: Redis) -> None:
    done = await submit(client, params={"seconds": 0, "steps": 1})
    retried = await submit(client, params={"seconds": 0, "steps": 1, "fail_times": 1})
    failed = await submit(client, params={"fail": True})
    async with running_worker(settings):
        for ticket, status in ((done, "completed"), (retried, "completed"), (failed, "failed")):
            await wait_for_status(client, ticket["id"], status)
    waiting = [await submit(client, params={"seconds": 1}, priority=p) for p in ("high", "low", "low")]
    cancelled = await client.post(f"/jobs/{waiting[0]['id']}/cancel")
    assert cancelled.status_code == 200
    async with client.stream("GET", "/events"):
        scraped = await client.get("/metrics")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    m = samples(scraped.text)
    sleep = (("type", "sleep"),)
    assert m[("jobcast_jobs_submitted_total", sleep)] == 6
    assert m[("jobcast_jobs_started_total", sleep)] == 4  # one retry: two starts for one job
    assert m[("jobcast_jobs_completed_total", sleep)] == 2
    assert m[("jobcast_jobs_failed_total", sleep)] == 1
    assert m[("jobcast_jobs_retried_total", sleep)] == 1
    assert m[("jobcast_jobs_cancelled_total", sleep)] == 1
    assert m[("jobcast_queue_depth", (("priority", "low"),))] == 2
    assert m[("jobcast_queue_depth", (("priority", "high"),))] == 0
    assert m[("jobcast_job_pickup_seconds_count", sleep)] == 4
    assert m[("jobcast_job_duration_seconds_count", sleep)] == 3  # terminal from processing
    assert m[("jobcast_sse_streams_open", ())] == 1
    assert m[("jobcast_workers_live", ())] == 1  # the worker above, within the last 30 s
    assert m[("jobcast_events_published_total", ())] >= 6 * 1 + 4 * 2


async def test_histogram_sums_are_seconds_whichever_version_wrote_them(
    client: httpx.AsyncClient, settings: Settings, redis: Redis
) -> None:
    """The script keeps a histogram's sum in integer milliseconds (``pickup|<type>|ms``); a Redis an
    older version wrote also holds seconds (``pickup|<type>|sum``, HINCRBYFLOAT): /metrics reports
    seconds, the two added."""
    job = await submit(client, params={"seconds": 0, "steps": 1})
    async with running_worker(settings):
        await wait_for_status(client, job["id"], "completed")
    stats = await redis.hgetall(schema.STATS)  # type: ignore[misc]
    assert "pickup|sleep|sum" not in stats and "duration|sleep|sum" not in stats
    pickup_ms, duration_ms = int(stats["pickup|sleep|ms"]), int(stats["duration|sleep|ms"])
    assert pickup_ms >= 0 and duration_ms >= 0
    m = samples((await client.get("/metrics")).text)
    sleep = (("type", "sleep"),)
    assert m[("jobcast_job_pickup_seconds_sum", sleep)] == pickup_ms / 1000
    assert m[("jobcast_job_duration_seconds_sum", sleep)] == duration_ms / 1000

    await redis.hset(schema.STATS, "pickup|sleep|sum", "2.5")  # type: ignore[misc]
    m = samples((await client.get("/metrics")).text)
    assert m[("jobcast_job_pickup_seconds_sum", sleep)] == 2.5 + pickup_ms / 1000
    assert m[("jobcast_job_pickup_seconds_count", sleep)] == 1
    assert m[("jobcast_job_duration_seconds_sum", sleep)] == duration_ms / 1000


def test_series_adds_old_seconds_to_new_milliseconds() -> None:
    stored = {
        "t|queued|processing|sleep|normal|b3": "2",
        "pickup|sleep|ms": "30",
        "pickup|sleep|sum": "0.5",  # an older version's, in seconds
        "duration|sleep|ms": "1500",
    }
    series = jobstats.series(stored)
    assert float(series["pickup|sleep|sum"]) == 0.53
    assert float(series["duration|sleep|sum"]) == 1.5
    assert series["pickup|sleep|b3"] == "2" and series["pickup|sleep|count"] == "2"
    assert not any(field.endswith("|ms") for field in series)


async def test_metrics_can_require_a_token(redis_server: RedisProcess, redis: Redis) -> None:
    handle = ServerHandle(make_settings(redis_server.url, metrics_token="scrape-me"))
    await handle.start()
    try:
        async with httpx.AsyncClient(base_url=handle.url) as c:
            assert (await c.get("/metrics")).status_code == 401
            allowed = await c.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
            assert allowed.status_code == 200 and "jobcast_queue_depth" in allowed.text
    finally:
        await handle.stop()


async def test_json_logs_carry_the_job_id_even_from_inside_the_handler(
    client: httpx.AsyncClient, settings: Settings, tmp_path: Path
) -> None:
    worker = WorkerProcess(settings, tmp_path / "worker.log", JOBCAST_LOG_FORMAT="json")
    try:
        ticket = await submit(client, "chatty")
        await wait_for_status(client, ticket["id"], "completed")
        await wait_until(lambda: _has(worker, f"job {ticket['id']} run 1: complete -> completed"))
    finally:
        worker.close()
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    assert lines, worker.output()
    hello = next(line for line in lines if line["message"] == "hello from the handler")
    assert hello["job_id"] == ticket["id"] and hello["logger"] == "tests.jobtypes" and hello["level"] == "INFO"
    about_job = [line for line in lines if ticket["id"] in line["message"]]
    assert about_job and all(line.get("job_id") == ticket["id"] for line in about_job if "run" in line["message"])


async def _has(worker: WorkerProcess, text: str) -> bool:
    return text in worker.output()


async def test_readyz_reports_workers(client: httpx.AsyncClient, settings: Settings) -> None:
    plain = await client.get("/readyz")
    assert plain.status_code == 200 and plain.json()["workers"] == 0
    strict = await client.get("/readyz", params={"require_workers": "true"})
    assert strict.status_code == 503 and "jobcast worker" in strict.json()["detail"]
    async with running_worker(settings):

        async def ready() -> bool:
            answer = await client.get("/readyz", params={"require_workers": "true"})
            return answer.status_code == 200 and answer.json() == {"status": "ready", "redis": "ok", "workers": 1}

        await wait_until(ready, timeout=5)


async def test_a_redis_outage_is_survived_and_loses_no_accepted_job(tmp_path: Path, worker_processes: Any) -> None:
    # A Redis of its own, fsync on every write, killed outright (SIGKILL) in the middle.
    private = redis_process(tmp_path / "redis", appendfsync="always")
    private.start()
    settings = make_settings(private.url)
    server = ServerHandle(settings)
    await server.start()
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=ACME, timeout=30) as c:
            accepted = [await submit(c, params={"seconds": 0.5, "steps": 1}) for _ in range(5)]
            private.kill()
            assert (await c.get("/readyz")).status_code == 503
            refused = await c.post("/jobs", json={"type": "sleep"})
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
            assert refused.headers["content-type"] == "application/problem+json"
            assert (await c.get(f"/jobs/{accepted[0]['id']}")).status_code == 503  # answered, not hung
            hub = hub_of(server)
            await wait_until(lambda: _false(hub.connected.is_set()), timeout=30)  # the hub noticed
            private.start()  # same port, same files
            await wait_until(_ready(c), timeout=20)
            for ticket in accepted:
                job = await wait_for_status(c, ticket["id"], "completed", timeout=30)
                assert job["history"][0]["status"] == "queued"
            late = await submit(c, params={"seconds": 0})
            await wait_for_status(c, late["id"], "completed", timeout=15)
    finally:
        worker.close()
        await server.stop()
        private.stop()


async def _false(value: bool) -> bool:
    return not value


def _ready(c: httpx.AsyncClient) -> Any:
    async def check() -> bool:
        return (await c.get("/readyz")).status_code == 200

    return check


async def test_two_servers_and_two_workers_share_one_redis(settings: Settings, redis: Redis, tmp_path: Path) -> None:
    a, b = WebProcess(settings, tmp_path / "a.log"), WebProcess(settings, tmp_path / "b.log")
    workers = [WorkerProcess(settings, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        # (Inside the try: a web process that does not start must not leave the workers running, to
        # take the jobs of a later test whose Redis gets the same port.)
        await asyncio.gather(asyncio.to_thread(a.wait_ready), asyncio.to_thread(b.wait_ready))
        async with (
            httpx.AsyncClient(base_url=a.url, headers=ACME, timeout=30) as ca,
            httpx.AsyncClient(base_url=b.url, headers=ACME, timeout=60) as cb,
        ):
            feed: list[dict[str, Any]] = []
            completions: set[str] = set()

            async def follow_on_b() -> None:
                async with cb.stream("GET", "/events") as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            event = orjson.loads(line[6:])
                            feed.append(event)
                            if event["status"] == "completed":
                                completions.add(event["job_id"])
                                if len(completions) == 20:
                                    return

            follower = asyncio.create_task(follow_on_b())
            await asyncio.sleep(0.2)
            tickets = [await submit(ca, params={"seconds": 0.3, "steps": 1}) for _ in range(20)]
            await asyncio.sleep(0.5)
            workers[0].signal(signal.SIGKILL)  # one worker dies mid-way; the other finishes everything
            async with asyncio.timeout(60):
                await follower
            assert completions == {t["id"] for t in tickets}
            ran_on = {j["attempt"] for j in [(await ca.get(f"/jobs/{t['id']}")).json() for t in tickets]}
            assert ran_on <= {1, 2}
    finally:
        for process in (*workers, a, b):
            process.close()
