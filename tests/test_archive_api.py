"""Archived jobs over HTTP, against a real server and a real worker whose archiver moves every
finished job at once (``JOBCAST_ARCHIVE_AFTER_S=0``): the API reads one history across the tiers."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser
from redis.asyncio import Redis

from jobcast.worker import schema
from jobcast.worker.archive import Archive
from jobcast.worker.archiver import Archiver
from jobcast.worker.main import JobcastWorker
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store

from .conftest import GLOBEX, ServerHandle, make_settings, running_worker, submit, wait_for_status, wait_until
from .receiver import Receiver
from .sqldb import archive_url
from .test_dashboard import CHROMIUM, open_dashboard

# The browser fixture, used by name.
from .test_dashboard import browser as browser

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path, redis_server: Any) -> Iterator[Settings]:
    with archive_url(request.param, tmp_path) as url:
        yield make_settings(redis_server.url, archive_url=url, archive_after_s=0, webhook_allow_private=True)


@pytest.fixture
async def archive(settings: Settings) -> AsyncIterator[Archive]:
    archive = Archive(settings.archive_url)
    await archive.migrate()  # as `jobcast migrate` does (SQLite would migrate itself)
    yield archive
    await archive.close()


@pytest.fixture
async def server(settings: Settings, redis: Redis, archive: Archive) -> AsyncIterator[ServerHandle]:
    handle = ServerHandle(settings)
    await handle.start()
    yield handle
    await handle.stop()


@pytest.fixture
async def worker(settings: Settings, redis: Redis, archive: Archive) -> AsyncIterator[JobcastWorker]:
    async with running_worker(settings) as w:
        yield w


async def archived(redis: Redis, archive: Archive, job_id: str) -> None:
    """Wait until the worker's archiver has moved the job (copied, then evicted)."""

    async def moved() -> bool:
        return not await redis.exists(schema.job_key(job_id)) and await archive.get(job_id) is not None

    await wait_until(moved, timeout=20)


def sse_events(body: str) -> list[tuple[str, str]]:
    """(id, event) of each event of an SSE body."""
    found = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            found.append((fields["id"], fields["event"]))
    return found


async def test_an_archived_job_reads_as_it_did_live(
    client: httpx.AsyncClient, worker: JobcastWorker, redis: Redis, archive: Archive
) -> None:
    ticket = await submit(client, "report", params={"rows": 200, "seed": 3})
    live = await wait_for_status(client, ticket["id"], "completed")
    await archived(redis, archive, ticket["id"])

    job = await client.get(f"/jobs/{ticket['id']}")
    assert job.status_code == 200
    assert job.json() == live
    # A job token reads it too, and ?wait= returns at once (it is finished).
    as_job = await client.get(
        f"/jobs/{ticket['id']}", params={"wait": 30}, headers={"Authorization": f"Bearer {ticket['token']}"}
    )
    assert as_job.status_code == 200 and as_job.json()["status"] == "completed"

    result = await client.get(f"/jobs/{ticket['id']}/result")
    assert result.status_code == 200 and result.json() == live["result"]
    as_csv = await client.get(f"/jobs/{ticket['id']}/result", headers={"Accept": "text/csv"})
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(as_csv.text)))
    assert rows[-1][0] == "TOTAL" and int(rows[-1][2]) == 200

    events = await client.get(f"/jobs/{ticket['id']}/events")
    assert events.status_code == 200
    replayed = sse_events(events.text)
    assert replayed[0][1] == "job.queued"
    assert replayed[-1][1] == "job.completed"
    middle_id = replayed[1][0]
    resumed = await client.get(f"/jobs/{ticket['id']}/events", headers={"Last-Event-ID": middle_id})
    assert sse_events(resumed.text) == replayed[2:]
    after_end = await client.get(f"/jobs/{ticket['id']}/events", headers={"Last-Event-ID": replayed[-1][0]})
    assert after_end.status_code == 204

    cancel = await client.post(f"/jobs/{ticket['id']}/cancel")
    assert cancel.status_code == 409 and cancel.json()["job_status"] == "completed"


