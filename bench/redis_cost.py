"""Redis's work per no-op job, counted: commands (``INFO commandstats``, Lua's inner calls included)
and instructions (valgrind's callgrind, repeatable on a shared machine), for comparing two versions
of the state machine.

    .venv/bin/python bench/redis_cost.py                 # this checkout
    .venv/bin/python bench/redis_cost.py --jobs 1000 --no-callgrind
    .venv/bin/python bench/redis_cost.py --progress 5        # a job that reports progress five times

One job's Redis work as the pipeline makes it (BENCHMARKS.md §2), minus polling: ``Store.create``,
``lua/claim.lua`` for its run, arq's ``run_job`` reads (MULTI GET INCR EXPIRE EXEC), ``Store.start``,
``Store.complete``, arq's ``finish_job`` (MULTI DEL ZREM EXEC), one after the other from one client.
redis-server runs under ``valgrind --tool=callgrind --instr-atstart=no``; instrumentation is on
only while the measured jobs run (after a warm-up): instructions (Ir) per job compare two versions
where CPU time on a shared machine cannot.

To compare with another version, run this file against that version's package, e.g. main's:
``git archive main server worker | tar -x -C /tmp/base`` laid out as ``/tmp/base/jobcast`` (server)
and ``/tmp/base/jobcast/worker`` (worker), then ``PYTHONPATH=/tmp/base .venv/bin/python
bench/redis_cost.py``; it prints which package it measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import re
import subprocess
import tempfile
import time
from importlib import resources

from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis.asyncio import Redis

import jobcast
from bench.harness import free_port
from jobcast.worker import schema
from jobcast.worker.models import Priority
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store


async def one_job(store: Store, redis: Redis, claim: object, progress: int = 0) -> None:
    created = await store.create(
        tenant="acme", job_type="bench.noop", params={}, priority=Priority.NORMAL, max_attempts=1
    )
    job_id = created.job_id or ""
    rid = schema.arq_run_id(job_id, 1)
    now_ms = time.time_ns() // 1_000_000
    await claim(keys=[schema.ARQ_QUEUE], args=[in_progress_key_prefix, now_ms + 1, 60_000, 1, rid])  # type: ignore[operator]
    async with redis.pipeline(transaction=True) as pipe:  # arq's run_job
        pipe.get(job_key_prefix + rid)
        pipe.incr(retry_key_prefix + rid)
        pipe.expire(retry_key_prefix + rid, 88_400)
        await pipe.execute()
    assert await store.start(job_id, 1, now_ms + 60_000) is not None
    for i in range(1, progress + 1):  # --progress: as ctx.progress() reports, one event each
        assert await store.progress(job_id, 1, 100 * i / (progress + 1), f"step {i}", None)
    assert await store.complete(job_id, 1, "null") == "completed"
    async with redis.pipeline(transaction=True) as pipe:  # arq's finish_job
        pipe.delete(retry_key_prefix + rid, in_progress_key_prefix + rid, job_key_prefix + rid)
        pipe.zrem(schema.ARQ_QUEUE, rid)
        await pipe.execute()


def commandstats(info: dict[str, object]) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items() if k.startswith("cmdstat_")}  # type: ignore[index]


async def measure(port: int, jobs: int, warmup: int, callgrind: bool, progress: int = 0) -> dict[str, float]:
    redis = Redis(port=port, decode_responses=True)
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", max_queued=10**9)
    store = Store(redis, settings)
    source = resources.files("jobcast.worker").joinpath("lua/claim.lua").read_text()
    claim = schema.Script(redis, source) if hasattr(schema, "Script") else redis.register_script(source)
    for _ in range(warmup):
        await one_job(store, redis, claim, progress)
    before = commandstats(await redis.info("commandstats"))
    if callgrind:
        subprocess.run(["callgrind_control", "-i", "on", str(PID)], check=True, capture_output=True)
    started = time.monotonic()
    for _ in range(jobs):
        await one_job(store, redis, claim, progress)
    elapsed = time.monotonic() - started
    if callgrind:
        subprocess.run(["callgrind_control", "-i", "off", str(PID)], check=True, capture_output=True)
    after = commandstats(await redis.info("commandstats"))
    await redis.aclose()
    calls = {name: (after.get(name, 0) - before.get(name, 0)) / jobs for name in after}
    calls.pop("info", None)
    return {"seconds": elapsed, **{f"cmd:{k}": v for k, v in calls.items() if v}}


PID = 0


def timer_instructions(out: str) -> int | None:
    """Instructions spent in serverCron and below (``callgrind_annotate --inclusive``), if installed."""
    try:
        annotated = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", out], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.search(r"^\s*([\d,]+) .*:serverCron ", annotated, re.M)
    return int(found[1].replace(",", "")) if found else None


def main() -> None:
    global PID
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--no-callgrind", action="store_true")
    parser.add_argument("--progress", type=int, default=0, help="progress events per job (default: none, a no-op job)")
    parser.add_argument("--keep", help="copy the callgrind output to this file (for callgrind_annotate)")
    args = parser.parse_args()
    callgrind = not args.no_callgrind
    print(f"package measured: {Path(jobcast.__file__).parent}")
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        command = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", folder]
        if callgrind:
            out = f"{folder}/callgrind.out"
            command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *command]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        PID = process.pid
        try:
            deadline = time.monotonic() + 60
            ping = ["redis-cli", "-p", str(port), "ping"]
            while subprocess.run(ping, capture_output=True).stdout.strip() != b"PONG":
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start")
                time.sleep(0.2)
            result = asyncio.run(measure(port, args.jobs, args.warmup, callgrind, args.progress))
        finally:
            process.terminate()
            process.wait(timeout=60)
        commands = sum(v for k, v in result.items() if k.startswith("cmd:"))
        print(f"jobs {args.jobs}: {commands:.1f} Redis commands per job (Lua's included)")
        for key, value in sorted(result.items(), key=lambda kv: -kv[1]):
            if key.startswith("cmd:"):
                print(f"  {key[4:]:<16} {value:.2f}")
        if callgrind:
            text = Path(out).read_text(errors="replace")
            totals = re.search(r"^totals:\s+(\d+)", text, re.M)
            instructions = int(totals[1]) if totals else 0
            print(f"redis-server instructions per job: {instructions / args.jobs:,.0f}")
            timer = timer_instructions(out)
            if timer is not None:
                # serverCron runs hz times a second whatever the jobs do, so its share follows the
                # run's wall time (longer on a loaded machine): the rest compares versions better.
                print(
                    f"  of which redis-server's timer (serverCron): {timer / args.jobs:,.0f}; "
                    f"without it: {(instructions - timer) / args.jobs:,.0f}"
                )
            if args.keep:
                Path(args.keep).write_text(text)


if __name__ == "__main__":
    main()
