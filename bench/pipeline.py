"""The job pipeline under load: Jobcast side by side with raw arq (issue 7).

    .venv/bin/python bench/pipeline.py                       # every part, 20k jobs
    .venv/bin/python bench/pipeline.py --jobs 100000 --parts throughput
    .venv/bin/python bench/pipeline.py --parts pickup,submit

Everything runs on 127.0.0.1: a fresh redis-server per run, a Jobcast server (what ``jobcast web``
runs, warning logs, no access log) and ``jobcast worker`` processes with the ``bench.noop`` job type
(:mod:`bench.jobtypes`), or raw arq workers (:mod:`bench.arq_ref`: same concurrency, 10 ms poll,
orjson). Load clients run in processes of their own (:mod:`bench.submitters`).

1. throughput  N no-op jobs POSTed over HTTP by 32 connections, each tracked to ``completed``
               (the status index, polled every 20 ms), with all 3 events (queued, processing,
               completed) checked in the tenant's log; vs N arq jobs enqueued by arq's
               ``enqueue_job`` from 32 tasks and run by an arq worker. Ratio Jobcast/arq.
2. pickup      time from ``job.queued`` to ``job.processing`` (both timestamps from the job's event
               log, stamped just before the create and the start Lua calls), jobs submitted one at
               a time with random gaps; with an idle worker and with a busy one (5 of its 10 slots
               held by running jobs that report progress, plus ~100 no-op jobs/s). Reference: arq's
               enqueue -> start times, with its default 0.5 s poll and with the 10 ms poll.
3. submit      ``POST /jobs`` on one server process without workers, under ``wrk`` (1 thread, 32
               connections, 5 s), vs a bare Starlette endpoint doing one Redis SET
               (:mod:`bench.serve`), same uvicorn settings, alternating rounds.
4. round trips ``INFO`` deltas over the throughput runs, per job: requests Redis read
               (``total_reads_processed``, i.e. round trips), commands it executed (Lua's included),
               Redis CPU; and the commands by name.
5. scaling     throughput with 2 and 4 worker processes (1 is part 1), Jobcast and arq; memory
               (RSS) of the server and the worker at 10%, 50% and 100% of the N jobs of part 1
               (printed with part 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import multiprocessing
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import redis as redis_sync
from arq.constants import default_queue_name as arq_queue_name  # raw arq's queue, not Jobcast's

from bench import harness, submitters
from bench.harness import TENANT, Processes, percentile, ratio, say, table
from bench.http_client import Connection
from jobcast.worker import schema

SUBMIT_CONCURRENCY = 32
WORKER_CONCURRENCY = 10
ARQ_POLL_S = 0.01
WARMUP_JOBS = 300
POLL_S = 0.02


# --- Redis accounting ------------------------------------------------------------------------------


def redis_stats(r: redis_sync.Redis) -> dict[str, Any]:
    info = r.info("all")
    return {
        "reads": info["total_reads_processed"],
        "commands": info["total_commands_processed"],
        "cpu": info["used_cpu_sys"] + info["used_cpu_user"],
        "net_in": info["total_net_input_bytes"],
        "memory": info["used_memory"],
        "cmd": {k.removeprefix("cmdstat_"): v["calls"] for k, v in info.items() if k.startswith("cmdstat_")},
    }


def per_job(before: dict[str, Any], after: dict[str, Any], jobs: int, own_requests: int) -> dict[str, Any]:
    """What Redis did per job between two snapshots, minus this process's own polling."""
    cmd = {k: (v - before["cmd"].get(k, 0)) / jobs for k, v in after["cmd"].items()}
    return {
        "round_trips": (after["reads"] - before["reads"] - own_requests) / jobs,
        "commands": (after["commands"] - before["commands"] - own_requests) / jobs,
        "cpu_us": 1e6 * (after["cpu"] - before["cpu"]) / jobs,
        "bytes_in": (after["net_in"] - before["net_in"]) / jobs,
        "memory": (after["memory"] - before["memory"]) / jobs,
        "cmd": {k: v for k, v in cmd.items() if v > 0},
    }


# --- (1) throughput, (4) round trips, (5) scaling and memory ---------------------------------------------


