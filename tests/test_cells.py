"""Cells: several Redis deployments, whole tenants in each (worker.cells, docs/design/cells.md).

The acceptance test runs the Procfile's processes — two ``jobcast web`` and one ``jobcast worker``
— against three cells (three redis-servers of its own) with tenants placed by the hash and by an
override, and checks where every byte went. The others: a worker given some cells, webhooks and a
cell that goes down on two cells (in-process server and workers), the start-up refusals (a reordered
list, a cell that does not exist), ``jobcast cells``, and the placement rules and ids without Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from httpx_sse import aconnect_sse
from redis.asyncio import Redis

from jobcast.cli.cells import check_cells
from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker import schema
from jobcast.worker.alerts import Alerter, AlertKind
from jobcast.worker.cells import Placement, jump_hash, parse_placement, tenant_hash
from jobcast.worker.connections import redis_for
from jobcast.worker.ids import cell_of, is_job_id, new_job_id
from jobcast.worker.models import JobStatus, Priority
from jobcast.worker.relayout import move_to_cells
from jobcast.worker.settings import ConfigError, Settings
from jobcast.worker.store import Store

from .children import spawn
from .conftest import (
    ROOT,
    SECRET,
    WEBHOOK_SECRET_ACME,
    WebProcess,
    WorkerProcess,
    make_settings,
    process_env,
    redis_cells,
    running_worker,
    serving,
    wait_for_deliveries,
    wait_until,
)
from .receiver import Receiver, Reply

#: With 3 cells: acme, globex and wayne where the hash puts them (1, 0, 2); bigcorp (hash: 1) by override.
TENANTS = {"acme": 1, "globex": 0, "wayne": 2, "bigcorp": 0}
PLACEMENT = "bigcorp=0"
JOBS_PER_TENANT = 6


def key_of(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer key-{tenant}"}


def cells_settings(cells: list[RedisProcess], **overrides: Any) -> Settings:
    return make_settings(
        "",
        redis_urls=",".join(cell.url for cell in cells),
        cell_placement=PLACEMENT,
        api_keys=",".join(f"{tenant}:key-{tenant}" for tenant in TENANTS),
        webhook_secrets="",
        **overrides,
    )


async def follow_feed(url: str, tenant: str, connected: asyncio.Event, jobs: int) -> list[tuple[str, str]]:
    """The tenant's feed on the server at ``url``: (event, job id) until ``jobs`` jobs completed."""
    seen: list[tuple[str, str]] = []
    async with (
        httpx.AsyncClient(base_url=url, headers=key_of(tenant), timeout=60) as client,
        aconnect_sse(client, "GET", "/events") as source,
    ):
        assert source.response.status_code == 200, await source.response.aread()
        connected.set()  # subscribed: the headers come after the subscription is confirmed
        async for sse in source.aiter_sse():
            if not sse.data:
                continue
            seen.append((sse.event, orjson.loads(sse.data)["job_id"]))
            if sum(event == "job.completed" for event, _ in seen) == jobs:
                return seen
    raise AssertionError(f"{tenant}'s feed ended early: {seen}")


async def job_stream(url: str, job_id: str, token: str, opened: asyncio.Event | None = None) -> list[str]:
    """A job's whole stream, read with its job token from the server at ``url``; ``opened`` is set
    once its first event (the job's ``job.queued``) arrived: it is subscribed."""
    seen: list[str] = []
    async with (
        httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client,
        aconnect_sse(client, "GET", f"/jobs/{job_id}/events") as source,
    ):
        assert source.response.status_code == 200, await source.response.aread()
        async for sse in source.aiter_sse():
            if sse.data:
                seen.append(sse.event)
                if opened is not None:
                    opened.set()
    return seen


async def opened_job_stream(url: str, job_id: str, token: str) -> asyncio.Task[list[str]]:
    """:func:`job_stream` as a task, returned once the stream is open."""
    opened = asyncio.Event()
    task = asyncio.create_task(job_stream(url, job_id, token, opened))
    async with asyncio.timeout(30):
        await opened.wait()
    return task


