"""Instructions per delivered event in the Jobcast server, counted by valgrind's callgrind: a
repeatable CPU-per-event figure on a shared machine, for comparing two versions of the stream path.

    .venv/bin/python bench/callgrind_fanout.py                    # this checkout
    .venv/bin/python bench/callgrind_fanout.py --streams 500 --events 20
    .venv/bin/python bench/callgrind_fanout.py --phase connect --streams 2000   # per stream open
    .venv/bin/python bench/callgrind_fanout.py --phase job --jobs 400          # per job, as in the soak

The server (``bench.serve jobcast``) runs under ``valgrind --tool=callgrind --instr-atstart=no``;
the load client (:mod:`bench.sse_client`, in a process of its own) opens N streams on one running
job; instrumentation is switched on (``callgrind_control -i on``), 20 ``Store.progress()`` events are
published and read by every stream, and switched off before the dump. The figure is
the server's instructions (Ir) over that window divided by N x events. With ``--phase connect``
the window is the opening of the N streams instead (their requests, the Redis calls, the heads and
replays), divided by N: the CPU of a stream open. With ``--phase job`` the window is the soak's unit of
work (``tests/test_soak.py``), N times: a job submitted on a kept connection, its stream opened on a
new connection and read to its end (5 events: queued, processing, two progress steps, completed),
run by a ``jobcast worker`` outside callgrind; divided by N: the web server's CPU per job. Run it
from each checkout to compare (both use that checkout's server code).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import os
import re
import signal
import subprocess
import tempfile
import time

import orjson

from bench import harness
from bench.harness import AUTH, Processes, free_port, say
from bench.http_client import Connection
from bench.sse_fanout import Clients, Run, new_running_job
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store, redis_client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--phase", choices=["events", "connect", "job"], default="events", help="what is counted")
    parser.add_argument("--jobs", type=int, default=400, help="--phase job: how many")
    parser.add_argument("--at-once", type=int, default=20, help="--phase job: how many in flight at once")
    parser.add_argument(
        "--cprofile", metavar="FILE", help="--phase job: cProfile the server (no callgrind), stats to FILE"
    )
    parser.add_argument(
        "--cpu",
        type=int,
        metavar="ROUNDS",
        help="--phase job: no callgrind; the server's CPU time (user + system) per job, ROUNDS times",
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="jobcast-callgrind-"))
    with Processes(folder) as procs:
        redis_server = procs.redis()
        settings = Settings(redis_url=redis_server.url)
        port = free_port()
        out = folder / "callgrind.out"
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            sys.executable, "-m", "bench.serve", "jobcast", "--port", str(port),
        ]  # fmt: skip
        if args.cprofile or args.cpu:
            if args.phase != "job":
                parser.error("--cprofile and --cpu are for --phase job")
            extra = {"BENCH_CPROFILE": str(Path(args.cprofile).resolve())} if args.cprofile else {}
            web = procs.start(
                "web", command[command.index(sys.executable) :], harness.jobcast_env(redis_server.url, **extra)
            )
            harness.wait_http(port, web)
            worker = procs.jobcast_worker(redis_server.url, JOBCAST_WORKER_CONCURRENCY=str(2 * args.at_once))
            asyncio.run(jobs_followed(port, args.at_once, args.at_once))  # the worker is up, the server warm
            if args.cprofile:
                os.kill(web.pid, signal.SIGUSR1)
                events = asyncio.run(jobs_followed(port, args.jobs, args.at_once))
                os.kill(web.pid, signal.SIGUSR2)
                time.sleep(1)
                print(f"jobs {args.jobs}, events read {events}; the server's profile in {args.cprofile}")
                return
            assert redis_server.process is not None
            others = {"worker": worker.pid, "redis": redis_server.process.pid}
            for _ in range(args.cpu):
                before = harness.cpu_times(web.pid)
                others_before = {name: harness.cpu_seconds(pid) for name, pid in others.items()}
                commands_before = asyncio.run(_command_stats(settings))
                events = asyncio.run(jobs_followed(port, args.jobs, args.at_once))
                user, system = (after - first for after, first in zip(harness.cpu_times(web.pid), before, strict=True))
                per_job = [seconds / args.jobs * 1e6 for seconds in (user + system, user, system)]
                print(
                    f"jobs {args.jobs}, events read {events}; server CPU {user + system:.2f} s, "
                    "per job {:,.0f} µs (user {:,.0f}, system {:,.0f})".format(*per_job)
                )
                print(
                    "  per job elsewhere: "
                    + ", ".join(
                        f"{name} {(harness.cpu_seconds(pid) - others_before[name]) / args.jobs * 1e6:,.0f} µs"
                        for name, pid in others.items()
                    )
                )
                commands = asyncio.run(_command_stats(settings))
                spent = {
                    name: (calls - commands_before.get(name, (0, 0))[0], usec - commands_before.get(name, (0, 0))[1])
                    for name, (calls, usec) in commands.items()
                }
                top = sorted(spent.items(), key=lambda item: -item[1][1])[:12]
                print(
                    "  Redis per job (calls, µs in the command): "
                    + ", ".join(f"{name} {calls / args.jobs:.2f}/{usec / args.jobs:.1f}" for name, (calls, usec) in top)
                )
            return
        web = procs.start("web", command, harness.jobcast_env(redis_server.url))
        harness.wait_http(port, web, timeout=300)

        if args.phase == "job":
            procs.jobcast_worker(redis_server.url, JOBCAST_WORKER_CONCURRENCY=str(2 * args.at_once))
            time.sleep(2)
            subprocess.run(["callgrind_control", "-i", "on", str(web.pid)], check=True, capture_output=True)
            events = asyncio.run(jobs_followed(port, args.jobs, args.at_once))
            subprocess.run(["callgrind_control", "-i", "off", str(web.pid)], check=True, capture_output=True)
            subprocess.run(["callgrind_control", "-d", str(web.pid)], check=True, capture_output=True)
            procs.stop(web)
            total = _instructions(folder)
            print(f"jobs {args.jobs}, events read {events} ({events / args.jobs:.2f} a job)")
            print(f"server instructions while they ran: {total:,}; per job: {total / args.jobs:,.0f}")
            print(f"dumps in {folder}")
            return
        job_id = asyncio.run(new_running_job(settings))
        run = Run("Jobcast", args.streams)
        clients = Clients(1, port, [f"/jobs/{job_id}/events"] * args.streams, {"Authorization": AUTH}, 50)
        try:
            if args.phase == "connect":
                time.sleep(2)
                subprocess.run(["callgrind_control", "-i", "on", str(web.pid)], check=True, capture_output=True)
                clients.connect(run)
                subprocess.run(["callgrind_control", "-i", "off", str(web.pid)], check=True, capture_output=True)
                subprocess.run(["callgrind_control", "-d", str(web.pid)], check=True, capture_output=True)
            else:
                clients.connect(run)
                say(f"{run.connected} streams open; collecting")
                time.sleep(2)
                subprocess.run(["callgrind_control", "-i", "on", str(web.pid)], check=True, capture_output=True)
                clients.start_collect(args.events, time.time() + 600)

                async def publish() -> None:
                    redis = redis_client(settings)
                    store = Store(redis, settings)
                    for seq in range(1, args.events + 1):
                        await store.progress(job_id, 1, seq, None, f"bseq={seq} t={time.time_ns()}")
                        await asyncio.sleep(0.5)
                    await redis.aclose()

                asyncio.run(publish())
                clients.finish_collect(run, args.events, 600)
                subprocess.run(["callgrind_control", "-i", "off", str(web.pid)], check=True, capture_output=True)
                subprocess.run(["callgrind_control", "-d", str(web.pid)], check=True, capture_output=True)
        finally:
            clients.close()
        procs.stop(web)
    total = _instructions(folder)
    if args.phase == "connect":
        print(f"streams opened {run.connected} (failed {run.failed})")
        per_open = total / max(run.connected, 1)
        print(f"server instructions while they opened: {total:,}; per stream open: {per_open:,.0f}")
        print(f"dumps in {folder}")
        return
    delivered = run.received
    print(f"streams {run.connected}, events {args.events}, delivered {delivered}, duplicates {run.duplicates}")
    print(f"server instructions while events flowed: {total:,}; per delivered event: {total / max(delivered, 1):,.0f}")
    print(f"dumps in {folder}")


async def _command_stats(settings: Settings) -> dict[str, tuple[int, int]]:
    """Redis's ``INFO commandstats``: per command, its calls and the microseconds spent in it."""
    redis = redis_client(settings)
    try:
        info = await redis.info("commandstats")
    finally:
        await redis.aclose()
    return {name.removeprefix("cmdstat_"): (stat["calls"], stat["usec"]) for name, stat in info.items()}


