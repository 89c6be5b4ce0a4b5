"""The scripts on a real Redis Cluster: three masters on local ports (``redis-cli --cluster create``).

Every op of ``lua/jobs.lua`` and the other scripts run for cells whose hash tags land on three
different masters, through redis-py's cluster client; every key they leave is in its cell's slot.
A script given a key of another slot fails loudly (the ``#!lua`` shebang), where the same script
without the shebang would have written it. The full system is not run on a cluster (arq is not
cluster-aware); only the scripts are.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from arq.constants import in_progress_key_prefix
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from jobcast.cli.embedded_redis import find_redis_server, free_port
from jobcast.worker import schema
from jobcast.worker.clock import now
from jobcast.worker.models import JobError, JobStatus, Priority
from jobcast.worker.store import Store

from .children import spawn
from .conftest import make_settings, wait_until

CLAIM = resources.files("worker").joinpath("lua/claim.lua").read_text()
WEBHOOK = {
    "url": "https://hooks.example.com/x",
    "events": ["job.queued", "job.processing", "job.progress", "job.retrying", "job.completed", "job.failed"],
}
TERMINAL = [status.value for status in JobStatus if status.terminal]
ERROR = JobError(type="boom", message="it broke", retryable=True, attempt=1)


def _port_pair() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(50):
        port = free_port()
        if port + 10000 < 65536:
            with contextlib.suppress(OSError), contextlib.closing(socket.socket()) as s:
                s.bind(("127.0.0.1", port + 10000))
                return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Three masters, slots split by ``redis-cli --cluster create``; their ports."""
    server = find_redis_server()
    cli = shutil.which("redis-cli") or str(Path(server).with_name("redis-cli"))
    processes: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for n in range(3):
            folder = tmp_path_factory.mktemp(f"cluster{n}")
            port = _port_pair()
            args = [
                server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                "--cluster-enabled", "yes", "--cluster-config-file", str(folder / "nodes.conf"),
                "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no",
                "--logfile", str(folder / "redis.log"),
            ]  # fmt: skip
            processes.append(spawn(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports.append(port)
        for port in ports:
            _wait(lambda port=port: _ping(port), f"node {port} to answer")
        nodes = [f"127.0.0.1:{p}" for p in ports]
        created = subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stdout.decode() + created.stderr.decode()
        for port in ports:
            _wait(lambda port=port: _cluster_ok(port), f"node {port} to report cluster_state:ok")
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _ping(port: int) -> bool:
    with contextlib.suppress(OSError, RedisError), SyncRedis(host="127.0.0.1", port=port) as r:
        return bool(r.ping())
    return False


def _cluster_ok(port: int) -> bool:
    with SyncRedis(host="127.0.0.1", port=port, decode_responses=True) as r:
        return "cluster_state:ok" in str(r.execute_command("CLUSTER", "INFO"))


@pytest.fixture
async def client(cluster: list[int]) -> AsyncIterator[RedisCluster]:
    c = RedisCluster(host="127.0.0.1", port=cluster[0], decode_responses=True)
    await c.initialize()
    await c.flushall()
    yield c
    await c.aclose()


def _node(client: RedisCluster, cell: int) -> str:
    node = client.get_node_from_key(schema.in_cell(schema.ARQ_QUEUE, cell))
    assert node is not None
    return str(node.name)


def _cells_on_different_masters(client: RedisCluster) -> list[int]:
    cells: dict[str, int] = {}
    for cell in range(100):
        cells.setdefault(_node(client, cell), cell)
        if len(cells) == 3:
            return sorted(cells.values())
    raise AssertionError(f"no three cells on three masters among 100: {cells}")


async def _major(client: RedisCluster) -> int:
    info = await client.info("server", target_nodes=RedisCluster.RANDOM)
    return int(str(info["redis_version"]).split(".")[0])


async def _every_op(client: RedisCluster, cell: int) -> dict[str, Any]:
    """Every op of jobs.lua (and the stream, rate and claim scripts) for cell ``cell``; returns what
    the checks below look at."""
    settings = make_settings("redis://unused:1/0", tenant_concurrency=1)
    redis = cast(Redis, client)  # the Store takes any redis-py asyncio client
    store = Store(redis, settings, cell=cell)
    script = schema.JobsScript(redis, settings, cell)
    lease = now()[1] + 60_000

    def create(**extra: Any) -> Any:
        return store.create(tenant="acme", job_type="sleep", params={"n": cell}, priority=Priority.HIGH, **extra)

    first = await create(max_attempts=3, webhook=WEBHOOK, idempotency_key="k", fingerprint="f")
    assert first.outcome == "created" and first.job_id
    assert (await create(max_attempts=3, webhook=WEBHOOK, idempotency_key="k", fingerprint="f")).outcome == "existing"
    one = first.job_id
    claimed = await schema.Script(redis, CLAIM)(
        keys=[schema.in_cell(schema.ARQ_QUEUE, cell)],
        args=[in_progress_key_prefix, now()[1] + 10, 60_000, 10, schema.arq_run_id(one, 1, cell=cell)],
    )
    assert claimed[0] == schema.arq_run_id(one, 1, cell=cell)
    assert await store.start(one, 1, lease) is not None
    assert await store.progress(one, 1, 50.0, "half", None)
    assert await store.heartbeat(lease, [(one, 1)]) == {(one, 1): "ok"}

    second = (await create(max_attempts=2)).job_id
    assert second and await store.start(second, 1, lease) is None  # parked: the tenant runs one already
    assert await store.complete(one, 1, '{"ok": true}') == "completed"  # ... and lets it go
    # A worker's claim: the parked run 1 is stale (dropped from the queue), run 2 starts.
    stale, current = (schema.arq_run_id(second, run, cell=cell) for run in (1, 2))
    assert [(c.job_id, c.run) for c in await store.claim([stale, current], lease, 10)] == [(second, 2)]
    assert await store.retry(second, 2, ERROR, 0.001) == "queued"
    await wait_until(lambda: _promoted(store), timeout=10)
    assert await store.start(second, 3, lease) is not None
    assert await store.fail(second, 3, ERROR) == "failed"

    third = (await create(max_attempts=1)).job_id
    assert third and await store.cancel(third, "acme") == ("cancelled", None)
    fourth = (await create(max_attempts=1)).job_id
    assert fourth and await store.start(fourth, 1, lease) is not None
    assert await store.cancel(fourth, "acme") == ("requested", None)
    assert await store.heartbeat(lease, [(fourth, 1)]) == {(fourth, 1): "cancel"}
    assert await store.mark_cancelled(fourth, 1) == "cancelled"
    fifth = (await create(max_attempts=1)).job_id
    assert fifth and await store.start(fifth, 1, lease) is not None
    assert await store.hand_back(fifth, 1) == "queued"
    assert await store.start(fifth, 2, 0) is not None  # its lease lapsed at once
    assert [(lapsed.job_id, lapsed.run) for lapsed in await store.overdue(now()[1])] == [(fifth, 2)]
    assert await store.reap(fifth, ERROR) == "failed"

    # Webhook deliveries of the first job: admitted, dead, replayed; its destination re-enabled.
    wids: list[str] = await client.lrange(schema.job_deliveries_key(one, cell=cell), 0, -1)  # type: ignore[misc]
    assert len(wids) == 4  # queued, processing, progress, completed
    assert await script("admit", wids[0], 1, 30_000) == ["send"]
    attempt = orjson.dumps({"at": now()[0], "status_code": 500}).decode()
    reply = await script("attempted", wids[0], 1, "dead", attempt, "HTTP 500", 0, "", 0)
    assert reply[:2] == ["ok", "dead"]
    assert await script("replay", wids[0], "acme") == "ok"
    assert await script("enable", "acme", "https://hooks.example.com:443") == "ok"

    # The archiver's eviction, of a job without deliveries.
    record = await store.get(third)
    assert record is not None
    tip = await store.log_tip("job", third)
    assert await script("evict", third, record.version, tip or "", 0) == ["evicted"]

    # An event stream opened on the first job's log, and a submission rate step.
    outcome, _, entries = await schema.StreamOpenScript(redis)(
        keys=[
            schema.job_log_key(one, cell=cell),
            schema.streams_key("acme", cell=cell),
            schema.job_key(one, cell=cell),
        ],
        args=["job", "acme", "", "replay", 100, now()[1], 60_000, 10, "slot-1", 1000, *TERMINAL],
    )
    assert outcome == "ok" and len(entries) == 4
    allowed = await schema.RateLimitScript(redis)(schema.rate_key("acme", cell=cell), 100, 1000)
    assert allowed[0] == 1
    records = {job_id: await store.get(job_id) for job_id in (one, second, fourth, fifth)}
    return {"records": records, "third": third}


async def _promoted(store: Store) -> bool:
    moved, _ = await store.promote()
    return moved == 1


async def test_every_script_op_runs_on_a_cluster_for_cells_on_three_masters(client: RedisCluster) -> None:
    cells = _cells_on_different_masters(client)
    outcomes = await asyncio.gather(*(_every_op(client, cell) for cell in cells))
    for cell, outcome in zip(cells, outcomes, strict=True):
        records = outcome["records"]
        statuses = [r.status for r in records.values()]
        assert statuses == [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.FAILED], cell
        one = next(iter(records.values()))
        assert [h["status"] for h in one.history] == ["queued", "processing", "completed"]
        assert one.params == {"n": cell}
    # Every key written is a key of one of the cells, on the master that holds the cell's slot.
    for node in client.get_primaries():
        keys = await client.keys("*", target_nodes=node)
        assert keys, f"no key on {node.name}: the cells were meant to spread over the masters"
        for key in keys:
            owner = next((c for c in cells if f"{{c{c}}}" in key), None)
            assert owner is not None, f"{key} carries no cell's tag"
            assert _node(client, owner) == node.name, f"{key} is on {node.name}, not on its cell's master"


async def test_a_script_given_a_key_of_another_slot_fails_loudly(client: RedisCluster) -> None:
    if await _major(client) < 7:
        pytest.skip("Redis < 7 has no script shebangs: nothing holds a script to its slot")
    home = _cells_on_different_masters(client)[0]
    neighbour = next(c for c in range(home + 1, 1000) if _node(client, c) == _node(client, home))
    assert key_slot(schema.tag(neighbour).encode()) != key_slot(schema.tag(home).encode())
    queue = schema.in_cell(schema.ARQ_QUEUE, home)
    stray = schema.arq_run_id("job_x", 1, cell=neighbour)  # its in-progress key is in the neighbour's slot
    await client.zadd(queue, {stray: 1})
    args: list[str | int] = [in_progress_key_prefix, now()[1], 60_000, 1, stray]
    redis = cast(Redis, client)
    with pytest.raises(ResponseError, match="do not hash to the same slot"):
        await schema.Script(redis, CLAIM)(keys=[queue], args=args)
    assert not await client.exists(in_progress_key_prefix + stray)
    # The same script without the shebang writes the stray key: the declaration is what stops it.
    assert await redis.register_script(CLAIM)(keys=[queue], args=args) == [stray, "1"]
    assert await client.exists(in_progress_key_prefix + stray)
    # A call that declares keys of two slots never leaves the client.
    store = Store(redis, make_settings("redis://unused:1/0"), cell=home)
    other = schema.job_key("job_01ARZ3NDEKTSV4RRFFQ69G5FAV", cell=neighbour)
    with pytest.raises(RedisClusterException):
        await schema.JobsScript(redis, store.settings, home)("cancel", "job_x", "acme", keys=[other])