async def test_another_tenant_gets_404_for_an_archived_job(
    client: httpx.AsyncClient, server: ServerHandle, worker: JobcastWorker, redis: Redis, archive: Archive
) -> None:
    ticket = await submit(client, params={"seconds": 0, "steps": 1})
    await wait_for_status(client, ticket["id"], "completed")
    await archived(redis, archive, ticket["id"])
    async with httpx.AsyncClient(base_url=server.url, headers=GLOBEX, timeout=30) as globex:
        for path in ("", "/result", "/events", "/deliveries"):
            assert (await globex.get(f"/jobs/{ticket['id']}{path}")).status_code == 404, path
        listing = await globex.get("/jobs")
        assert listing.status_code == 200 and listing.json()["items"] == []
        assert (await globex.post(f"/jobs/{ticket['id']}/cancel")).status_code == 404


async def test_deliveries_of_an_archived_job_are_kept(
    client: httpx.AsyncClient, worker: JobcastWorker, redis: Redis, archive: Archive
) -> None:
    receiver = await Receiver().start()
    try:
        ticket = await submit(client, params={"seconds": 0, "steps": 1}, webhook={"url": receiver.url})
        await wait_for_status(client, ticket["id"], "completed")
        await receiver.wait_for(1)
        await archived(redis, archive, ticket["id"])  # only once its delivery is settled
    finally:
        await receiver.stop()
    response = await client.get(f"/jobs/{ticket['id']}/deliveries")
    assert response.status_code == 200
    (delivery,) = response.json()["items"]
    assert delivery["status"] == "delivered" and delivery["event"] == "job.completed"
    assert [a["status_code"] for a in delivery["attempts"]] == [200]


async def test_listing_filters_by_creation_time_and_text_across_tiers(
    client: httpx.AsyncClient, worker: JobcastWorker, redis: Redis, archive: Archive
) -> None:
    old = await submit(client, params={"seconds": 0, "steps": 1})
    await wait_for_status(client, old["id"], "completed")
    await archived(redis, archive, old["id"])
    old_job = (await client.get(f"/jobs/{old['id']}")).json()
    new = await submit(client, "report", params={"rows": 10, "seed": 99})
    await wait_for_status(client, new["id"], "completed")
    new_job = (await client.get(f"/jobs/{new['id']}")).json()

    async def ids(**params: Any) -> list[str]:
        response = await client.get("/jobs", params=params)
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert await ids() == [new["id"], old["id"]]
    assert await ids(q="REPORT") == [new["id"]]
    assert await ids(q='"steps":1') == [old["id"]]
    assert await ids(created_after=new_job["created_at"]) == [new["id"]]
    assert await ids(created_before=new_job["created_at"]) == [old["id"]]
    assert await ids(created_after=old_job["created_at"], created_before="2999-01-01T00:00:00+00:00") == [
        new["id"],
        old["id"],
    ]
    assert await ids(status="completed", type="sleep") == [old["id"]]
    page = (await client.get("/jobs", params={"limit": 1})).json()
    assert [i["id"] for i in page["items"]] == [new["id"]]
    rest = (await client.get("/jobs", params={"limit": 1, "cursor": page["next_cursor"]})).json()
    assert [i["id"] for i in rest["items"]] == [old["id"]]


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_before": "2026-12-02T10:00:00"}, "offset"),
        ({"q": "ab"}, "3 to 200"),
        ({"q": "x" * 201}, "3 to 200"),
        ({"q": "nul\x00here"}, "NUL excluded"),
    ],
)
async def test_bad_listing_filters_are_400_saying_what_to_send(
    client: httpx.AsyncClient, params: dict[str, str], words: str
) -> None:
    response = await client.get("/jobs", params=params)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")
    assert words in response.json()["detail"]


