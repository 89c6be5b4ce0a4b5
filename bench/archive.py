"""The archive (issue 14): the bulk move from Redis to SQL, and reads of archived jobs.

    .venv/bin/python bench/archive.py                      # 20k jobs, SQLite and PostgreSQL
    .venv/bin/python bench/archive.py --jobs 100000 --backends postgresql

Everything runs on 127.0.0.1: a fresh redis-server per backend, a SQLite file in a temporary folder
or a PostgreSQL database created for the run and dropped after it (as the tests make theirs:
``tests/sqldb.py``; ``JOBCAST_TEST_POSTGRES`` names another server's maintenance database).

1. move       N queued no-op jobs are run by one real ``jobcast worker`` (its own archiver told to
              wait a day): its completion rate, from its first completion to its last, is the
              reference. The worker stopped, one archiver moves the N finished jobs (each with its
              3 events: queued, processing, completed) as a worker's archiver does (batches of
              ``JOBCAST_ARCHIVE_BATCH``, 500). Ratio archive rate / worker rate, both of this run.
              Redis memory (``used_memory``) before the jobs, with them, and after the move.
2. reads      ``GET /jobs/{id}`` on a ``jobcast web`` process, one connection, for live finished jobs
              and archived ones, interleaved: p50 and p99, ratio archived/live.
3. keyset     ``GET /jobs?limit=20`` for page 1 and for a page deep in the archive (cursor at the
              N-40th newest job): p50, ratio deep/first.
4. steady     ``--steady-jobs`` no-op jobs submitted (queue kept under 1,000) to one real
              ``jobcast worker`` whose own archiver moves them ``--after`` (5) s after they
              finished: the worker's completion rate, how long after the last completion the archive
              held every job, and Redis memory along the run (flat means the archive keeps up).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import random
import tempfile
import time
from collections.abc import Iterator

from redis.asyncio import Redis

from bench.harness import AUTH, TENANT, Processes, jobcast_env, machine, percentile, ratio, say, section, table
from bench.http_client import Connection
from jobcast.worker import jobstats, schema
from jobcast.worker.archive import Archive
from jobcast.worker.archiver import Archiver
from jobcast.worker.models import Priority
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store
from tests.sqldb import archive_url

#: Part 1's worker archives nothing itself: its jobs are moved afterwards, by the archiver measured.
WORKER_KEEPS_S = 86_400

MOVE_HEADERS = [
    "archive",
    "jobs",
    "one worker: completed/s",
    "archiver: archived/s",
    "archive/worker",
    "Redis MiB: empty/full/after",
]


@contextlib.contextmanager
def database(backend: str, folder: Path) -> Iterator[str]:
    """The test suite's own: a SQLite file, or a PostgreSQL database made and dropped for the run."""
    with archive_url(backend, folder) as url:
        yield url


