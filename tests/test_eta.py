"""progress.eta: the estimator on a given clock, and the estimate on the wire (record, events, resource)."""

from __future__ import annotations

from datetime import datetime

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from jobcast.worker import schema
from jobcast.worker.context import JobContext
from jobcast.worker.eta import Estimator
from jobcast.worker.models import JobStatus, Priority, transport_percent
from jobcast.worker.store import Store

from .conftest import submit, wait_for_status


def feed(estimator: Estimator, reports: list[tuple[float, float]]) -> float | None:
    for at, percent in reports:
        estimator.observe(percent, at)
    return estimator.remaining_s()


def test_no_estimate_until_two_segments_after_the_first_report() -> None:
    estimator = Estimator()
    assert feed(estimator, [(0.0, 10.0)]) is None
    assert feed(estimator, [(1.0, 20.0)]) is None
    assert feed(estimator, [(2.0, 30.0)]) == pytest.approx(7.0)


def test_steady_progress_gives_the_exact_time_left() -> None:
    remaining = feed(Estimator(), [(float(i), float(i)) for i in range(1, 41)])
    assert remaining == pytest.approx(60.0)


def test_a_long_first_step_is_not_counted() -> None:
    # 60 s of setup before the first report, then 1 point per second.
    remaining = feed(Estimator(), [(60.0 + i, float(i)) for i in range(1, 51)])
    assert remaining == pytest.approx(50.0)


def test_a_pause_raises_the_estimate_by_a_bounded_factor() -> None:
    steady = [(float(i), float(i)) for i in range(1, 51)]
    # Then 100 s without progress, and one more point.
    remaining = feed(Estimator(), [*steady, (150.0, 51.0)])
    assert remaining is not None
    assert 49.0 < remaining < 2 * 49.0


def test_a_lasting_slowdown_is_followed() -> None:
    slow_then = [(float(i), float(i)) for i in range(1, 41)] + [(40.0 + 4 * i, 40.0 + i) for i in range(1, 41)]
    remaining = feed(Estimator(), slow_then)
    assert remaining == pytest.approx(4 * 20.0, rel=0.1)


def test_tiny_reports_are_gathered_into_segments() -> None:
    # A tight loop: 0.01 point per report, 0.01 s each.
    remaining = feed(Estimator(), [(i / 100, i / 100) for i in range(1, 3001)])
    assert remaining == pytest.approx(70.0)


@pytest.mark.parametrize(
    ("percent", "sent"),
    [(4.166666666666667, 4.17), (99.996, 99.99), (99.999999, 99.99), (100, 100.0), (0, 0.0), (33.333, 33.33)],
)
def test_percents_travel_rounded_and_never_reach_100_early(percent: float, sent: float) -> None:
    assert transport_percent(percent) == sent


async def job_log(redis: Redis, job_id: str) -> list[tuple[str, dict[str, object]]]:
    return [(f["event"], orjson.loads(f["data"])) for _, f in await redis.xrange(schema.job_log_key(job_id))]


async def test_a_running_job_carries_its_eta_in_record_and_events_until_it_ends(store: Store, redis: Redis) -> None:
    created = await store.create(tenant="acme", job_type="sleep", params={}, priority=Priority.NORMAL, max_attempts=1)
    job_id = created.job_id
    assert job_id is not None
    started = await store.start(job_id, 1, 10**15)
    assert started is not None
    ctx = JobContext(job_id=job_id, job_type="sleep", attempt=1, max_attempts=1, run=1, store=store, interval_s=0.0)
    for step in range(1, 8):
        ctx.progress(100 * step / 12, step="counting")
        await ctx.drain()
    events = await job_log(redis, job_id)
    progress = [data["progress"] for name, data in events if name == "job.progress"]
    assert [p["percent"] for p in progress] == [transport_percent(100 * s / 12) for s in range(1, 8)]
    assert [p["eta"] is None for p in progress] == [True, True] + [False] * 5
    last = progress[-1]
    assert isinstance(last["eta"], str)
    at = next(data["at"] for name, data in reversed(events) if name == "job.progress")
    assert isinstance(at, str)
    assert datetime.fromisoformat(last["eta"]) > datetime.fromisoformat(at)
    record = await store.get(job_id)
    assert record is not None and record.progress == last

    await store.complete(job_id, 1, "{}")
    events = await job_log(redis, job_id)
    assert events[-1][0] == "job.completed"
    assert events[-1][1]["progress"] == {"percent": 100.0, "eta": None, "step": "counting"}
    record = await store.get(job_id)
    assert record is not None and record.progress["eta"] is None


async def test_a_queued_job_has_a_null_eta_in_the_resource_and_its_events(
    client: httpx.AsyncClient, redis: Redis
) -> None:
    job = await submit(client, "sleep", params={"seconds": 0})
    assert job["progress"] == {"percent": 0.0, "eta": None}
    events = await job_log(redis, job["id"])
    assert events[0][1]["progress"] == {"percent": 0.0, "eta": None}


async def test_a_job_run_by_a_worker_ends_with_a_null_eta(client: httpx.AsyncClient, worker: object) -> None:
    job = await submit(client, "report", params={"rows": 300_000})
    done = await wait_for_status(client, job["id"], JobStatus.COMPLETED)
    assert done["progress"]["percent"] == 100.0
    assert done["progress"]["eta"] is None


async def test_the_openapi_document_describes_progress_eta(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["Progress"]
    assert "eta" in schema["properties"]
    assert "RFC 3339" in schema["properties"]["eta"]["description"]
