"""The dashboard (static/) in a real headless Chromium, against a live server and worker.

Chromium is Debian's (/usr/bin/chromium), driven by Playwright; Playwright never downloads a
browser of its own. Without /usr/bin/chromium these tests are skipped, saying so.

The screenshot in the README is taken here: set JOBCAST_UPDATE_SCREENSHOT=1 to write it to
docs/dashboard.png (otherwise it goes to the test's temporary folder, so that a test run does not
change the working tree).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, ConsoleMessage, Locator, Page, async_playwright, expect
from redis.asyncio import Redis

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker.main import JobcastWorker
from jobcast.worker.models import Priority
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store

from .conftest import ACME, ROOT, ServerHandle, make_settings, running_worker, submit, wait_for_status
from .restartable import RestartableServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = ROOT / "docs" / "dashboard.png"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="the dashboard tests drive Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium",
)

# Records every value each job's progress bar shows, to check it only ever moves forward.
WATCH_PROGRESS = """
() => {
  window.__progress = {};
  window.__signedInWithoutReload = true;
  new MutationObserver((mutations) => {
    for (const m of mutations) {
      const row = m.target.closest && m.target.closest("tr[data-job-id]");
      if (!row || m.attributeName !== "aria-valuenow") continue;
      (window.__progress[row.dataset.jobId] ??= []).push(Number(m.target.getAttribute("aria-valuenow")));
    }
  }).observe(document.getElementById("jobs-body"), { attributes: true, subtree: true });
}
"""


@dataclass
class Dashboard:
    page: Page
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def paths(self, pattern: str) -> list[str]:
        return [url for url in self.requests if re.search(pattern, url)]

    def row(self, job_id: str) -> Locator:
        return self.page.locator(f'#jobs-body tr[data-job-id="{job_id}"]')

    async def progress_seen(self, job_id: str) -> list[int]:
        values: list[int] = await self.page.evaluate(f"window.__progress[{job_id!r}] ?? []")
        return values

    async def wait_for_progress(self, job_id: str, at_least: int, timeout: float = 15.0) -> None:
        """Until the job's bar shows ``at_least`` percent (checked on every frame, not by polling)."""
        await self.page.wait_for_function(
            """([id, least]) => {
                const bar = document.querySelector(`tr[data-job-id="${id}"] [role=progressbar]`);
                return bar !== null && Number(bar.getAttribute("aria-valuenow")) >= least;
            }""",
            arg=[job_id, at_least],
            timeout=timeout * 1000,
        )

    async def not_reloaded(self) -> bool:
        return bool(await self.page.evaluate("window.__signedInWithoutReload === true"))

    async def submit_sleep(self, seconds: float, steps: int) -> str:
        """Submit a sleep job with the form; the id of the job it added on top of the table."""
        page = self.page
        await page.get_by_label("Job type").select_option("sleep")
        await page.get_by_label("Seconds").fill(str(seconds))
        await page.get_by_label("Steps").fill(str(steps))
        before = await page.locator("#jobs-body tr").count()
        await page.get_by_role("button", name="Submit job").click()
        await expect(page.locator("#jobs-body tr")).to_have_count(before + 1)
        job_id = await page.locator("#jobs-body tr").first.get_attribute("data-job-id")
        assert job_id is not None
        return job_id

    def check_clean(self) -> None:
        """No script error, and one event stream for the whole page (never one per job)."""
        assert self.errors == []
        assert self.paths(r"/jobs/[^/?]+/events") == []


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


async def open_dashboard(
    browser: Browser, url: str, *, key: str = "key-acme", width: int = 1280, height: int = 820
) -> Dashboard:
    context = await browser.new_context(base_url=url, viewport={"width": width, "height": height})
    page = await context.new_page()
    dashboard = Dashboard(page)

    def on_console(message: ConsoleMessage) -> None:
        # Answers the dashboard handles (422, 404 for deliveries, refused reconnects) are logged
        # by the browser as failed loads; anything else is a bug.
        if message.type == "error" and "Failed to load resource" not in message.text:
            dashboard.errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: dashboard.errors.append(str(error)))
    page.on("request", lambda request: dashboard.requests.append(request.url))
    await page.goto("/")
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    await expect(page.locator("#connection")).to_have_text("Live")
    await page.evaluate(WATCH_PROGRESS)
    return dashboard


def nondecreasing(values: list[int]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(values))