def metric(text: str, name: str) -> float:
    """The sum of every sample of metric ``name`` (all label sets)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def keys_of(url: str) -> list[str]:
    redis = redis_for(url)
    try:
        return [str(key) async for key in redis.scan_iter(count=1000)]
    finally:
        await redis.aclose()


def hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes: its first non-empty ``{...}``, as Redis reads it."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else None


def owner(key: str, jobs: dict[str, str]) -> set[str]:
    """The tenants a Redis key names: as a segment of its name, or through one of their job ids."""
    segments = set(key.split(":"))
    named = {tenant for tenant in TENANTS if tenant in segments}
    named |= {tenant for job_id, tenant in jobs.items() if job_id[4:] in key}
    return named


async def test_three_cells_keep_each_tenant_whole_and_every_server_serves_all(tmp_path: Path) -> None:
    with redis_cells(tmp_path, 3) as cells:
        settings = cells_settings(cells)
        assert {t: settings.placement.tenant_cell(t) for t in TENANTS} == TENANTS
        assert jump_hash(tenant_hash("bigcorp"), 3) != TENANTS["bigcorp"]  # the override is what places it
        web_a, web_b = WebProcess(settings, tmp_path / "web-a.log"), WebProcess(settings, tmp_path / "web-b.log")
        worker = WorkerProcess(settings, tmp_path / "worker.log")
        try:
            await asyncio.gather(asyncio.to_thread(web_a.wait_ready, 60), asyncio.to_thread(web_b.wait_ready, 60))
            await check_three_cells(settings, cells, web_a.url, web_b.url)
        except BaseException:
            print(web_a.output(), web_b.output(), worker.output(), sep="\n----\n")
            raise
        finally:
            for proc in (web_a, web_b, worker):
                proc.close()


async def test_web_with_two_processes_serves_three_cells(tmp_path: Path) -> None:
    """``jobcast web --processes 2`` (JOBCAST_WEB_PROCESSES=2): two server processes on one port,
    each with a Store and a Hub per cell; the three-cell check through that one port."""
    with redis_cells(tmp_path, 3) as cells:
        settings = cells_settings(cells, web_processes=2)
        web = WebProcess(settings, tmp_path / "web.log")
        worker = WorkerProcess(settings, tmp_path / "worker.log")
        servers: list[int] = []
        try:
            await asyncio.to_thread(web.wait_ready, 60)
            started = re.search(r"jobcast web: 2 server processes on \S+ \(pids \[(\d+), (\d+)\]\)", web.output())
            assert started is not None, web.output()
            servers = [int(pid) for pid in started.groups()]
            await check_three_cells(settings, cells, web.url, web.url)
            # The supervisor stops its server processes, then itself by the same signal.
            web.signal(signal.SIGTERM)
            assert await asyncio.to_thread(web.wait, 30) == -signal.SIGTERM, web.output()
            assert not [pid for pid in servers if _alive(pid)]
        except BaseException:
            print(web.output(), worker.output(), sep="\n----\n")
            raise
        finally:
            for proc in (web, worker):
                proc.close()
            for pid in servers:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


async def check_three_cells(settings: Settings, cells: list[RedisProcess], url_a: str, url_b: str) -> None:
    # Every tenant's feed, followed on one server or the other, subscribed before anything is submitted.
    connected = {tenant: asyncio.Event() for tenant in TENANTS}
    feeds = {
        tenant: asyncio.create_task(follow_feed((url_a, url_b)[i % 2], tenant, connected[tenant], JOBS_PER_TENANT))
        for i, tenant in enumerate(TENANTS)
    }
    async with asyncio.timeout(30):
        await asyncio.gather(*(event.wait() for event in connected.values()))

    # Submitted to both servers in turn; each job's id names its tenant's cell.
    jobs: dict[str, str] = {}
    tokens: dict[str, str] = {}
    async with httpx.AsyncClient(timeout=30) as client:
        for tenant, cell in TENANTS.items():
            for n in range(JOBS_PER_TENANT):
                body = {"type": "sleep", "params": {"seconds": 0, "steps": 2}}
                url = (url_a, url_b)[n % 2]
                reply = await client.post(f"{url}/jobs", json=body, headers=key_of(tenant))
                assert reply.status_code == 202, reply.text
                job_id = reply.json()["id"]
                assert cell_of(job_id, 3) == cell
                jobs[job_id] = tenant
                tokens[job_id] = reply.json()["token"]

    # Each feed saw all of its tenant's jobs and only those, start to end, whichever server took them.
    async with asyncio.timeout(60):
        seen = {tenant: await task for tenant, task in feeds.items()}
    by_job: dict[str, list[str]] = {}
    for tenant, events in seen.items():
        mine = {job_id for job_id, t in jobs.items() if t == tenant}
        assert {job_id for _, job_id in events} == mine
        for event, job_id in events:
            by_job.setdefault(job_id, []).append(event)
    for names in by_job.values():
        assert names[:2] == ["job.queued", "job.processing"] and names[-1] == "job.completed", names

    # A job stream, with the job's token, from either server: the whole job, as the feed saw it.
    for job_id in [next(j for j, t in jobs.items() if t == tenant) for tenant in TENANTS]:
        for url in (url_a, url_b):
            assert await job_stream(url, job_id, tokens[job_id]) == by_job[job_id]

    # Listings from either server: each tenant's jobs, all completed, newest first.
    for url in (url_a, url_b):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for tenant in TENANTS:
                reply = await client.get("/jobs", params={"limit": 200}, headers=key_of(tenant))
                assert reply.status_code == 200, reply.text
                items = reply.json()["items"]
                newest_first = sorted((job_id for job_id, t in jobs.items() if t == tenant), reverse=True)
                assert [item["id"] for item in items] == newest_first
                assert {item["status"] for item in items} == {"completed"}

    # Each tenant's data lives only in its cell.
    for index, process in enumerate(cells):
        for key in await keys_of(process.url):
            strangers = {tenant for tenant in owner(key, jobs) if TENANTS[tenant] != index}
            assert not strangers, f"cell {index} holds {key!r} of {strangers}"
            # ... under the cell's own hash tag (one slot per cell), but for the cell's index itself.
            assert key == schema.CELL_INDEX or hash_tag(key) == f"c{index}", f"cell {index} holds {key!r}"
    for tenant, index in TENANTS.items():
        assert any(tenant in owner(key, jobs) for key in await keys_of(cells[index].url))

    # /metrics of either server: every cell's figures, summed; every cell reached and served.
    async with httpx.AsyncClient(timeout=30) as client:
        for url in (url_a, url_b):
            text = (await client.get(f"{url}/metrics")).text
            assert metric(text, "jobcast_jobs_submitted_total") == len(jobs)
            assert metric(text, "jobcast_jobs_completed_total") == len(jobs)
            assert metric(text, "jobcast_events_published_total") == sum(map(len, by_job.values()))
            assert metric(text, "jobcast_redis_up") == 1
            assert metric(text, "jobcast_cell_up") == 3
            assert metric(text, "jobcast_workers_live") == 1  # the one worker serves every cell
            assert metric(text, "jobcast_cell_workers_live") == 3

    # An id naming a cell that does not exist, and in neither cell 0 nor the archive: 404, as
    # problem+json, from every route that takes one.
    job_id = next(iter(jobs))
    nowhere = job_id[:14] + "05" + job_id[16:]
    async with httpx.AsyncClient(base_url=url_a, headers=key_of(jobs[job_id]), timeout=30) as client:
        for path in (f"/jobs/{nowhere}", f"/jobs/{nowhere}/events", f"/jobs/{nowhere}/result"):
            reply = await client.get(path)
            assert reply.status_code == 404, (path, reply.text)
            assert reply.headers["content-type"].startswith("application/problem+json")
        reply = await client.post(f"/jobs/{nowhere}/cancel")
        assert reply.status_code == 404, reply.text


async def test_a_worker_serves_only_the_cells_it_is_given(tmp_path: Path) -> None:
    with redis_cells(tmp_path, 2) as cells:
        settings = cells_settings(cells)
        redis = [redis_for(cell.url) for cell in cells]
        stores = [Store(client, settings, cell=index) for index, client in enumerate(redis)]
        worker = WorkerProcess(settings, tmp_path / "worker.log", JOBCAST_WORKER_CELLS="1")
        try:
            created = [
                await store.create(tenant="acme", job_type="sleep", params={"seconds": 0}, priority=Priority.NORMAL,
                                   max_attempts=1)
                for store in stores
            ]  # fmt: skip
            ids = [c.job_id for c in created if c.job_id is not None]
            assert len(ids) == 2

            async def done_in_cell_1() -> bool:
                record = await stores[1].get(ids[1])
                return record is not None and record.status is JobStatus.COMPLETED

            await wait_until(done_in_cell_1, timeout=60)
            # Cell 1's job ran; cell 0 has no worker and its job still waits.
            assert await redis[1].zcard(schema.in_cell(schema.WORKERS, 1)) == 1
            assert await redis[0].zcard(schema.in_cell(schema.WORKERS, 0)) == 0
            waiting = await stores[0].get(ids[0])
            assert waiting is not None and waiting.status is JobStatus.QUEUED
        finally:
            worker.close()
            for client in redis:
                await client.aclose()


async def test_a_moved_tenant_still_reads_and_lists_its_older_jobs(tmp_path: Path) -> None:
    with redis_cells(tmp_path, 2) as cells:
        before = cells_settings(cells, archive_url=f"sqlite:///{tmp_path / 'archive.sqlite3'}")
        assert before.placement.tenant_cell("acme") == 1
        body = {"type": "sleep", "params": {"seconds": 0}}
        async with serving(before, headers=key_of("acme")) as client:
            old = (await client.post("/jobs", json=body)).json()
        moved = before.model_copy(update={"cell_placement": "acme=0"})
        async with serving(moved, headers=key_of("acme")) as client:
            new = (await client.post("/jobs", json=body)).json()
            assert (cell_of(old["id"], 2), cell_of(new["id"], 2)) == (1, 0)
            # The old job, in the cell the tenant left: read, followed and cancelled by its id.
            assert (await client.get(f"/jobs/{old['id']}")).json()["status"] == "queued"
            events = await opened_job_stream(str(client.base_url), old["id"], old["token"])
            cancelled = await client.post(f"/jobs/{old['id']}/cancel")
            assert cancelled.status_code == 200, cancelled.text
            assert await events == ["job.queued", "job.cancelled"]
            # Its listing has both, newest first, a page at a time across the two cells.
            listed, cursor = [], None
            for _ in range(5):  # two pages, then the end
                params = {"limit": 1, **({"cursor": cursor} if cursor else {})}
                page = (await client.get("/jobs", params=params)).json()
                listed += [item["id"] for item in page["items"]]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert listed == [new["id"], old["id"]]


async def back_to_the_layout_before_cells(redis: Redis, cell: int) -> None:
    """Rename cell ``cell``'s keys as one Redis named them before cells: no tag, arq's own queue."""
    tag = schema.tag(cell)
    async for key in redis.scan_iter(match=f"*{tag}*", count=1000):
        old = "arq:queue" if key == schema.in_cell(schema.ARQ_QUEUE, cell) else key.replace(f"{tag}:", "")
        old = old.replace(tag, "")
        if await redis.type(key) == "zset":
            members = await redis.zrange(key, 0, -1, withscores=True)
            await redis.delete(key)
            await redis.zadd(old, {member.replace(tag, ""): score for member, score in members})
        else:
            await redis.rename(key, old)


async def test_a_job_from_before_cells_is_found_in_cell_0(tmp_path: Path) -> None:
    with redis_cells(tmp_path, 2) as cells:
        settings = cells_settings(cells, archive_url=f"sqlite:///{tmp_path / 'archive.sqlite3'}")
        redis = redis_for(cells[0].url)
        try:
            # What one Redis held before cells: an id whose characters name no cell of these two
            # (made here as cell 5's, then put back in the layout of then and moved by the migration).
            before = await Store(redis, settings, cell=5).create(
                tenant="acme", job_type="sleep", params={}, priority=Priority.NORMAL, max_attempts=1
            )
            await back_to_the_layout_before_cells(redis, 5)
            assert (await move_to_cells(redis)).conflicts == []
        finally:
            await redis.aclose()
        assert before.job_id is not None and cell_of(before.job_id, 2) == 5
        async with serving(settings, headers=key_of("acme")) as client:
            found = await client.get(f"/jobs/{before.job_id}")
            assert found.status_code == 200, found.text
            assert (await client.post(f"/jobs/{before.job_id}/cancel")).status_code == 200


async def test_a_cell_down_stops_only_its_tenants(tmp_path: Path) -> None:
    with redis_cells(tmp_path, 2) as cells:
        settings = cells_settings(cells, archive_url=f"sqlite:///{tmp_path / 'archive.sqlite3'}")
        assert settings.placement.tenant_cell("globex") == 0 and settings.placement.tenant_cell("acme") == 1
        body = {"type": "sleep", "params": {"seconds": 0}}
        async with serving(settings, headers={}) as client:
            cells[1].stop()
            assert (await client.post("/jobs", json=body, headers=key_of("globex"))).status_code == 202
            refused = await client.post("/jobs", json=body, headers=key_of("acme"))
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert (await client.get("/readyz")).status_code == 503
            text = (await client.get("/metrics")).text
            assert 'jobcast_cell_up{cell="0"} 1.0' in text and 'jobcast_cell_up{cell="1"} 0.0' in text
            assert metric(text, "jobcast_redis_up") == 0

            cells[1].start()  # the same port: the server reconnects by itself

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await wait_until(ready, timeout=30)
            assert (await client.post("/jobs", json=body, headers=key_of("acme"))).status_code == 202

            # Cell 1's hub lost its pub/sub connection (and failed to connect while Redis was away).
            async def cell_1_reconnected() -> dict[str, float] | None:
                text = (await client.get("/metrics")).text
                counted = {cell: metric(text, f'jobcast_sse_hub_reconnects_total{{cell="{cell}"}}') for cell in "01"}
                return counted if counted["1"] >= 1 else None

            counted = await wait_until(cell_1_reconnected, timeout=30)
            assert counted["0"] == 0, counted


async def test_webhooks_are_delivered_dead_lettered_and_replayed_in_each_tenant_s_cell(tmp_path: Path) -> None:
    with redis_cells(tmp_path, 2) as cells:
        settings = cells_settings(
            cells,
            webhook_secret=WEBHOOK_SECRET_ACME,
            webhook_allow_private=True,
            webhook_retry_schedule="",  # a failed delivery is dead at once
            archive_url=f"sqlite:///{tmp_path / 'archive.sqlite3'}",
        )
        receiver = await Receiver().start()
        receiver.replies = [Reply(status=500)]  # the first delivery fails: a dead letter
        try:
            async with (
                serving(settings, headers={}) as client,
                running_worker(settings, cell=0),
                running_worker(settings, cell=1),
            ):
                jobs = {}
                for tenant in ("acme", "globex"):  # cells 1 and 0
                    body = {"type": "sleep", "params": {"seconds": 0}, "webhook": {"url": receiver.url}}
                    reply = await client.post("/jobs", json=body, headers=key_of(tenant))
                    assert reply.status_code == 202, reply.text
                    jobs[tenant] = reply.json()["id"]
                    await receiver.wait_for(len(jobs))
                acme = httpx.AsyncClient(base_url=str(client.base_url), headers=key_of("acme"))
                async with acme:
                    [dead] = (await acme.get("/webhooks/dead-letters")).json()["items"]
                    assert dead["job_id"] == jobs["acme"]
                    replayed = await acme.post(f"/webhooks/dead-letters/{dead['id']}/replay")
                    assert replayed.status_code == 202, replayed.text
                    await receiver.wait_for(3)
                    delivered = await wait_for_deliveries(acme, jobs["acme"], "delivered")
                    assert [d["id"] for d in delivered] == [dead["id"]]
                    # Another tenant's dead letter, or one naming no cell, is not found.
                    other = await client.post(f"/webhooks/dead-letters/{dead['id']}/replay", headers=key_of("globex"))
                    assert other.status_code == 404
                    nowhere = dead["id"][:14] + "05" + dead["id"][16:]
                    assert (await acme.post(f"/webhooks/dead-letters/{nowhere}/replay")).status_code == 404
        finally:
            await receiver.stop()


async def test_an_alert_of_a_cell_says_which(redis: Redis, settings: Settings) -> None:
    cell_2 = Store(redis, settings, cell=2)
    await cell_2.create(tenant="acme", job_type="sleep", params={}, priority=Priority.NORMAL, max_attempts=1)
    alerter = Alerter(redis, settings, cell=2)
    [no_workers] = [c for c in await alerter.conditions() if c.kind is AlertKind.NO_WORKERS]
    assert no_workers.holds and "waiting in cell 2 and" in no_workers.summary
    assert no_workers.details["cell"] == 2


def test_processes_refuse_to_start_on_a_reordered_cell_list(tmp_path: Path) -> None:
    with redis_cells(tmp_path, 2) as cells:
        in_order = cells_settings(cells)
        asyncio.run(check_cells(in_order.cell_urls))  # what every process does at start
        asyncio.run(check_cells(in_order.cell_urls))  # and again: the same order is fine
        swapped = in_order.model_copy(update={"redis_urls": f"{cells[1].url},{cells[0].url}"})
        commands = (["worker"], ["web", "--port", "0"])
        started = [
            spawn(
                [sys.executable, "-m", "jobcast", *command],
                env=process_env(swapped),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for command in commands
        ]  # at once: each takes seconds to import
        try:
            for command, process in zip(commands, started, strict=True):
                _, stderr = process.communicate(timeout=60)
                assert process.returncode == 1, (command, stderr)
                assert "the Redis of cell 0 in JOBCAST_REDIS_URLS was cell 1" in stderr, stderr
                assert "Traceback" not in stderr
        finally:
            for process in started:
                if process.poll() is None:  # one that started after all
                    process.kill()
                    process.communicate()


def test_worker_refuses_a_cell_that_does_not_exist(tmp_path: Path) -> None:
    settings = make_settings("redis://127.0.0.1:1/0")
    done = subprocess.run(
        [sys.executable, "-m", "jobcast", "worker", "--cells", "0,3"],
        env=process_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "JOBCAST_WORKER_CELLS names cell '3'" in done.stderr, done.stderr


def test_jobcast_cells_prints_where_tenants_live_and_the_line_that_pins_them(tmp_path: Path) -> None:
    with redis_cells(tmp_path, 2) as cells:
        urls = ",".join(c.url for c in cells)
        settings = make_settings("", redis_urls=urls, cell_placement="globex=0", api_keys="acme:k1,globex:k2,wayne:k3")
        done = subprocess.run(
            [sys.executable, "-m", "jobcast", "cells", "--if-cells", "3", "--json"],
            env=process_env(settings),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    places = {p["tenant"]: (p["cell"], p["placed_by"], p["would_be"]) for p in report["tenants"]}
    assert places == {"acme": (1, "hash", 1), "globex": (0, "override", 0), "wayne": (0, "hash", 2)}
    assert report["pin"] == "acme=1,globex=0,wayne=0"
    # Pinned, no tenant moves when the third cell is appended.
    pinned = Placement(3, parse_placement(report["pin"], 3))
    assert {t: pinned.tenant_cell(t) for t in places} == {"acme": 1, "globex": 0, "wayne": 0}


# --- placement and ids, without Redis ------------------------------------------------------------


def test_appending_a_cell_moves_about_one_tenant_in_n_and_only_to_the_new_cell() -> None:
    tenants = [f"tenant-{i}" for i in range(10_000)]
    before = {t: jump_hash(tenant_hash(t), 3) for t in tenants}
    after = {t: jump_hash(tenant_hash(t), 4) for t in tenants}
    moved = [t for t in tenants if before[t] != after[t]]
    assert {after[t] for t in moved} == {3}
    assert 0.2 < len(moved) / len(tenants) < 0.3  # ~1/4
    assert set(before.values()) == {0, 1, 2}
    # The hash is SHA-256's first 8 bytes: the same on every machine and Python version.
    assert tenant_hash("acme") == int.from_bytes(hashlib.sha256(b"acme").digest()[:8], "big")


def test_job_ids_name_their_cell_and_keep_the_format() -> None:
    for cell in (0, 1, 2, 1023):
        job_id = new_job_id(cell=cell)
        assert is_job_id(job_id) and len(job_id) == 30
        assert cell_of(job_id, 1024) == cell
    assert cell_of(new_job_id(cell=0), 1) == 0
    # With one cell every id is in it, whatever it says (ids made before cells say anything).
    assert cell_of("job_01M8VC9040FN7PY1XRCV8Y6XDV", 1) == 0
    # An id naming no cell here (made elsewhere, or before cells) is looked for in cell 0.
    assert Placement(3, {}).job_cell("job_01M8VC9040ZZ7PY1XRCV8Y6XDV") == 0
    assert Placement(3, {}).job_cell("job_01M8VC904002ZY1XRCV8Y6XDVA") == 2
    assert Placement(3, {}).job_cell("not-a-job") is None
    ids = [new_job_id(5, cell=2) for _ in range(100)]
    assert ids == sorted(ids) and len(set(ids)) == 100


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"redis_url": "redis://a:6379/0", "redis_urls": "redis://b:6379/0"}, "are both set"),
        ({"redis_urls": "redis://a:6379/0,,redis://b:6379/0"}, "has an empty entry"),
        ({"redis_urls": "redis://a:6379/0,redis://a:6379/0"}, "names the same Redis twice"),
        ({"redis_urls": "redis://a:6379/0,redis://b:6379/0", "cell_placement": "bigcorp=2"}, "in cell 2"),
        ({"cell_placement": "bigcorp"}, "is not tenant=cell"),
        ({"cell_placement": "bigcorp=0,bigcorp=0"}, "twice"),
    ],
)
def test_cell_settings_that_cannot_work_refuse_to_start(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(**{"secret_key": SECRET, "api_keys": "acme:k", **overrides})


def test_one_url_is_one_cell_and_a_copy_keeps_the_cells() -> None:
    settings = Settings(redis_url="redis://a:6379/0")
    assert settings.cell_urls == ["redis://a:6379/0"] and settings.served_cells == [0]
    cells = Settings(redis_urls="redis://a:6379/0, redis://b:6379/0", cell_placement="acme=1", worker_cells="1")
    copy = cells.model_copy(update={"max_queued": 10})
    assert copy.cell_urls == ["redis://a:6379/0", "redis://b:6379/0"]
    assert copy.placement.tenant_cell("acme") == 1 and copy.served_cells == [1]


def test_sentinel_urls_keep_their_commas_in_the_list_of_cells() -> None:
    sentinels = "redis+sentinel://s1:26379,s2:26379,[::1]:26380/cell0/0"
    settings = Settings(redis_urls=f"{sentinels}, redis://b:6379/0,redis+sentinel://s3:26379,s4/cell2")
    assert settings.cell_urls == [sentinels, "redis://b:6379/0", "redis+sentinel://s3:26379,s4/cell2"]