@dataclass
class Throughput:
    system: str
    workers: int
    jobs: int
    seconds: float = float("nan")
    submit_seconds: float = float("nan")
    statuses: dict[int, int] = field(default_factory=dict)
    submit_latencies: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    others: float = 0.0
    redis: dict[str, Any] = field(default_factory=dict)
    memory: list[tuple[str, dict[str, int]]] = field(default_factory=list)
    events_ok: str = ""
    profiles: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds


def spawn(target: Any, *args: Any) -> tuple[multiprocessing.process.BaseProcess, Any]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    return proc, parent


def tenant_log_added(r: redis_sync.Redis) -> int:
    try:
        return int(r.xinfo_stream(schema.tenant_log_key(TENANT))["entries-added"])
    except redis_sync.ResponseError:
        return 0


def jobcast_throughput(args: argparse.Namespace, jobs: int, workers: int, folder: Path) -> Throughput:
    result = Throughput("Jobcast", workers, jobs)
    with Processes(folder) as procs:
        redis_server = procs.redis()
        web, port = procs.jobcast_web(redis_server.url)
        worker_procs = [
            procs.jobcast_worker(redis_server.url, name=f"worker{i}", JOBCAST_WORKER_CONCURRENCY=str(args.concurrency))
            for i in range(workers)
        ]
        r = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
        completed = schema.index_key(TENANT, status="completed")
        say(f"Jobcast, {workers} worker(s): warming up with {WARMUP_JOBS} jobs")
        proc, pipe = spawn(submitters.http_jobs, port, WARMUP_JOBS, SUBMIT_CONCURRENCY)
        pipe.recv()
        proc.join()
        wait_for(lambda: r.zcard(completed) >= WARMUP_JOBS, 60, "warm-up jobs to complete", worker_procs)

        pids = {"server": web.pid, **{p.name: p.pid for p in worker_procs}, "redis": redis_server.process.pid}  # type: ignore[union-attr]
        meter = harness.CpuMeter(pids)
        before, added_before, polls = redis_stats(r), tenant_log_added(r), 0
        say(f"Jobcast, {workers} worker(s): {jobs} jobs over HTTP")
        profilers = []
        if args.profile:
            profilers = [
                (name, harness.Profiler(pid, folder / f"{name}.pyspy")) for name, pid in pids.items() if name != "redis"
            ]
        meter.start()
        proc, pipe = spawn(submitters.http_jobs, port, jobs, SUBMIT_CONCURRENCY)
        marks = [0.1, 0.5, 1.0]
        submitted: dict[str, Any] | None = None
        deadline = time.monotonic() + max(120, jobs / 100)
        while True:
            done = r.zcard(completed) - WARMUP_JOBS
            polls += 1
            if marks and done >= marks[0] * jobs:
                sample = {"server": web.rss_kib(), **{p.name: p.rss_kib() for p in worker_procs}}
                result.memory.append((f"{round(100 * marks.pop(0))}%", sample))
            if done >= jobs:
                end = time.time()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{done} of {jobs} jobs completed in time:\n{worker_procs[0].tail()}")
            if submitted is None and pipe.poll(0):
                submitted = pipe.recv()
            time.sleep(POLL_S)
        if submitted is None:
            submitted = pipe.recv()
        proc.join()
        result.cpu = meter.stop()
        for name, profiler in profilers:
            profiler.stop()
            result.profiles.append(profiler.report(f"Jobcast {name}, {jobs} jobs", count=25))
        result.cpu["client"] = submitted["cpu"]
        result.others = meter.others
        result.seconds = end - submitted["t0"]
        result.submit_seconds = submitted["t1"] - submitted["t0"]
        result.statuses = submitted["statuses"]
        result.submit_latencies = submitted["latencies"]
        result.redis = per_job(before, redis_stats(r), jobs, polls)
        added = tenant_log_added(r) - added_before
        result.events_ok = f"{added}/{3 * jobs} events in the tenant log" + (" ✓" if added == 3 * jobs else " ✗")
        r.close()
    return result