async def test_a_submitted_job_moves_to_100_percent_and_completed_without_a_reload(
    browser: Browser, server: ServerHandle, worker: JobcastWorker
) -> None:
    dashboard = await open_dashboard(browser, server.url)
    job_id = await dashboard.submit_sleep(seconds=1.5, steps=5)
    row = dashboard.row(job_id)
    await expect(row.locator(".badge")).to_have_text("completed", timeout=15_000)
    bar = row.get_by_role("progressbar")
    await expect(bar).to_have_attribute("aria-valuenow", "100")
    assert await bar.get_attribute("aria-valuemin") == "0"
    assert await bar.get_attribute("aria-valuemax") == "100"
    assert job_id in (await bar.get_attribute("aria-label") or "")
    await expect(row.locator(".step")).to_have_text("step 5 of 5")
    await expect(row.locator(".col-duration")).to_have_text(re.compile(r"^1\.\d s$"))
    seen = await dashboard.progress_seen(job_id)
    assert nondecreasing(seen) and seen[-1] == 100
    assert len({20, 40, 60, 80} & set(seen)) >= 3, seen  # it moved live, not in one jump
    assert await dashboard.not_reloaded()
    assert len(dashboard.paths(r"/events\?token=")) == 1
    dashboard.check_clean()


async def test_the_detail_view_shows_timeline_result_and_an_empty_deliveries_panel(
    browser: Browser, server: ServerHandle, client: httpx.AsyncClient, worker: JobcastWorker
) -> None:
    job = await submit(client, params={"seconds": 0.2, "steps": 2, "fail_times": 1})
    await wait_for_status(client, job["id"], "completed")
    dashboard = await open_dashboard(browser, server.url)
    page = dashboard.page
    # Keyboard: the job's link is a tab stop; Enter opens the job.
    link = dashboard.row(job["id"]).get_by_role("link")
    await link.focus()
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(re.compile(f"#/jobs/{job['id']}$"))
    await expect(page.get_by_role("heading", level=1)).to_contain_text("sleep")
    timeline = page.locator(".timeline-item")
    statuses = ["queued", "processing", "queued", "processing", "completed"]
    await expect(timeline).to_have_count(len(statuses))
    for index, status in enumerate(statuses):
        await expect(timeline.nth(index).locator(".badge")).to_have_text(status)
        await expect(timeline.nth(index).locator("time")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d\.\d{3}$"))
    outcome = page.locator(".outcome")
    await expect(outcome).to_contain_text('"slept": 0.2')
    await expect(page.locator(".deliveries")).to_contain_text("No webhook deliveries for this job.")
    await expect(page.get_by_role("button", name="Cancel job")).to_be_hidden()
    await page.get_by_role("link", name="← All jobs").click()
    await expect(dashboard.row(job["id"])).to_be_visible()
    dashboard.check_clean()


async def test_a_failed_report_shows_its_error_and_a_completed_one_downloads_csv(
    browser: Browser, server: ServerHandle, client: httpx.AsyncClient, worker: JobcastWorker
) -> None:
    failed = await submit(client, params={"fail": True})
    report = await submit(client, "report", params={"rows": 20_000, "seed": 3})
    await wait_for_status(client, failed["id"], "failed")
    await wait_for_status(client, report["id"], "completed")
    dashboard = await open_dashboard(browser, server.url)
    page = dashboard.page
    await page.goto(f"/#/jobs/{failed['id']}")
    error = page.locator(".outcome")
    await expect(error.get_by_role("heading")).to_have_text("Error")
    await expect(error).to_contain_text("PermanentError: failed on purpose (params.fail is true)")
    await expect(error.locator("dd").nth(1)).to_have_text("1")  # attempt
    await expect(error.locator("dd").nth(2)).to_have_text("no")  # retryable
    await page.goto(f"/#/jobs/{report['id']}")
    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Download CSV").click()
    download = await download_info.value
    assert download.suggested_filename == f"{report['id']}.csv"
    csv = Path(await download.path()).read_bytes()
    expected = await client.get(f"/jobs/{report['id']}/result", headers={"Accept": "text/csv"})
    assert csv == expected.content and csv.count(b"\n") > 10
    dashboard.check_clean()


async def test_cancel_a_running_job_from_its_page(
    browser: Browser, server: ServerHandle, client: httpx.AsyncClient, worker: JobcastWorker
) -> None:
    job = await submit(client, params={"seconds": 30, "steps": 30})
    await wait_for_status(client, job["id"], "processing")
    dashboard = await open_dashboard(browser, server.url)
    page = dashboard.page
    await dashboard.row(job["id"]).click()  # the whole row opens the job for a mouse
    badge = page.locator(".detail-actions .badge")
    await expect(badge).to_have_text("processing")
    cancel = page.get_by_role("button", name="Cancel job")
    await cancel.focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#toasts")).to_contain_text("Cancellation requested")
    await expect(badge).to_have_text("cancelled", timeout=10_000)
    await expect(cancel).to_be_hidden()
    await expect(page.locator(".timeline-item").last.locator(".badge")).to_have_text("cancelled")
    await expect(page.locator(".outcome")).to_contain_text("cancelled")
    assert (await client.get(f"/jobs/{job['id']}")).json()["status"] == "cancelled"
    await page.go_back()
    await expect(dashboard.row(job["id"]).locator(".badge")).to_have_text("cancelled")
    dashboard.check_clean()


async def test_cancel_a_queued_job_and_a_finished_one(
    browser: Browser, server: ServerHandle, client: httpx.AsyncClient
) -> None:
    queued = await submit(client, params={"seconds": 5})  # no worker: it stays queued
    dashboard = await open_dashboard(browser, server.url)
    page = dashboard.page
    await page.goto(f"/#/jobs/{queued['id']}")
    await expect(page.locator(".detail-actions .badge")).to_have_text("queued")
    await page.get_by_role("button", name="Cancel job").click()
    await expect(page.locator("#toasts")).to_contain_text("Job cancelled.")
    await expect(page.locator(".detail-actions .badge")).to_have_text("cancelled")

    # Cancelled elsewhere after the page showed the button: the 409 is explained, not a crash.
    other = await submit(client, params={"seconds": 5})
    await page.goto(f"/#/jobs/{other['id']}")
    button = page.get_by_role("button", name="Cancel job")
    await expect(button).to_be_visible()
    await page.evaluate("() => { window.__cancelButton = document.querySelector('.detail-actions .button'); }")
    assert (await client.post(f"/jobs/{other['id']}/cancel")).status_code == 200
    await expect(button).to_be_hidden()
    await page.evaluate("() => { window.__cancelButton.hidden = false; window.__cancelButton.click(); }")
    await expect(page.locator("#toasts")).to_contain_text("already ended (cancelled)")
    dashboard.check_clean()


async def test_validation_errors_are_shown_next_to_their_fields(
    browser: Browser, server: ServerHandle, client: httpx.AsyncClient
) -> None:
    dashboard = await open_dashboard(browser, server.url)
    page = dashboard.page
    await page.get_by_label("Job type").select_option("sleep")
    seconds = page.get_by_label("Seconds")
    await seconds.fill("99999")
    await page.get_by_role("button", name="Submit job").click()
    message = page.locator("#param-seconds-error")
    await expect(message).to_be_visible()
    await expect(message).to_contain_text("less than or equal to 3600")
    await expect(seconds).to_have_attribute("aria-invalid", "true")
    await expect(seconds).to_be_focused()
    assert "param-seconds-error" in (await seconds.get_attribute("aria-describedby") or "")
    await seconds.fill("2")  # editing the field clears its error
    await expect(message).to_be_hidden()
    await expect(seconds).not_to_have_attribute("aria-invalid", "true")

    await page.get_by_label("Job type").select_option("report")
    await page.get_by_role("button", name="Submit job").click()
    await expect(page.locator("#param-rows-error")).to_have_text("Field required")
    await expect(page.get_by_label("Rows")).to_be_focused()

    assert (await client.get("/jobs")).json()["items"] == []  # nothing was submitted
    await expect(page.locator("#jobs-empty")).to_be_visible()
    dashboard.check_clean()


async def test_the_table_pages_and_filters(browser: Browser, server: ServerHandle, client: httpx.AsyncClient) -> None:
    ids = [(await submit(client, params={"seconds": 5}))["id"] for _ in range(27)]
    assert (await client.post(f"/jobs/{ids[3]}/cancel")).status_code == 200
    dashboard = await open_dashboard(browser, server.url)
    page = dashboard.page
    rows = page.locator("#jobs-body tr")
    await expect(rows).to_have_count(25)
    more = page.get_by_role("button", name="Load older jobs")
    await more.click()
    await expect(rows).to_have_count(27)
    await expect(more).to_be_hidden()
    assert [await r.get_attribute("data-job-id") for r in await rows.all()] == ids[::-1]  # newest first
    await page.get_by_label("Filter by status").select_option("cancelled")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-job-id", ids[3])
    await page.get_by_label("Filter by type").select_option("report")
    await expect(rows).to_have_count(0)
    await expect(page.locator("#jobs-empty")).to_have_text("No jobs match these filters.")
    await page.get_by_label("Filter by status").select_option("")
    await page.get_by_label("Filter by type").select_option("")
    await expect(rows).to_have_count(25)
    # A job submitted elsewhere appears on top, through the feed.
    newest = await submit(client, params={"seconds": 5})
    await expect(rows.first).to_have_attribute("data-job-id", newest["id"])
    dashboard.check_clean()


async def test_a_server_restart_mid_job_is_survived_without_a_reload(
    browser: Browser, settings: Settings, redis: Redis, worker: JobcastWorker
) -> None:
    server = RestartableServer(settings)
    await server.start()
    try:
        dashboard = await open_dashboard(browser, server.url)
        page = dashboard.page
        connection = page.locator("#connection")
        job_id = await dashboard.submit_sleep(seconds=4, steps=20)
        bar = dashboard.row(job_id).get_by_role("progressbar")
        await dashboard.wait_for_progress(job_id, 10)
        await server.stop()
        await expect(connection).to_have_attribute("data-state", "reconnecting")
        await expect(connection).to_have_text("Reconnecting…")
        await asyncio.sleep(1.0)  # the job moves on while nobody serves the page
        await server.start()
        await expect(connection).to_have_attribute("data-state", "live", timeout=15_000)
        await expect(dashboard.row(job_id).locator(".badge")).to_have_text("completed", timeout=15_000)
        await expect(bar).to_have_attribute("aria-valuenow", "100")
        seen = await dashboard.progress_seen(job_id)
        assert nondecreasing(seen) and seen[-1] == 100
        assert await dashboard.not_reloaded()
        # The browser resumed the same feed with Last-Event-ID: no second token was needed.
        assert len(dashboard.paths(r"/tokens$")) == 1
        dashboard.check_clean()
    finally:
        await server.stop()


async def test_an_id_too_old_for_the_log_reloads_the_list_and_starts_over(
    browser: Browser, redis_server: RedisProcess, redis: Redis
) -> None:
    settings = make_settings(redis_server.url, tenant_log_max=1000)
    server = RestartableServer(settings)
    await server.start()
    try:
        dashboard = await open_dashboard(browser, server.url)
        page = dashboard.page
        async with httpx.AsyncClient(base_url=server.url, headers=ACME) as c:
            seen_live = await submit(c, params={"seconds": 5})
            await expect(dashboard.row(seen_live["id"])).to_be_visible()  # the page has an event id now
            await server.stop()
            store = Store(redis, settings)
            for _ in range(700):  # 1,400 events while the page is away: its last id is trimmed
                created = await store.create(
                    tenant="acme", job_type="sleep", params={}, priority=Priority.NORMAL, max_attempts=1
                )
                assert created.job_id is not None
                assert (await store.cancel(created.job_id, "acme"))[0] == "cancelled"
            newest = created.job_id
            await server.start()
            # The browser's reconnect gets 410 Gone; the page reloads the list and reconnects without an id.
            await expect(page.locator("#jobs-body tr").first).to_have_attribute("data-job-id", newest, timeout=15_000)
            await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
            assert len(dashboard.paths(r"/tokens$")) == 2
            assert await dashboard.not_reloaded()
            # And it is live again: a new job shows up on top.
            after = await submit(c, params={"seconds": 5})
            await expect(page.locator("#jobs-body tr").first).to_have_attribute("data-job-id", after["id"])
        dashboard.check_clean()
    finally:
        await server.stop()


async def test_the_stream_token_is_renewed_before_it_expires(
    browser: Browser, redis_server: RedisProcess, redis: Redis
) -> None:
    settings = make_settings(redis_server.url, stream_token_ttl_s=6)  # renewed after ~5.4 s
    server = ServerHandle(settings)
    await server.start()
    try:
        async with running_worker(settings):
            dashboard = await open_dashboard(browser, server.url)
            job_id = await dashboard.submit_sleep(seconds=8, steps=16)
            row = dashboard.row(job_id)
            await expect(row.locator(".badge")).to_have_text("completed", timeout=20_000)
            assert len(dashboard.paths(r"/tokens$")) == 2
            streams = dashboard.paths(r"/events\?token=")
            assert len(streams) == 2 and "last_event_id=" in streams[1]
            seen = await dashboard.progress_seen(job_id)
            assert nondecreasing(seen) and seen[-1] == 100 and len(set(seen)) >= 12
            await expect(dashboard.page.locator("#connection")).to_have_attribute("data-state", "live")
            dashboard.check_clean()
    finally:
        await server.stop()


async def test_sign_in_refuses_a_wrong_key_and_sign_out_forgets_the_key(browser: Browser, server: ServerHandle) -> None:
    context = await browser.new_context(base_url=server.url)
    page = await context.new_page()
    await page.goto("/")
    await page.get_by_label("API key").fill("wrong-key")
    await page.keyboard.press("Enter")
    await expect(page.locator("#api-key-error")).to_have_text("This API key was not accepted.")
    await expect(page.get_by_label("API key")).to_have_attribute("aria-invalid", "")
    await page.get_by_label("API key").fill("key-acme")
    await page.keyboard.press("Enter")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    # Kept for this tab only (sessionStorage): not written where every later visit, and every
    # script of the origin in any tab, could read it for good.
    assert await page.evaluate("sessionStorage.getItem('jobcast.apiKey')") == "key-acme"
    assert await page.evaluate("localStorage.length") == 0
    await page.reload()  # the key is remembered in this tab
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    other_tab = await context.new_page()  # another tab starts signed out
    await other_tab.goto("/")
    await expect(other_tab.get_by_label("API key")).to_be_visible()
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_label("API key")).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('jobcast.apiKey')") is None
    await page.reload()
    await expect(page.get_by_label("API key")).to_be_visible()


