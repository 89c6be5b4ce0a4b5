"""``GET /ws`` from a real browser (Debian's Chromium via Playwright): a page can only pass
credentials as ``?token=``, and sees the same events as its EventSource would."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from jobcast.tokens import TokenSigner
from jobcast.worker.store import Store

from .conftest import SECRET, ServerHandle
from .test_dashboard import CHROMIUM, browser  # noqa: F401  (the fixture)
from .test_sse import collect, new_running_job
from .wsclient import check_frame

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="the browser test drives Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium",
)

FOLLOW = """
async ([url, channel]) => {
  const frames = [];
  const ws = new WebSocket(url);
  await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = () => reject(new Error("refused")); });
  const done = new Promise((resolve) => {
    ws.onmessage = (m) => {
      const frame = JSON.parse(m.data);
      frames.push(frame);
      // The cancel's refusal may come after the end (the job can finish before it is read).
      if (frames.some((f) => f.op === "end") && frames.some((f) => f.ref === "2")) resolve();
    };
  });
  ws.send(JSON.stringify({op: "subscribe", ref: "1", channel}));
  ws.send(JSON.stringify({op: "cancel", ref: "2", job_id: channel.slice(4)}));
  await done;
  ws.close();
  return frames;
}
"""

REFUSED = """
async (url) => new Promise((resolve) => {
  const ws = new WebSocket(url);
  ws.onopen = () => resolve("open");
  ws.onclose = (e) => resolve(`closed ${e.code}`);
})
"""


async def test_a_browser_follows_a_job_with_its_token_and_cannot_cancel_with_it(
    server: ServerHandle,
    client: httpx.AsyncClient,
    store: Store,
    browser: Any,  # noqa: F811
) -> None:
    job_id = await new_running_job(store)
    token, _ = TokenSigner(SECRET).mint("job", "acme", 3600, job_id)
    page = await browser.new_page()
    await page.goto(server.url + "/healthz")
    ws_base = server.url.replace("http://", "ws://") + "/ws"
    following = asyncio.create_task(page.evaluate(FOLLOW, [f"{ws_base}?token={token}", f"job:{job_id}"]))
    await store.progress(job_id, 1, 50, "half", None)
    await store.complete(job_id, 1, '{"done": true}')
    frames = await asyncio.wait_for(following, 30)
    assert frames[0] == {"op": "ok", "ref": "1"}
    refusal = next(f for f in frames if f.get("ref") == "2")
    assert refusal["op"] == "error" and refusal["status"] == 403  # a token reads, never cancels
    assert [f for f in frames if f is not refusal][-1] == {"op": "end", "channel": f"job:{job_id}"}
    events = [f for f in frames if f["op"] == "event"]
    for frame in frames:
        check_frame(frame)
    assert [(f["id"], f["event"], f["data"]) for f in events] == await collect(client, f"/jobs/{job_id}/events")
    # A bad token: the upgrade is refused, so the page never gets an open socket.
    assert await page.evaluate(REFUSED, f"{ws_base}?token=jc1.bad.token") == "closed 1006"
    await page.close()