async def test_the_cli_lists_and_opens_archived_jobs(
    server: ServerHandle, client: httpx.AsyncClient, worker: JobcastWorker, redis: Redis, archive: Archive
) -> None:
    from .test_commands import jobcast

    ticket = await submit(client, params={"seconds": 0, "steps": 1, "fail_times": 0})
    await wait_for_status(client, ticket["id"], "completed")
    await archived(redis, archive, ticket["id"])
    listing = (await jobcast(server.url, "list", "--search", "fail_times", "--json")).json()
    assert [j["id"] for j in listing["items"]] == [ticket["id"]]
    assert (await jobcast(server.url, "list", "--search", "absent", "--json")).json()["items"] == []
    status = (await jobcast(server.url, "status", ticket["id"], "--json")).json()
    assert status["status"] == "completed" and status["result"] == {"slept": 0}
    events = (await jobcast(server.url, "tail", ticket["id"], "--json")).json_lines()
    assert [e["event"] for e in events] == ["job.queued", "job.processing", "job.progress", "job.completed"]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="the dashboard tests drive Debian's Chromium at /usr/bin/chromium")
async def test_the_dashboard_pages_past_redis_searches_and_opens_archived_jobs(
    browser: Browser,
    server: ServerHandle,
    client: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    archive: Archive,
) -> None:
    from playwright.async_api import expect

    from .test_archive import finished_job

    store = Store(redis, settings, archive)
    tags = ["needle-4" if i == 4 else "hay" for i in range(27)]
    old = [await finished_job(store, params={"seconds": 0, "tag": tag}) for tag in tags]
    archiver = Archiver(redis, settings, archive)
    while await archiver.move_once():
        pass
    assert not await redis.exists(*(schema.job_key(job_id) for job_id in old))
    live = [(await submit(client, params={"seconds": 5}))["id"] for _ in range(2)]  # no worker: they stay queued

    dashboard = await open_dashboard(browser, server.url)
    page = dashboard.page
    rows = page.locator("#jobs-body tr")
    await expect(rows).to_have_count(25)
    await page.get_by_role("button", name="Load older jobs").click()
    await expect(rows).to_have_count(29)
    assert [await r.get_attribute("data-job-id") for r in await rows.all()] == [*live[::-1], *old[::-1]]

    await page.get_by_label("Search type and parameters").fill("NEEDLE")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-job-id", old[4])
    await dashboard.row(old[4]).get_by_role("link").click()
    await expect(page).to_have_url(re.compile(f"#/jobs/{old[4]}$"))
    await expect(page.locator(".timeline-item")).to_have_count(3)
    await expect(page.locator(".outcome")).to_contain_text('"ok": true')
    dashboard.check_clean()


async def test_metrics_show_the_archive_backlog(
    client: httpx.AsyncClient, redis: Redis, settings: Settings, archive: Archive
) -> None:
    from .test_archive import finished_job

    store = Store(redis, settings, archive)
    await finished_job(store)
    await finished_job(store)

    async def gauge(name: str) -> float:
        text = (await client.get("/metrics")).text
        (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
        return float(line.split()[1])

    assert await gauge("jobcast_archive_backlog") == 2.0  # no worker runs here: nothing archives them
    assert await gauge("jobcast_finished_in_redis") == 2.0
    await Archiver(redis, settings, archive).move_once()
    assert await gauge("jobcast_archive_backlog") == 0.0
    assert await gauge("jobcast_finished_in_redis") == 0.0


async def test_two_worker_processes_archive_side_by_side_and_lose_nothing(
    client: httpx.AsyncClient, worker_processes: Any, redis: Redis, archive: Archive
) -> None:
    worker_processes()
    worker_processes()
    tickets = [await submit(client, params={"seconds": 0, "steps": 1}) for _ in range(30)]

    async def all_archived() -> bool:
        return await archive.count() == 30 and await redis.zcard(schema.FINISHED) == 0

    await wait_until(all_archived, timeout=60, interval=0.2)
    for ticket in tickets:
        assert not await redis.exists(schema.job_key(ticket["id"]), schema.job_log_key(ticket["id"]))
        events = await client.get(f"/jobs/{ticket['id']}/events")
        assert [name for _, name in sse_events(events.text)] == [
            "job.queued",
            "job.processing",
            "job.progress",
            "job.completed",
        ]
    listing = (await client.get("/jobs", params={"limit": 200})).json()
    assert [item["id"] for item in listing["items"]] == [t["id"] for t in reversed(tickets)]