@pytest.mark.parametrize("path", ["/", "/static/js/main.js", "/static/app.css"])
async def test_the_dashboard_is_served_with_security_headers(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    policy = dict(
        directive.strip().split(" ", 1) for directive in response.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"  # nothing inline
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"


async def test_screenshot_of_a_busy_dashboard(
    browser: Browser, server: ServerHandle, client: httpx.AsyncClient, worker: JobcastWorker, tmp_path: Path
) -> None:
    """The README's picture: jobs in every state, one of them moving."""
    done = [
        await submit(client, "report", params={"rows": 250_000, "seed": 7}),
        await submit(client, params={"seconds": 2.4, "steps": 12}),
        await submit(client, params={"fail": True}),
        await submit(client, params={"seconds": 1.2, "steps": 4}),
    ]
    cancelled = await submit(client, params={"seconds": 60, "steps": 60})
    await wait_for_status(client, cancelled["id"], "processing")
    assert (await client.post(f"/jobs/{cancelled['id']}/cancel")).status_code == 202
    for job in done:
        await wait_for_status(client, job["id"], {"completed", "failed"})
    await wait_for_status(client, cancelled["id"], "cancelled")
    slow = await submit(client, params={"seconds": 30, "steps": 30})
    dashboard = await open_dashboard(browser, server.url)
    page = dashboard.page
    await page.get_by_label("Job type").select_option("sleep")
    await page.get_by_label("Seconds").fill("10")
    await page.get_by_label("Steps").fill("20")
    await page.get_by_role("button", name="Submit job").click()
    await expect(page.locator("#jobs-body tr")).to_have_count(7)
    sleeper = await page.locator("#jobs-body tr").first.get_attribute("data-job-id")
    assert sleeper is not None
    await dashboard.wait_for_progress(sleeper, 35)
    for close in await page.locator("#toasts .toast-close").all():
        await close.click()
    await page.mouse.move(900, 760)  # over empty space: no hover state in the picture
    await page.evaluate("document.activeElement.blur()")
    await page.evaluate("window.scrollTo(0, 0)")  # the live header in the picture, whatever was focused
    picture = tmp_path / "dashboard.png"
    await page.screenshot(path=str(picture))
    assert picture.read_bytes().startswith(b"\x89PNG") and picture.stat().st_size > 20_000
    if os.environ.get("JOBCAST_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(picture, SCREENSHOT)
    assert (await client.post(f"/jobs/{slow['id']}/cancel")).status_code == 202
    dashboard.check_clean()
