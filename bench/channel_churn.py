"""Channel churn: what a tenant's only listener pays for its channel's SUBSCRIBE (issue 13).

    .venv/bin/python bench/channel_churn.py                  # 300 opens per side, 2 rounds
    .venv/bin/python bench/channel_churn.py --opens 1000 --rounds 1
    .venv/bin/python bench/channel_churn.py --storm 1000     # only the storm below

One Jobcast server, one running job. One client opens the job's event stream, reads its two
replayed events and closes it, ``--opens`` times in a row, so the tenant never has two listeners at
once — the worst case for per-tenant channels: with the channel's linger (the default) only the
first open subscribes; with ``BENCH_LINGER_S=0`` (read by :mod:`bench.serve`) every open waits for
a SUBSCRIBE's reply and every close sends an UNSUBSCRIBE. Figures per open: wall ms (p50, p99)
and the server's CPU ms. Both sides run in the same run, alternating; in a checkout without
per-tenant channels both sides are that checkout's one path (the reference).

``--storm N``: a hub in this process (no HTTP) gets listeners of N tenants at once, and then loses
them all; printed: how long until every subscription is confirmed, and how many SUBSCRIBE and
UNSUBSCRIBE commands Redis ran for it (``INFO commandstats``): the hub batches what is queued.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import tempfile
import time

import httpx

from bench.harness import AUTH, CpuMeter, Processes, percentile, say, table
from bench.sse_fanout import new_running_job
from jobcast.hub import Hub
from jobcast.worker.settings import Settings
from jobcast.worker.store import redis_client

SIDES = {"linger (default)": {}, "no linger": {"BENCH_LINGER_S": "0"}}


async def opens(port: int, job_id: str, count: int) -> list[float]:
    """Open the stream, read the two replayed events, close; ``count`` times; ms each."""
    took: list[float] = []
    url = f"http://127.0.0.1:{port}/jobs/{job_id}/events"
    async with httpx.AsyncClient(headers={"Authorization": AUTH}, timeout=30) as client:
        for _ in range(count):
            started = time.perf_counter()
            async with client.stream("GET", url) as response:
                assert response.status_code == 200, response.status_code
                events = 0
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        events += 1
                        if events == 2:
                            break
            took.append((time.perf_counter() - started) * 1000)
    return took


async def storm(redis_url: str, tenants: int) -> None:
    redis = redis_client(Settings(redis_url=redis_url))
    hub = Hub(redis)
    await hub.start()
    await hub.connected.wait()
    await redis.config_resetstat()
    confirmed, release = asyncio.Event(), asyncio.Event()
    entered = 0

    async def listen(tenant: str) -> None:
        nonlocal entered
        async with hub.subscribe("tenant", tenant, tenant):
            entered += 1
            if entered == tenants:
                confirmed.set()
            await release.wait()

    started = time.perf_counter()
    listeners = [asyncio.create_task(listen(f"tenant-{i}")) for i in range(tenants)]
    await confirmed.wait()
    took = time.perf_counter() - started
    hub.channels.linger_s = 0
    release.set()
    await asyncio.gather(*listeners)
    while hub.channels.subscribed:
        await asyncio.sleep(0.01)
    stats = await redis.info("commandstats")
    print(
        f"{tenants} tenants subscribed and confirmed in {took * 1000:.0f} ms; "
        f"SUBSCRIBE commands: {stats['cmdstat_subscribe']['calls']}, "
        f"UNSUBSCRIBE commands: {stats['cmdstat_unsubscribe']['calls']}"
    )
    await hub.stop()
    await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--opens", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--storm", type=int, help="only the storm: listeners of this many tenants at once")
    args = parser.parse_args()
    rows = []
    with Processes(Path(tempfile.mkdtemp(prefix="jobcast-bench-churn-"))) as procs:
        redis_server = procs.redis()
        if args.storm:
            asyncio.run(storm(redis_server.url, args.storm))
            return
        job_id = asyncio.run(new_running_job(Settings(redis_url=redis_server.url)))
        for round_ in range(args.rounds):
            for side, env in SIDES.items():
                web, port = procs.jobcast_web(redis_server.url, name=f"web-{round_}-{len(rows)}", **env)
                asyncio.run(opens(port, job_id, 20))  # warm up (imports, script cache, first subscribe)
                meter = CpuMeter({"server": web.pid})
                meter.start()
                took = asyncio.run(opens(port, job_id, args.opens))
                cpu = meter.stop()["server"]
                procs.stop(web)
                say(f"{side}: {meter.summary()}")
                rows.append(
                    [
                        side,
                        round_ + 1,
                        f"{percentile(took, 50):.2f}",
                        f"{percentile(took, 99):.2f}",
                        f"{cpu * 1000 / args.opens:.2f}",
                        f"{meter.others:.1f}",
                    ]
                )
    print(table(["side", "round", "p50 ms/open", "p99 ms/open", "server CPU ms/open", "not-ours CPU s"], rows))


if __name__ == "__main__":
    main()
