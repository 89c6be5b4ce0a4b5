"""What deploy/ ships: Prometheus rules that promtool accepts, and rules and a Grafana dashboard
that name only metrics a real server exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker.settings import Settings

from .conftest import ServerHandle

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "jobcast.json"
METRIC_RE = re.compile(r"\b(jobcast_[a-z_]+)")
SERIES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exposed(scrape: str) -> set[str]:
    """Every series name the scrape declares (# TYPE lines: families without samples count too)."""
    names = set()
    for line in scrape.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            names.update(name.removesuffix("_total") + suffix for suffix in SERIES[kind])
    return names


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_rules() -> None:
    checked = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


async def test_rules_and_dashboard_name_only_exposed_metrics(client: httpx.AsyncClient) -> None:
    names = exposed((await client.get("/metrics")).text)
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set(METRIC_RE.findall(RULES.read_text())) | set(METRIC_RE.findall("\n".join(expressions)))
    assert len(used) >= 10
    assert used <= names, sorted(used - names)
    for name in ("jobcast_webhook_destinations_disabled", "jobcast_redis_up", "jobcast_webhook_deferrals_total"):
        assert name in used


async def test_metrics_answer_without_redis(settings: Settings, redis_server: RedisProcess) -> None:
    handle = ServerHandle(settings)
    await handle.start()
    try:
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as c:
            assert "jobcast_redis_up 1.0" in (await c.get("/metrics")).text
            redis_server.stop()
            try:
                scraped = await c.get("/metrics")
            finally:
                redis_server.start()
        assert scraped.status_code == 200
        assert "jobcast_redis_up 0.0" in scraped.text and "jobcast_sse_streams_open" in scraped.text
        assert "jobcast_queue_depth" not in scraped.text  # nothing read from Redis is made up
    finally:
        await handle.stop()
