"""The dashboard's first hour: the layout at a laptop's and a phone's width, the live header, time
left, and the sign-in hint under ``jobcast dev`` — in Debian's Chromium, against a live server.

Screenshots of both widths go to docs/ with JOBCAST_UPDATE_SCREENSHOT=1 (else to the test's
temporary folder), as the README's picture does in test_dashboard.py.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, expect

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker.clock import rfc3339
from jobcast.worker.main import JobcastWorker
from jobcast.worker.store import Store

from .conftest import ROOT, ServerHandle, make_settings, submit, wait_for_status
from .test_dashboard import CHROMIUM, browser, open_dashboard  # noqa: F401 - browser is a fixture

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="the dashboard tests drive Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium",
)

LONG_STEP = ("aggregating", "5,000,000 of 5,000,000 rows")

# Everything that must hold for the layout not to break, measured by the browser itself.
LAYOUT = """
(id) => {
  const box = (el) => el.getBoundingClientRect();
  const row = document.querySelector(`tr[data-job-id="${id}"]`);
  const card = box(document.querySelector(".jobs-card"));
  const wrap = document.querySelector(".table-wrap");
  const duration = box(row.querySelector(".col-duration"));
  const overview = box(document.getElementById("overview"));
  const step = row.querySelector(".step");
  return {
    pageOverflow: document.documentElement.scrollWidth - window.innerWidth,
    tableOverflow: wrap.scrollWidth - wrap.clientWidth,
    durationInside: duration.width > 0 && duration.left >= card.left && duration.right <= card.right + 0.5,
    durationText: row.querySelector(".col-duration").textContent,
    overviewInside: overview.left >= 0 && overview.right <= window.innerWidth + 0.5,
    stepCut: step.scrollWidth > step.clientWidth,
    stepTitle: step.title,
  };
}
"""


async def running_with_long_step(client: httpx.AsyncClient, store: Store, eta_in_s: float) -> dict[str, Any]:
    """A processing job whose step label is long, with an estimate of ``eta_in_s`` seconds left
    (written through the store as a worker writes it; no worker runs it)."""
    job = await submit(client, params={"seconds": 600})
    assert await store.start(job["id"], 1, 10**15) is not None
    eta = rfc3339(time.time_ns() + int(eta_in_s * 1e9))
    assert await store.progress(job["id"], 1, 100 * 5 / 12, *LONG_STEP, eta=eta)
    return job


def keep_screenshot(picture: Path, name: str) -> None:
    assert picture.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("JOBCAST_UPDATE_SCREENSHOT"):
        shutil.copyfile(picture, ROOT / "docs" / name)


@pytest.mark.parametrize(("width", "height"), [(1280, 820), (390, 844)])
async def test_the_layout_holds_at_a_laptop_and_a_phone_width(
    browser: Browser,  # noqa: F811
    server: ServerHandle,
    client: httpx.AsyncClient,
    store: Store,
    worker: JobcastWorker,
    tmp_path: Path,
    width: int,
    height: int,
) -> None:
    done = await submit(client, "report", params={"rows": 200_000})
    await wait_for_status(client, done["id"], "completed")
    failed = await submit(client, params={"fail": True})
    await wait_for_status(client, failed["id"], "failed")
    await worker.stop()  # from here on nothing moves: the long-step job stays as written
    job = await running_with_long_step(client, store, eta_in_s=12.4)

    dashboard = await open_dashboard(browser, server.url, width=width, height=height)
    page = dashboard.page
    row = dashboard.row(job["id"])
    await expect(row.locator(".step")).to_have_text(" · ".join(LONG_STEP))
    await expect(page.locator('#overview [data-figure="processing"]')).to_have_text("1")

    layout = await page.evaluate(LAYOUT, job["id"])
    assert layout["pageOverflow"] <= 0, layout
    assert layout["tableOverflow"] <= 0, layout
    assert layout["durationInside"], layout
    assert re.fullmatch(r"[0-9.]+ s", layout["durationText"]), layout
    assert layout["overviewInside"], layout
    assert layout["stepTitle"] == " · ".join(LONG_STEP)  # cut on screen, whole on hover
    await expect(row.locator(".time-left")).to_have_text(re.compile(r"^about 1[0-2] s left$"))

    for close in await page.locator("#toasts .toast-close").all():
        await close.click()
    picture = tmp_path / f"dashboard-{width}.png"
    await page.screenshot(path=str(picture), full_page=width < 640)
    keep_screenshot(picture, f"dashboard-{width}.png")
    dashboard.check_clean()


async def test_the_live_header_moves_with_the_one_event_stream_and_never_polls(
    browser: Browser,  # noqa: F811
    server: ServerHandle,
    client: httpx.AsyncClient,
    worker: JobcastWorker,
) -> None:
    first = await submit(client, params={"seconds": 0})
    await wait_for_status(client, first["id"], "completed")
    dashboard = await open_dashboard(browser, server.url)
    page = dashboard.page
    figure = lambda name: page.locator(f'#overview [data-figure="{name}"]')  # noqa: E731
    await expect(figure("completed")).to_have_text("1")
    await expect(figure("workers")).to_have_text(re.compile(r"^[1-9][0-9]*$"))
    await expect(page.locator("#overview")).to_have_attribute("data-fresh", "true")
    before = len(dashboard.requests)

    second = await submit(client, params={"fail": True})
    await wait_for_status(client, second["id"], "failed")
    await expect(figure("failed")).to_have_text("1")
    await expect(figure("completed")).to_have_text("1")
    await expect(figure("queued")).to_have_text("0")

    streams = dashboard.paths(r"/events\?")
    assert len(streams) == 1 and "overview=true" in streams[0]
    # What the page asked for since: the new job's resource (it was born after the list), nothing else.
    later = dashboard.requests[before:]
    assert all(re.search(rf"/jobs/{second['id']}$", url) for url in later), later
    dashboard.check_clean()


async def test_sign_in_offers_the_development_key_under_jobcast_dev(
    browser: Browser,  # noqa: F811
    redis_server: RedisProcess,
    server: ServerHandle,
) -> None:
    # The fixture's server runs in production mode: no hint there.
    page = await (await browser.new_context(base_url=server.url)).new_page()
    await page.goto("/")
    await expect(page.get_by_label("API key")).to_be_visible()
    await expect(page.locator("#dev-key-hint")).to_be_hidden()
    assert await page.locator('meta[name="jobcast-dev-key"]').count() == 0

    development = ServerHandle(make_settings(redis_server.url, env="development", api_keys=""))
    await development.start()
    try:
        page = await (await browser.new_context(base_url=development.url)).new_page()
        await page.goto("/")
        hint = page.locator("#dev-key-hint")
        await expect(hint).to_be_visible()
        await expect(hint).to_contain_text("Started with jobcast dev? Its API key is dev-key.")
        await page.get_by_role("button", name="Sign in with it").click()
        await expect(page.locator("#connection")).to_have_text("Live")
    finally:
        await development.stop()