def arq_throughput(args: argparse.Namespace, jobs: int, workers: int, folder: Path) -> Throughput:
    result = Throughput("arq", workers, jobs)
    with Processes(folder) as procs:
        redis_server = procs.redis()
        worker_procs = [
            procs.start(
                f"arq{i}",
                [sys.executable, "-m", "bench.arq_ref", "--redis-url", redis_server.url,
                 "--max-jobs", str(args.concurrency), "--poll-delay", str(ARQ_POLL_S)],
                harness.jobcast_env(redis_server.url),
            )
            for i in range(workers)
        ]  # fmt: skip
        r = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
        say(f"arq, {workers} worker(s): warming up with {WARMUP_JOBS} jobs")
        proc, pipe = spawn(submitters.arq_jobs, redis_server.url, WARMUP_JOBS, SUBMIT_CONCURRENCY)
        pipe.recv()
        proc.join()
        wait_for(lambda: r.zcard(arq_queue_name) == 0, 60, "warm-up jobs to complete", worker_procs)

        pids = {**{p.name: p.pid for p in worker_procs}, "redis": redis_server.process.pid}  # type: ignore[union-attr]
        meter = harness.CpuMeter(pids)
        before, polls = redis_stats(r), 0
        say(f"arq, {workers} worker(s): {jobs} jobs with enqueue_job")
        meter.start()
        proc, pipe = spawn(submitters.arq_jobs, redis_server.url, jobs, SUBMIT_CONCURRENCY)
        deadline = time.monotonic() + max(120, jobs / 100)
        submitted: dict[str, Any] | None = None
        while True:
            if submitted is None and pipe.poll(0):
                submitted = pipe.recv()
            if submitted is not None:
                polls += 1
                if r.zcard(arq_queue_name) == 0:  # a job leaves arq's queue when it finishes
                    end = time.time()
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"arq did not finish {jobs} jobs in time:\n{worker_procs[0].tail()}")
            time.sleep(POLL_S)
        proc.join()
        result.cpu = meter.stop()
        result.cpu["client"] = submitted["cpu"]
        result.others = meter.others
        result.seconds = end - submitted["t0"]
        result.submit_seconds = submitted["t1"] - submitted["t0"]
        result.statuses = submitted["statuses"]
        result.submit_latencies = submitted["latencies"]
        result.redis = per_job(before, redis_stats(r), jobs, polls)
        results = sum(1 for _ in r.scan_iter("arq:result:*", count=1000))
        result.events_ok = f"{results - WARMUP_JOBS}/{jobs} results stored" + (
            " ✓" if results - WARMUP_JOBS == jobs else " ✗"
        )
        r.close()
    return result