async def finish_jobs(store: Store, count: int, tasks: int = 32) -> list[str]:
    ids: list[str] = []

    async def one(i: int) -> None:
        created = await store.create(
            tenant=TENANT, job_type="bench.noop", params={"n": i}, priority=Priority.NORMAL, max_attempts=1
        )
        assert created.job_id is not None
        await store.start(created.job_id, 1, time.time_ns() // 1_000_000 + 600_000)
        await store.complete(created.job_id, 1, "null")
        ids.append(created.job_id)

    async def lane(start: int) -> None:
        for i in range(start, count, tasks):
            await one(i)

    await asyncio.gather(*(lane(t) for t in range(tasks)))
    return sorted(ids)


async def submit_jobs(store: Store, count: int, tasks: int = 32) -> list[str]:
    """``count`` queued no-op jobs, for a worker to run."""
    ids: list[str] = []

    async def lane(start: int) -> None:
        for i in range(start, count, tasks):
            created = await store.create(
                tenant=TENANT, job_type="bench.noop", params={"n": i}, priority=Priority.NORMAL, max_attempts=1
            )
            assert created.job_id is not None
            ids.append(created.job_id)

    await asyncio.gather(*(lane(t) for t in range(tasks)))
    return sorted(ids)


async def completed(redis: Redis) -> int:
    stats = jobstats.series(await redis.hgetall(schema.STATS))  # type: ignore[misc]
    return int(stats.get("completed|bench.noop", 0))


async def completion_rate(redis: Redis, count: int) -> float:
    """Jobs/s of the worker that runs the ``count`` queued jobs: from its first completion to its last
    (its start-up is not counted)."""
    while not await completed(redis):
        await asyncio.sleep(0.01)
    first, t0 = await completed(redis), time.perf_counter()
    while (done := await completed(redis)) < count:
        await asyncio.sleep(0.05)
    return (done - first) / (time.perf_counter() - t0)


async def latencies(port: int, paths: list[str]) -> list[float]:
    conn = Connection("127.0.0.1", port)
    out = []
    try:
        for path in paths:
            t0 = time.perf_counter()
            status, _ = await conn.request("GET", path, headers={"Authorization": AUTH})
            out.append((time.perf_counter() - t0) * 1000)
            assert status == 200, (path, status)
    finally:
        await conn.close()
    return out


async def run_backend(backend: str, args: argparse.Namespace, folder: Path) -> dict[str, list[object]]:
    rows: dict[str, list[object]] = {}
    with Processes(folder / backend) as procs, database(backend, folder / backend) as url:
        redis_server = procs.redis()
        settings = Settings(
            redis_url=redis_server.url,
            archive_url=url,
            archive_after_s=0,
            max_queued=int(jobcast_env("")["JOBCAST_MAX_QUEUED"]),  # all N queued at once, as the worker's own cap
            env="development",
            log_level="WARNING",
        )
        redis = Redis.from_url(redis_server.url, decode_responses=True)
        archive = Archive(url)
        await archive.migrate()
        store = Store(redis, settings, archive)
        try:
            empty = int((await redis.info("memory"))["used_memory"])
            say(f"{backend}: {args.jobs} no-op jobs through one jobcast worker")
            ids = await submit_jobs(store, args.jobs)
            worker = procs.jobcast_worker(
                redis_server.url, JOBCAST_ARCHIVE_URL=url, JOBCAST_ARCHIVE_AFTER_S=str(WORKER_KEEPS_S)
            )
            worker_rate = await completion_rate(redis, args.jobs)
            procs.stop(worker)
            full = int((await redis.info("memory"))["used_memory"])
            say(f"{backend}: archiving them")
            archiver = Archiver(redis, settings, archive)
            t0 = time.perf_counter()
            while await archiver.drain():  # what a worker's archiver runs
                pass
            moved_s = time.perf_counter() - t0
            after = int((await redis.info("memory"))["used_memory"])
            assert await archive.count() == args.jobs
            rows["move"] = [
                backend,
                args.jobs,
                f"{worker_rate:,.0f}",
                f"{args.jobs / moved_s:,.0f}",
                f"{args.jobs / moved_s / worker_rate:.2f}x",
                f"{empty / 2**20:.1f} / {full / 2**20:.1f} / {after / 2**20:.1f}",
            ]

            live = await finish_jobs(store, 200)
            archived_sample = random.sample(ids, 200)
            _, port = procs.jobcast_web(redis_server.url, JOBCAST_ARCHIVE_URL=url, JOBCAST_ARCHIVE_AFTER_S="0")
            paths = [
                p for pair in zip(live, archived_sample, strict=True) for p in (f"/jobs/{pair[0]}", f"/jobs/{pair[1]}")
            ]
            await latencies(port, paths[:100])  # warm-up
            times = await latencies(port, paths * args.rounds)
            live_ms, archived_ms = times[0::2], times[1::2]
            rows["reads"] = [
                backend,
                f"{percentile(live_ms, 50):.2f} / {percentile(live_ms, 99):.2f}",
                f"{percentile(archived_ms, 50):.2f} / {percentile(archived_ms, 99):.2f}",
                ratio(percentile(archived_ms, 50), percentile(live_ms, 50)),
            ]

            deep_cursor = ids[40]  # only 40 older jobs below it: the last pages of the archive
            first = ["/jobs?limit=20&type=bench.noop&created_before=2999-01-01T00:00:00Z"] * 100
            deep = [f"/jobs?limit=20&type=bench.noop&cursor={deep_cursor}"] * 100
            interleaved = [p for pair in zip(first, deep, strict=True) for p in pair]
            times = await latencies(port, interleaved * args.rounds)
            first_ms, deep_ms = times[0::2], times[1::2]
            rows["keyset"] = [
                backend,
                f"{percentile(first_ms, 50):.2f}",
                f"{percentile(deep_ms, 50):.2f}",
                ratio(percentile(deep_ms, 50), percentile(first_ms, 50)),
            ]
        finally:
            await redis.aclose()
            await archive.close()
    return rows


async def steady(backend: str, args: argparse.Namespace, folder: Path) -> list[object]:
    """Jobs through a real ``jobcast worker`` whose own archiver moves them ``--after`` s after
    they finished: the worker's completion rate, the archiver's, Redis memory along the run."""
    with Processes(folder / f"steady-{backend}") as procs, database(backend, folder / f"steady-{backend}") as url:
        redis_server = procs.redis()
        settings = Settings(redis_url=redis_server.url, archive_url=url, env="development", log_level="WARNING")
        archive = Archive(url)
        await archive.migrate()
        procs.jobcast_worker(
            redis_server.url,
            JOBCAST_ARCHIVE_URL=url,
            JOBCAST_ARCHIVE_AFTER_S=str(args.after),
            JOBCAST_MAINTENANCE_S="1",
        )
        redis = Redis.from_url(redis_server.url, decode_responses=True)
        store = Store(redis, settings, archive)
        memory: list[float] = []
        backlog: list[int] = []
        submitted = 0

        async def submit(lane: int) -> None:
            nonlocal submitted
            while submitted < args.steady_jobs:
                # Keep the queue short: what is measured is the flow.
                if int(await redis.get(schema.QUEUED_COUNT) or 0) > 1000:
                    await asyncio.sleep(0.05)
                    continue
                if submitted >= args.steady_jobs:  # another lane took the last one meanwhile
                    return
                submitted += 1
                await store.create(
                    tenant=TENANT, job_type="bench.noop", params={}, priority=Priority.NORMAL, max_attempts=1
                )

        async def sample() -> None:
            # What the jobcast_archive_backlog gauge shows: finished jobs past ARCHIVE_AFTER still in Redis.
            last_said = time.perf_counter()
            while True:
                memory.append(int((await redis.info("memory"))["used_memory"]) / 2**20)
                due = time.time_ns() // 1_000_000 - args.after * 1000
                backlog.append(int(await redis.zcount(schema.FINISHED, "-inf", due)))
                if time.perf_counter() - last_said >= 30:  # a long run says how it goes
                    last_said = time.perf_counter()
                    say(
                        f"{backend}: {time.perf_counter() - t0:.0f} s, {await completed(redis)} completed, "
                        f"{await redis.zcard(schema.FINISHED)} finished in Redis, backlog {backlog[-1]}, "
                        f"Redis {memory[-1]:.1f} MiB"
                    )
                await asyncio.sleep(2)

        try:
            sampler = asyncio.create_task(sample())
            t0 = time.perf_counter()
            await asyncio.gather(*(submit(lane) for lane in range(8)))
            while await completed(redis) < args.steady_jobs:
                await asyncio.sleep(0.2)
            completed_s = time.perf_counter() - t0
            while await redis.zcard(schema.FINISHED):
                await asyncio.sleep(0.2)
            drained_s = time.perf_counter() - t0
            sampler.cancel()
            archived = await archive.count()
            assert archived == args.steady_jobs, (archived, await completed(redis), submitted)
            quarters = [memory[min(len(memory) - 1, len(memory) * q // 4)] for q in (1, 2, 3, 4)]
            tenths = [memory[min(len(memory) - 1, len(memory) * q // 10)] for q in range(11)]
            say(f"{backend}: Redis MiB at 0, 10, ..., 100% of the run: " + " / ".join(f"{m:.1f}" for m in tenths))
            say(f"{backend}: Redis MiB max {max(memory):.1f}, {len(memory)} samples every 2 s")
            return [
                backend,
                args.steady_jobs,
                f"{args.steady_jobs / completed_s:,.0f}",
                f"{max(backlog)}",
                f"{drained_s - completed_s:.1f}",
                " / ".join(f"{m:.1f}" for m in quarters),
                f"{int((await redis.info('memory'))['used_memory']) / 2**20:.1f}",
            ]
        finally:
            await redis.aclose()
            await archive.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the read samples")
    parser.add_argument("--steady-jobs", type=int, default=30_000, help="jobs through a worker (part 4; 0: skip)")
    parser.add_argument("--after", type=int, default=5, help="JOBCAST_ARCHIVE_AFTER_S of part 4")
    parser.add_argument("--only-steady", action="store_true", help="part 4 alone")
    args = parser.parse_args()
    print(table(["", ""], list(machine().items())))
    results = []
    with tempfile.TemporaryDirectory(prefix="jobcast-bench-archive-") as tmp:
        for backend in args.backends.split(","):
            results.append({} if args.only_steady else asyncio.run(run_backend(backend, args, Path(tmp))))
            for part, row in results[-1].items():  # each backend's rows as soon as they are measured
                say(f"{backend} {part}: {' | '.join(map(str, row))}")
            if args.steady_jobs:
                results[-1]["steady"] = asyncio.run(steady(backend, args, Path(tmp)))
                say(f"{backend} steady: {' | '.join(map(str, results[-1]['steady']))}")
    if not args.only_steady:
        print_parts(args, results)
    if args.steady_jobs:
        with section(f"4. Through one worker, archived {args.after} s after finishing"):
            headers = [
                "archive",
                "jobs",
                "worker: completed/s",
                "max backlog (jobs past ARCHIVE_AFTER in Redis)",
                "last completion to all archived, s",
                "Redis MiB at 25/50/75/100% of the run",
                "Redis MiB once all archived",
            ]
            print(table(headers, [r["steady"] for r in results]))


def print_parts(args: argparse.Namespace, results: list[dict[str, list[object]]]) -> None:
    with section("1. The bulk move"):
        print(table(MOVE_HEADERS, [r["move"] for r in results]))
    with section("2. GET /jobs/{id}, ms (p50 / p99)"):
        print(table(["archive", "live", "archived", "archived/live p50"], [r["reads"] for r in results]))
    with section("3. Keyset pages, GET /jobs?limit=20, p50 ms"):
        headers = ["archive", "page 1", f"page {args.jobs // 20 - 2} (by cursor)", "deep/first"]
        print(table(headers, [r["keyset"] for r in results]))


if __name__ == "__main__":
    main()