def _instructions(folder: Path) -> int:
    total = 0
    for dump in sorted(folder.glob("callgrind.out*")):
        text = dump.read_text(errors="replace")
        # "summary:" may be written as 0 before the costs, and "totals:" after them: take the largest.
        for match in re.finditer(r"^(?:summary|totals): (\d+)", text, re.MULTILINE):
            total = max(total, int(match[1]))
    return total


#: What each job's stream carries (the soak's job: the built-in sleep, 0.3 s in two steps).
JOB_EVENTS = ("job.queued", "job.processing", "job.progress", "job.progress", "job.completed")
JOB_BODY = orjson.dumps({"type": "sleep", "params": {"seconds": 0.3, "steps": 2}})
POST_HEADERS = {"Authorization": AUTH, "Content-Type": "application/json"}


async def jobs_followed(port: int, count: int, at_once: int) -> int:
    """``count`` jobs as the soak runs them, ``at_once`` in flight: submitted on kept connections,
    each one's stream read to its end on a connection of its own. The events read."""
    left = iter(range(count))
    read = 0
    reconnects: list[int] = []

    async def one_lane() -> None:
        nonlocal read
        connection = Connection("127.0.0.1", port)
        try:
            for _ in left:
                try:
                    status, body = await connection.request("POST", "/jobs", JOB_BODY, POST_HEADERS)
                except (OSError, asyncio.IncompleteReadError):  # kept too long idle: closed by the server
                    reconnects.append(1)
                    await connection.close()
                    status, body = await connection.request("POST", "/jobs", JOB_BODY, POST_HEADERS)
                if status != 202:
                    raise RuntimeError(f"POST /jobs: {status} {body[:300]!r}")
                events = await _follow(port, orjson.loads(body)["id"])
                read += events  # (not `read += await ...`: that reads `read` before the wait)
        finally:
            await connection.close()

    await asyncio.gather(*(one_lane() for _ in range(at_once)))
    if reconnects:
        say(f"{len(reconnects)} kept connections were closed by the server while idle, and opened again")
    return read


async def _follow(port: int, job_id: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: bench\r\nAuthorization: {AUTH}\r\n\r\n".encode())
        data = b""
        while not data.endswith(b"\r\n0\r\n\r\n"):
            more = await reader.read(65536)
            if not more:
                raise RuntimeError(f"stream of {job_id} ended early: {data[-300:]!r}")
            data += more
        events = data.count(b"\nid: ")
        if events != len(JOB_EVENTS) or not data.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(
                f"the stream of {job_id} carried {events} events, not {len(JOB_EVENTS)}: {data[-600:]!r}"
            )
        return events
    finally:
        writer.close()


if __name__ == "__main__":
    main()