def wait_for(predicate: Any, timeout: float, what: str, procs: list[harness.Proc]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline or not all(p.alive() for p in procs):
            raise RuntimeError(f"timed out waiting for {what}:\n{procs[0].tail()}")
        time.sleep(0.05)


# --- (2) pickup latency ---------------------------------------------------------------------------------


def iso_ms(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000


def jobcast_pickup(args: argparse.Namespace, folder: Path, *, busy: bool) -> list[float]:
    with Processes(folder) as procs:
        redis_server = procs.redis()
        _, port = procs.jobcast_web(redis_server.url)
        worker = procs.jobcast_worker(redis_server.url, JOBCAST_WORKER_CONCURRENCY=str(args.concurrency))
        r = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
        completed = schema.index_key(TENANT, status="completed")
        processing = schema.index_key(TENANT, status="processing")

        async def post(conn: Connection, body: bytes) -> str:
            status, data = await conn.request("POST", "/jobs", body, submitters.HEADERS)
            assert status == 202, (status, data)
            return str(orjson.loads(data)["id"])

        async def warm_up() -> None:
            conn = Connection("127.0.0.1", port)
            await post(conn, submitters.NOOP_BODY)
            if busy:
                nap = orjson.dumps({"type": "bench.nap", "params": {"seconds": 120}})
                for _ in range(args.concurrency // 2):
                    await post(conn, nap)
            await conn.close()

        asyncio.run(warm_up())
        wait_for(lambda: r.zcard(completed) >= 1, 30, "the first job", [worker])
        background = None
        if busy:
            wait_for(lambda: r.zcard(processing) >= args.concurrency // 2, 30, "the naps to start", [worker])
            background = spawn(submitters.http_jobs, port, 3000, 1, 0.01)  # ~90 no-op jobs a second

        async def probe() -> list[str]:
            conn = Connection("127.0.0.1", port)
            ids = []
            for _ in range(args.probes):
                await asyncio.sleep(random.uniform(0.005, 0.03))
                ids.append(await post(conn, submitters.NOOP_BODY))
            await conn.close()
            return ids

        say(f"Jobcast pickup, {'busy' if busy else 'idle'} worker: {args.probes} probes")
        ids = asyncio.run(probe())
        wait_for(
            lambda: all(r.hget(schema.job_key(i), "status") == "completed" for i in ids[-5:]),
            30,
            "the probes",
            [worker],
        )
        if background is not None:
            background[0].terminate()
            background[0].join()
        pickups = []
        for job_id in ids:
            at = {}
            for _, entry in r.xrange(schema.job_log_key(job_id)):
                at[entry["event"]] = iso_ms(orjson.loads(entry["data"])["at"])
            pickups.append(at["job.processing"] - at["job.queued"])
        r.close()
    return pickups


def arq_pickup(args: argparse.Namespace, folder: Path, poll_delay: float, probes: int) -> list[float]:
    from arq.jobs import Job

    from bench.arq_ref import enqueue, pool

    with Processes(folder) as procs:
        redis_server = procs.redis()
        worker = procs.start(
            "arq",
            [sys.executable, "-m", "bench.arq_ref", "--redis-url", redis_server.url,
             "--max-jobs", str(args.concurrency), "--poll-delay", str(poll_delay)],
            harness.jobcast_env(redis_server.url),
        )  # fmt: skip

        async def probe() -> list[float]:
            redis = await pool(redis_server.url)
            first = Job(await enqueue(redis), redis, _deserializer=orjson.loads)
            await first.result(timeout=30)
            ids = []
            for _ in range(probes):
                # Random gaps of about two polls, so that enqueues fall anywhere in the poll cycle.
                await asyncio.sleep(random.uniform(0.005, 2 * poll_delay + 0.005))
                ids.append(await enqueue(redis))
            pickups = []
            for job_id in ids:
                job = Job(job_id, redis, _deserializer=orjson.loads)
                await job.result(timeout=30)
                info = await job.result_info()
                assert info is not None
                pickups.append((info.start_time - info.enqueue_time).total_seconds() * 1000)
            await redis.aclose()
            return pickups

        say(f"arq pickup, poll {poll_delay:g} s: {probes} probes")
        assert worker.alive()
        return asyncio.run(probe())


# --- (3) submission rate ----------------------------------------------------------------------------------

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "{auth}"
"""


def wrk_rate(port: int, folder: Path, seconds: int) -> tuple[float, str, float, float]:
    """(requests/s, non-2xx note, p50 ms, p99 ms) of ``wrk`` POSTing /jobs."""
    script = folder / "post.lua"
    script.write_text(WRK_SCRIPT.format(body=submitters.NOOP_BODY.decode(), auth=harness.AUTH))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{SUBMIT_CONCURRENCY}", f"-d{seconds}s", "--latency", "-s", str(script),
         f"http://127.0.0.1:{port}/jobs"],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    ).stdout  # fmt: skip
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def pct(q: str) -> float:
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if m is None:
            return float("nan")
        return float(m[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m[2]]

    return rate, (f"{bad[1]} non-2xx" if bad else "all 2xx"), pct("50"), pct("99")


def submission_rate(args: argparse.Namespace, folder: Path) -> list[tuple[str, float, str, float, float, float]]:
    rows = []
    for i in range(args.rounds):
        for kind in ("jobcast", "bare") if i % 2 == 0 else ("bare", "jobcast"):
            with Processes(folder / f"submit-{kind}-{i}") as procs:
                redis_server = procs.redis()
                web, port = (
                    procs.jobcast_web(redis_server.url) if kind == "jobcast" else procs.bare_web(redis_server.url)
                )
                say(f"submission rate, {kind}, round {i + 1}: wrk for {args.submit_seconds}s")
                wrk_rate(port, procs.log_dir, 1)  # warm up
                cpu0 = web.cpu_s()
                t0 = time.monotonic()
                rate, note, p50, p99 = wrk_rate(port, procs.log_dir, args.submit_seconds)
                busy = (web.cpu_s() - cpu0) / (time.monotonic() - t0)
                rows.append(
                    ("Jobcast POST /jobs" if kind == "jobcast" else "bare Starlette + SET", rate, note, p50, p99, busy)
                )
    return rows


# --- report ------------------------------------------------------------------------------------------------


def throughput_rows(runs: list[Throughput]) -> list[list[object]]:
    rows = []
    for t in runs:
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in t.cpu.items())
        rows.append([
            t.system, t.workers, t.jobs, f"{t.seconds:.2f}", f"{t.rate:.0f}", f"{t.jobs / t.submit_seconds:.0f}",
            f"{percentile(t.submit_latencies, 50):.1f} / {percentile(t.submit_latencies, 99):.1f}",
            cpu, f"{t.others:.1f}", t.events_ok,
        ])  # fmt: skip
    return rows


THROUGHPUT_HEAD = ["system", "workers", "jobs", "seconds", "jobs/s", "submitted/s", "submit p50/p99 ms",
                   "CPU-s by process", "not-ours CPU-s", "check"]  # fmt: skip


def round_trip_report(jobcast: Throughput, arq: Throughput) -> str:
    a, b = jobcast.redis, arq.redis

    def line(label: str, key: str, fmt: str) -> list[object]:
        return [label, format(a[key], fmt), format(b[key], fmt), ratio(a[key], b[key])]

    rows = [
        line("round trips (requests Redis read)", "round_trips", ".2f"),
        line("commands executed (Lua's included)", "commands", ".1f"),
        line("Redis CPU µs", "cpu_us", ".0f"),
        line("bytes sent to Redis", "bytes_in", ".0f"),
        line("Redis memory kept, bytes", "memory", ".0f"),
    ]
    out = table(["per job", "Jobcast", "arq", "ratio"], rows)
    names = sorted(set(a["cmd"]) | set(b["cmd"]), key=lambda k: -(a["cmd"].get(k, 0) + b["cmd"].get(k, 0)))
    cmd_rows = [
        [k, f"{a['cmd'].get(k, 0):.2f}", f"{b['cmd'].get(k, 0):.2f}"]
        for k in names
        if k not in ("info", "xinfo|stream") and max(a["cmd"].get(k, 0), b["cmd"].get(k, 0)) >= 0.01
    ]
    return (
        out
        + "\n\nCommands per job, by name (those run inside Lua scripts included):\n\n"
        + table(["command", "Jobcast", "arq"], cmd_rows)
    )


def stats_ms(values: list[float]) -> str:
    return f"{percentile(values, 50):.1f} / {percentile(values, 99):.1f} / {statistics.fmean(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs in the throughput runs of part 1")
    parser.add_argument("--scaling-jobs", type=int, default=10_000, help="jobs in each run of part 5")
    parser.add_argument("--concurrency", type=int, default=WORKER_CONCURRENCY, help="jobs one worker runs at once")
    parser.add_argument("--probes", type=int, default=200, help="jobs measured for pickup latency")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the submission-rate comparison")
    parser.add_argument("--submit-seconds", type=int, default=5)
    parser.add_argument("--parts", default="throughput,pickup,submit,scaling", help="which parts to run")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (logs)")
    parser.add_argument("--profile", action="store_true", help="py-spy the Jobcast server and worker in part 1")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if "submit" in parts and shutil.which("wrk") is None:
        sys.exit("pipeline: part 'submit' needs wrk: apt-get install -y wrk (or leave it out: --parts ...)")
    harness.raise_fd_limit()
    folder = Path(tempfile.mkdtemp(prefix="jobcast-bench-pipeline-"))
    print("# Job pipeline: Jobcast vs raw arq\n")
    print(table(["machine", ""], list(harness.machine().items())))
    print(
        f"\nworker concurrency {args.concurrency} (Jobcast and arq); {SUBMIT_CONCURRENCY} submitting connections; "
        f"arq poll {ARQ_POLL_S} s; logs in {folder}"
    )
    try:
        base: dict[str, Throughput] = {}
        if parts & {"throughput", "scaling"}:
            with harness.section(f"1. End-to-end throughput, {args.jobs} no-op jobs, 1 worker"):
                base["jobcast"] = jobcast_throughput(args, args.jobs, 1, folder / "jobcast-1")
                base["arq"] = arq_throughput(args, args.jobs, 1, folder / "arq-1")
                print(table(THROUGHPUT_HEAD, throughput_rows([base["jobcast"], base["arq"]])))
                r = base["jobcast"].rate / base["arq"].rate
                print(f"\nJobcast / arq: {r:.2f}x (target ≥ 0.8x: {'MET' if r >= 0.8 else 'NOT MET'})")
                j = base["jobcast"]
                print("\nRSS (KiB) of the Jobcast processes during this run (part 5: flat, no growth):\n")
                names = list(j.memory[0][1])
                print(table(["jobs done", *names], [[m, *(s[n] for n in names)] for m, s in j.memory]))
                for profile in j.profiles:
                    print("\n" + profile)
            with harness.section("4. Redis work per job (same runs)"):
                print(round_trip_report(base["jobcast"], base["arq"]))
        if "pickup" in parts:
            with harness.section(f"2. Pickup latency, {args.probes} jobs submitted one at a time"):
                idle = jobcast_pickup(args, folder / "pickup-idle", busy=False)
                busy = jobcast_pickup(args, folder / "pickup-busy", busy=True)
                arq_default = arq_pickup(args, folder / "pickup-arq-default", 0.5, max(20, args.probes // 5))
                arq_short = arq_pickup(args, folder / "pickup-arq-short", ARQ_POLL_S, args.probes)
                rows = [
                    ["Jobcast, idle worker", len(idle), stats_ms(idle)],
                    ["Jobcast, busy worker", len(busy), stats_ms(busy)],
                    ["arq, default 0.5 s poll", len(arq_default), stats_ms(arq_default)],
                    [f"arq, {ARQ_POLL_S} s poll", len(arq_short), stats_ms(arq_short)],
                ]
                print(table(["", "jobs", "p50 / p99 / mean ms"], rows))
                for name, v in (("idle", idle), ("busy", busy)):
                    p50, p99 = percentile(v, 50), percentile(v, 99)
                    mean, ref = statistics.fmean(v), statistics.fmean(arq_default)
                    print(
                        f"\nJobcast {name}: p50 ≤ 10 ms {'MET' if p50 <= 10 else 'NOT MET'}, p99 ≤ 50 ms "
                        f"{'MET' if p99 <= 50 else 'NOT MET'}; mean {mean:.1f} ms, arq's default poll "
                        f"{ref:.0f} ms ({ratio(mean, ref)[:-1]}x, i.e. {ref / mean:.0f} times less)"
                    )
        if "submit" in parts:
            with harness.section(f"3. Submission rate, one server process, wrk -t1 -c{SUBMIT_CONCURRENCY}"):
                rows = submission_rate(args, folder)
                head = ["endpoint", "req/s", "responses", "p50 ms", "p99 ms", "server CPU (cores)"]
                print(table(head, [[n, f"{r:.0f}", note, f"{p50:.1f}", f"{p99:.1f}", f"{cores:.2f}"]
                                   for n, r, note, p50, p99, cores in rows]))  # fmt: skip
                ours = statistics.median(r for n, r, *_ in rows if n.startswith("Jobcast"))
                bare = statistics.median(r for n, r, *_ in rows if n.startswith("bare"))
                verdict = "MET" if ours >= 0.5 * bare else "NOT MET"
                print(f"\nJobcast / bare (medians): {ratio(ours, bare)} (target ≥ 0.5x: {verdict})")
        if "scaling" in parts:
            with harness.section(f"5. Scaling, {args.scaling_jobs} jobs per run"):
                runs = [base["jobcast"], base["arq"]]
                for workers in (2, 4):
                    runs.append(jobcast_throughput(args, args.scaling_jobs, workers, folder / f"jobcast-{workers}"))
                    runs.append(arq_throughput(args, args.scaling_jobs, workers, folder / f"arq-{workers}"))
                runs.sort(key=lambda t: (t.system != "Jobcast", t.workers))
                print(table(THROUGHPUT_HEAD, throughput_rows(runs)))
                print()
                rows = []
                for w in (1, 2, 4):
                    j = next(t for t in runs if t.system == "Jobcast" and t.workers == w)
                    a = next(t for t in runs if t.system == "arq" and t.workers == w)
                    rows.append([w, f"{j.rate:.0f}", ratio(j.rate, base["jobcast"].rate), f"{a.rate:.0f}",
                                 ratio(a.rate, base["arq"].rate), ratio(j.rate, a.rate)])  # fmt: skip
                print(
                    table(
                        ["workers", "Jobcast jobs/s", "vs 1 worker", "arq jobs/s", "vs 1 worker", "Jobcast/arq"], rows
                    )
                )
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
