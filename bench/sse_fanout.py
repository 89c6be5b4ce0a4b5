"""Event streams under load: Jobcast's SSE side by side with nginx+nchan (issue 3, "Speed").

    .venv/bin/python bench/sse_fanout.py                   # 1k and 10k streams, then 1k events/s
    .venv/bin/python bench/sse_fanout.py --streams 10000 --skip-spread

Both servers are started here, on 127.0.0.1, and loaded by the same client (:mod:`bench.sse_client`,
in ``--clients`` processes of their own) with the same event payloads. Every event carries
``bseq=<n> t=<epoch ns>`` written just before it is published; latency = the client's receive time
minus ``t``.

(a) Fan-out. N streams on ONE job (Jobcast: ``GET /jobs/{id}/events`` with an API key; nchan:
    ``GET /sub/<channel>``), then 20 events published at 10/s. Publishing is direct, from this
    process: for Jobcast ``Store.progress()`` on a running job (the same Lua call a worker makes:
    record + event logs + PUBLISH), for nchan ``POST /pub/<channel>``. Figures: time to open the N
    streams (until every 200 is in), p50/p99/max latency, the fraction of (stream, event) pairs
    delivered, and memory per idle stream (server RSS with N idle streams minus before, / N; for
    nginx, its worker process).
(b) Spread. 1000 jobs with one stream each, 1000 events/s in total (each job 1 event/s, phases
    spread over the second) for 10 s. For Jobcast the events come from a real worker: the
    ``bench.tick`` job type (:mod:`bench.jobtypes`) calls ``ctx.progress()`` and the timestamp is
    taken right before that call, so latency covers progress() -> flush task -> Lua -> PUBLISH -> hub
    -> stream -> client. For nchan a publisher process POSTs on the same schedule.

Ratios are Jobcast / nchan from the same run. The load client's own CPU time is printed, so one can
see when it, not a server, is what saturates the machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import multiprocessing
import shutil
import statistics
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import harness, nchan, sse_client, ws_client
from bench.harness import AUTH, TENANT, Processes, percentile, ratio, say, table
from bench.http_client import Connection
from bench.jobtypes import TICK_START_KEY
from jobcast.worker import schema
from jobcast.worker.clock import now
from jobcast.worker.models import Priority
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store, redis_client

FANOUT_EVENTS = 20
FANOUT_RATE = 10.0
SPREAD_JOBS = 1000
SPREAD_EVENTS = 10  # per job, one a second
DRAIN_S = 30.0  # how long after the last publish the client waits for stragglers


@dataclass
class Run:
    server: str
    streams: int
    connected: int = 0
    failed: int = 0
    connect_s: float = float("nan")
    #: The server's CPU-seconds while the streams opened (all its processes; nginx: its workers).
    open_cpu_s: float = float("nan")
    latencies_ms: list[float] = field(default_factory=list)
    received: int = 0
    expected: int = 0
    duplicates: int = 0
    kib_per_stream: float = float("nan")
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_wall: float = 0.0
    others: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    profiles: list[str] = field(default_factory=list)
    by_seq: dict[int, list[float]] = field(default_factory=dict)
    gc_connect: list[float] = field(default_factory=list)  # the server's GC pauses >= 5 ms, while connecting
    gc_publish: list[float] = field(default_factory=list)  # ... while events flow

    @property
    def delivered(self) -> float:
        return self.received / self.expected if self.expected else float("nan")

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


class Clients:
    """``count`` load-client processes sharing the streams round-robin."""

    def __init__(
        self,
        count: int,
        port: int,
        paths: list[str],
        headers: dict[str, str],
        concurrency: int,
        target: Callable[..., None] = sse_client.run,
    ) -> None:
        """``target``: :func:`bench.sse_client.run` (``paths`` are URL paths) or
        :func:`bench.ws_client.run` (``paths`` are /ws channels)."""
        ctx = multiprocessing.get_context("spawn")
        self.pipes = []
        self.procs = []
        for i in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=target,
                args=(child, "127.0.0.1", port, paths[i::count], headers, concurrency),
                name=f"sse-client-{i}",
            )
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> dict[str, int]:
        return {f"client{i}": p.pid for i, p in enumerate(self.procs) if p.pid is not None}

    def _ask(self, command: tuple[Any, ...], timeout: float) -> list[dict[str, Any]]:
        for pipe in self.pipes:
            pipe.send(command)
        answers = []
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise RuntimeError(f"load client did not answer {command[0]!r} within {timeout}s")
            answers.append(pipe.recv())
        return answers

    def connect(self, run: Run) -> None:
        answers = self._ask(("connect",), 300)
        run.connected = sum(a["connected"] for a in answers)
        run.failed = sum(a["failed"] for a in answers)
        run.connect_s = (max(a["t1"] for a in answers) - min(a["t0"] for a in answers)) / 1e9
        for a in answers:
            for k, v in a["errors"].items():
                run.errors[k] = run.errors.get(k, 0) + v

    def start_collect(self, per_stream: int, deadline: float) -> None:
        for pipe in self.pipes:
            pipe.send(("collect", per_stream, deadline))

    def finish_collect(self, run: Run, per_stream: int, timeout: float) -> None:
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise RuntimeError(f"load client did not report within {timeout}s")
            a = pipe.recv()
            lat, seqs = array("q"), array("i")
            lat.frombytes(a["latencies_us"])
            seqs.frombytes(a["seqs"])
            run.latencies_ms += [v / 1000 for v in lat]
            for seq, v in zip(seqs, lat, strict=True):
                run.by_seq.setdefault(seq, []).append(v / 1000)
            run.received += a["received"]
            run.duplicates += a["duplicates"]
        run.expected = run.streams * per_stream

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("close",))
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()


def event_payload(job_id: str, seq: int, events: int, t_ns: int) -> str:
    """The data of a Jobcast ``job.progress`` event, as jobs.lua writes it (used verbatim for nchan)."""
    percent = 100 * seq / events
    return (
        f'{{"job_id":"{job_id}","type":"bench.noop","status":"processing","attempt":1,'
        f'"progress":{{"percent":{percent!r},"message":"bseq={seq} t={t_ns}"}},"at":"{now()[0]}"}}'
    )


def settle_rss(pids: list[int], seconds: float = 1.0) -> int:
    time.sleep(seconds)
    return sum(harness.rss_kib(pid) for pid in pids)


# --- (a) fan-out ----------------------------------------------------------------------------------


async def new_running_job(settings: Settings) -> str:
    """A job in status processing (run 1), as a worker would have started it."""
    redis = redis_client(settings)
    store = Store(redis, settings)
    created = await store.create(
        tenant=TENANT, job_type="bench.noop", params={}, priority=Priority.NORMAL, max_attempts=1
    )
    assert created.job_id is not None
    assert await store.start(created.job_id, 1, 10**15) is not None
    await redis.aclose()
    return created.job_id


def fanout_jobcast(args: argparse.Namespace, streams: int, folder: Path, transport: str = "sse") -> Run:
    """``transport``: "sse" (``GET /jobs/{id}/events``) or "ws" (``GET /ws``, one socket per client
    subscribed to ``job:<id>``; :mod:`bench.ws_fanout`)."""
    run = Run("Jobcast" if transport == "sse" else "Jobcast WS", streams)
    with Processes(folder) as procs:
        redis_server = procs.redis()
        web, port = procs.jobcast_web(redis_server.url, processes=args.processes)
        servers = harness.server_pids(web.pid)
        settings = Settings(redis_url=redis_server.url)
        job_id = asyncio.run(new_running_job(settings))
        rss_before = settle_rss(servers, 0.5)
        if transport == "sse":
            clients = Clients(args.clients, port, [f"/jobs/{job_id}/events"] * streams, {"Authorization": AUTH}, 200)
        else:
            clients = Clients(
                args.clients, port, [f"job:{job_id}"] * streams, {"Authorization": AUTH}, 200, ws_client.run
            )
        try:
            say(f"{run.server}: opening {streams} streams")
            profiler = harness.Profiler(web.pid, folder / "connect.pyspy") if args.profile else None
            opening = harness.CpuMeter({f"server{i}": pid for i, pid in enumerate(servers)})
            opening.start()
            clients.connect(run)
            run.open_cpu_s = sum(opening.stop().values())
            if profiler is not None:
                profiler.stop()
                run.profiles.append(profiler.report(f"Jobcast server while {streams} streams connect"))
            run.kib_per_stream = (settle_rss(servers) - rss_before) / max(run.connected, 1)
            server_cpu = {f"server{i}": pid for i, pid in enumerate(servers)}
            meter = harness.CpuMeter({**server_cpu, "redis": redis_server.process.pid, **clients.pids})  # type: ignore[union-attr]
            say(f"{run.server}: {run.connected} streams open; publishing {FANOUT_EVENTS} events at {FANOUT_RATE:g}/s")
            profiler = harness.Profiler(web.pid, folder / "publish.pyspy") if args.profile else None
            run.gc_connect = web.gc_pauses()
            gc_mark = web.log_size()
            meter.start()
            deadline = time.time() + FANOUT_EVENTS / FANOUT_RATE + DRAIN_S
            clients.start_collect(FANOUT_EVENTS, deadline)

            async def publish() -> None:
                redis = redis_client(settings)
                store = Store(redis, settings)
                t0 = time.monotonic()
                for seq in range(1, FANOUT_EVENTS + 1):
                    await asyncio.sleep(max(0.0, t0 + (seq - 1) / FANOUT_RATE - time.monotonic()))
                    message = f"bseq={seq} t={time.time_ns()}"
                    assert await store.progress(job_id, 1, 100 * seq / FANOUT_EVENTS, None, message)
                await redis.aclose()

            asyncio.run(publish())
            clients.finish_collect(run, FANOUT_EVENTS, DRAIN_S + 30)
            run.cpu = meter.stop()
            run.cpu_wall, run.others = meter.wall, meter.others
            run.gc_publish = web.gc_pauses(gc_mark)
            if profiler is not None:
                profiler.stop()
                run.profiles.append(profiler.report(f"Jobcast server while {streams} streams receive"))
        finally:
            clients.close()
    return run


def fanout_nchan(args: argparse.Namespace, streams: int, folder: Path) -> Run:
    run = Run("nginx+nchan", streams)
    with Processes(folder) as procs:
        master, port = nchan.start(procs, workers=args.nginx_workers)
        workers = nchan.worker_pids(master.pid)
        rss_before = settle_rss(workers, 0.5)
        clients = Clients(args.clients, port, ["/sub/fanout"] * streams, {}, 200)
        try:
            say(f"nchan: opening {streams} streams")
            opening = harness.CpuMeter({f"server{i}": pid for i, pid in enumerate(workers)})
            opening.start()
            clients.connect(run)
            run.open_cpu_s = sum(opening.stop().values())
            run.kib_per_stream = (settle_rss(workers) - rss_before) / max(run.connected, 1)
            meter = harness.CpuMeter({**{f"server{i}": pid for i, pid in enumerate(workers)}, **clients.pids})
            say(f"nchan: {run.connected} streams open; publishing {FANOUT_EVENTS} events at {FANOUT_RATE:g}/s")
            meter.start()
            deadline = time.time() + FANOUT_EVENTS / FANOUT_RATE + DRAIN_S
            clients.start_collect(FANOUT_EVENTS, deadline)

            async def publish() -> None:
                conn = Connection("127.0.0.1", port)
                fake_job = "job_" + "0" * 26
                t0 = time.monotonic()
                for seq in range(1, FANOUT_EVENTS + 1):
                    await asyncio.sleep(max(0.0, t0 + (seq - 1) / FANOUT_RATE - time.monotonic()))
                    body = event_payload(fake_job, seq, FANOUT_EVENTS, time.time_ns()).encode()
                    status, _ = await conn.request("POST", "/pub/fanout", body)
                    assert status in (201, 202), status
                await conn.close()

            asyncio.run(publish())
            clients.finish_collect(run, FANOUT_EVENTS, DRAIN_S + 30)
            run.cpu = meter.stop()
            run.cpu_wall, run.others = meter.wall, meter.others
        finally:
            clients.close()
    return run


# --- (b) 1k events/s over 1k streams ------------------------------------------------------------------


def spread_jobcast(args: argparse.Namespace, folder: Path) -> Run:
    run = Run("Jobcast", SPREAD_JOBS)
    with Processes(folder) as procs:
        redis_server = procs.redis()
        web, port = procs.jobcast_web(redis_server.url)
        worker = procs.jobcast_worker(redis_server.url, JOBCAST_WORKER_CONCURRENCY=str(SPREAD_JOBS + 100))
        settings = Settings(redis_url=redis_server.url)

        async def create_jobs() -> list[str]:
            redis = redis_client(settings)
            store = Store(redis, settings)
            ids = []
            for i in range(SPREAD_JOBS):
                params = {"events": SPREAD_EVENTS, "interval_s": 1.0, "offset_s": i / SPREAD_JOBS}
                created = await store.create(
                    tenant=TENANT, job_type="bench.tick", params=params, priority=Priority.NORMAL, max_attempts=1
                )
                assert created.job_id is not None
                ids.append(created.job_id)
            processing = schema.index_key(TENANT, status="processing")
            deadline = time.monotonic() + 60
            while (started := await redis.zcard(processing)) < SPREAD_JOBS:
                if time.monotonic() > deadline or not worker.alive():
                    raise RuntimeError(f"the worker started {started} of {SPREAD_JOBS} jobs:\n{worker.tail()}")
                await asyncio.sleep(0.1)
            await redis.aclose()
            return ids

        ids = asyncio.run(create_jobs())
        clients = Clients(args.clients, port, [f"/jobs/{i}/events" for i in ids], {"Authorization": AUTH}, 200)
        try:
            say(f"Jobcast: {SPREAD_JOBS} jobs running; opening one stream each")
            clients.connect(run)
            pids = {"server": web.pid, "worker": worker.pid, "redis": redis_server.process.pid, **clients.pids}  # type: ignore[union-attr]
            meter = harness.CpuMeter(pids)
            say(f"Jobcast: {run.connected} streams open; {SPREAD_JOBS} events/s for {SPREAD_EVENTS}s from the worker")
            start = time.time() + 0.5
            clients.start_collect(SPREAD_EVENTS, start + SPREAD_EVENTS + DRAIN_S)
            gc_mark = web.log_size()
            meter.start()

            async def go() -> None:
                redis = redis_client(settings)
                await redis.set(TICK_START_KEY, repr(start))
                await redis.aclose()

            asyncio.run(go())
            clients.finish_collect(run, SPREAD_EVENTS, SPREAD_EVENTS + DRAIN_S + 30)
            run.cpu = meter.stop()
            run.cpu_wall, run.others = meter.wall, meter.others
            run.gc_publish = web.gc_pauses(gc_mark)
        finally:
            clients.close()
    return run


def spread_nchan(args: argparse.Namespace, folder: Path) -> Run:
    run = Run("nginx+nchan", SPREAD_JOBS)
    with Processes(folder) as procs:
        master, port = nchan.start(procs, workers=args.nginx_workers)
        workers = nchan.worker_pids(master.pid)
        channels = [f"c{i}" for i in range(SPREAD_JOBS)]
        clients = Clients(args.clients, port, [f"/sub/{c}" for c in channels], {}, 200)
        try:
            say(f"nchan: opening {SPREAD_JOBS} streams, one channel each")
            clients.connect(run)
            ctx = multiprocessing.get_context("spawn")
            start = time.time() + 1.0  # the publisher process needs a moment to start
            publisher = ctx.Process(target=publish_schedule, args=(port, channels, SPREAD_EVENTS, start))
            clients.start_collect(SPREAD_EVENTS, start + SPREAD_EVENTS + DRAIN_S)
            publisher.start()
            assert publisher.pid is not None
            meter = harness.CpuMeter({"server": workers[0], "publisher": publisher.pid, **clients.pids})
            meter.start()
            say(f"nchan: {run.connected} streams open; {SPREAD_JOBS} events/s for {SPREAD_EVENTS}s from a publisher")
            clients.finish_collect(run, SPREAD_EVENTS, SPREAD_EVENTS + DRAIN_S + 30)
            run.cpu = meter.stop()
            run.cpu_wall, run.others = meter.wall, meter.others
            publisher.join(30)
        finally:
            clients.close()
    return run


def publish_schedule(port: int, channels: list[str], events: int, start: float) -> None:
    """Publisher process for (b) on nchan: channel i gets events at start + i/len + k seconds."""
    import uvloop

    async def main() -> None:
        pool: asyncio.Queue[Connection] = asyncio.Queue()
        for _ in range(16):
            pool.put_nowait(Connection("127.0.0.1", port))
        fake_job = "job_" + "0" * 26
        schedule = sorted(
            (start + i / len(channels) + k, channel, k + 1) for i, channel in enumerate(channels) for k in range(events)
        )
        tasks = set()

        async def post(channel: str, seq: int) -> None:
            conn = await pool.get()
            try:
                body = event_payload(fake_job, seq, events, time.time_ns()).encode()
                await conn.request("POST", f"/pub/{channel}", body)
            finally:
                pool.put_nowait(conn)

        for due, channel, seq in schedule:
            if (wait := due - time.time()) > 0:
                await asyncio.sleep(wait)
            task = asyncio.create_task(post(channel, seq))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)

    uvloop.run(main())


# --- report -----------------------------------------------------------------------------------------


def ms(value: float) -> str:
    return "n/a" if value != value else (f"{value:.1f}" if value < 100 else f"{value:.0f}")


def summary(run: Run) -> dict[str, float]:
    ordered = sorted(run.latencies_ms)
    return {
        "connect": run.connect_s,
        "open_us": run.open_cpu_s / max(run.connected, 1) * 1e6,
        "p50": percentile(ordered, 50),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else float("nan"),
        "kib": run.kib_per_stream,
        "server_cpu": sum(v for k, v in run.cpu.items() if k.startswith("server")) if run.cpu else float("nan"),
        "client_cpu": sum(v for k, v in run.cpu.items() if k.startswith("client")),
    }


def medians(runs: list[Run]) -> dict[str, float]:
    sums = [summary(r) for r in runs]
    return {key: statistics.median(s[key] for s in sums) for key in sums[0]}


HEAD = ["server", "round", "streams", "connect s", "CPU µs/open", "p50 ms", "p99 ms", "max ms", "delivered", "dupes",
        "KiB/stream", "server CPU s", "client CPU s", "not-ours CPU s"]  # fmt: skip


def row(run: Run, round_no: int) -> list[object]:
    s = summary(run)
    return [
        run.server,
        round_no,
        f"{run.connected}/{run.streams}",
        f"{s['connect']:.2f}",
        f"{s['open_us']:.0f}" if s["open_us"] == s["open_us"] else "n/a",
        ms(s["p50"]),
        ms(s["p99"]),
        ms(s["max"]),
        f"{100 * run.delivered:.2f}%",
        run.duplicates,
        f"{s['kib']:.1f}" if s["kib"] == s["kib"] else "n/a",
        f"{s['server_cpu']:.2f}",
        f"{s['client_cpu']:.2f}",
        f"{run.others:.2f}",
    ]


def ratio_row(ours: dict[str, float], ref: dict[str, float], label: str = "Jobcast/nchan") -> list[object]:
    return [
        f"**{label}** (medians)",
        "",
        "",
        ratio(ours["connect"], ref["connect"]),
        ratio(ours["open_us"], ref["open_us"]),
        ratio(ours["p50"], ref["p50"]),
        ratio(ours["p99"], ref["p99"]),
        ratio(ours["max"], ref["max"]),
        "",
        "",
        ratio(ours["kib"], ref["kib"]),
        ratio(ours["server_cpu"], ref["server_cpu"]),
        "",
        "",
    ]


def gc_line(pauses: list[float]) -> str:
    if not pauses:
        return "none"
    return f"{len(pauses)} ({sum(pauses):.0f} ms in all, longest {max(pauses):.0f} ms)"


def mark(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def verdicts_fanout(runs: list[Run], ours: dict[str, float], ref: dict[str, float]) -> list[str]:
    received = sum(r.received for r in runs)
    expected = sum(r.expected for r in runs)
    failed = sum(r.failed for r in runs)
    kb = ours["kib"] * 1.024
    return [
        f"- p99 ≤ nchan's p99: {mark(ours['p99'] <= ref['p99'])} ({ms(ours['p99'])} vs {ms(ref['p99'])} ms, "
        f"{ratio(ours['p99'], ref['p99'])})",
        f"- every event delivered: {mark(received == expected and failed == 0)} "
        f"({received}/{expected} over all rounds, {failed} streams failed to open)",
        f"- ≤ 12 KB per idle stream: {mark(kb <= 12)} ({kb:.1f} KB)",
        f"- connect ≤ 1.5x nchan: {mark(ours['connect'] <= 1.5 * ref['connect'])} "
        f"({ratio(ours['connect'], ref['connect'])})",
    ]


def compare(title: str, sides: dict[str, Callable[[int], Run]], rounds: int) -> dict[str, list[Run]]:
    """Run each side ``rounds`` times, alternating which goes first, and print every run."""
    results: dict[str, list[Run]] = {name: [] for name in sides}
    with harness.section(title):
        for i in range(rounds):
            order = list(sides) if i % 2 == 0 else list(reversed(sides))
            for name in order:
                results[name].append(sides[name](i))
        rows = [row(r, i + 1) for runs in results.values() for i, r in enumerate(runs)]
        if len(sides) == 2:
            ours, ref = list(sides)
            label = "Jobcast/nchan" if (ours, ref) == ("jobcast", "nchan") else f"{ours}/{ref}"
            rows.append(ratio_row(medians(results[ours]), medians(results[ref]), label))
        print(table(HEAD, rows))
        print("\nMedian latency (ms) by event number, first round (growth = the server falls behind):")
        for runs in results.values():
            r = runs[0]
            seqs = sorted(r.by_seq)
            picks = sorted({seqs[0], *seqs[len(seqs) // 4 :: max(1, len(seqs) // 4)], seqs[-1]}) if seqs else []
            print(f"- {r.server}: " + ", ".join(f"#{q} {ms(statistics.median(r.by_seq[q]))}" for q in picks))
        for runs in results.values():
            for i, r in enumerate(runs):
                if r.gc_connect or r.gc_publish:
                    print(
                        f"- {r.server} round {i + 1}, server GC pauses ≥ 5 ms: {gc_line(r.gc_connect)} while "
                        f"streams connect; {gc_line(r.gc_publish)} while events flow"
                    )
        for runs in results.values():
            for r in runs:
                if r.errors:
                    print(f"\n{r.server}: errors while opening streams: {r.errors}")
                for profile in r.profiles:
                    print("\n" + profile)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1000,10000", help="comma-separated stream counts for (a)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side per scenario, alternating")
    parser.add_argument("--clients", type=int, default=2, help="load-client processes (default 2)")
    parser.add_argument("--nginx-workers", default="1", help="nginx worker_processes (a number, or auto)")
    parser.add_argument("--processes", type=int, default=1, help="Jobcast server processes sharing the port")
    parser.add_argument("--skip-fanout", action="store_true", help="skip (a)")
    parser.add_argument("--skip-spread", action="store_true", help="skip (b)")
    parser.add_argument("--only", choices=["jobcast", "nchan"], help="run one side only (no ratios)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (logs, configs)")
    parser.add_argument("--profile", action="store_true", help="py-spy the Jobcast server in (a) (slows it down)")
    args = parser.parse_args()

    if args.only != "jobcast" and nchan.find() is None:
        sys.exit(f"sse_fanout: nginx with the nchan module is not installed; {nchan.INSTALL_HINT}")
    limit = harness.raise_fd_limit()
    counts = [int(n) for n in args.streams.split(",") if n.strip()]
    if 2 * max(counts) // args.clients + 100 > limit:
        sys.exit(f"sse_fanout: the open-file limit is {limit}; use more --clients or fewer --streams")
    folder = Path(tempfile.mkdtemp(prefix="jobcast-bench-sse-"))
    print("# SSE fan-out: Jobcast vs nginx+nchan\n")
    print(table(["machine", ""], list(harness.machine().items())))
    print(
        f"\nload client: {args.clients} process(es); nginx workers: {args.nginx_workers}; "
        f"{args.rounds} round(s) per side; logs in {folder}"
    )

    def sides(jobcast: Callable[[int], Run], reference: Callable[[int], Run]) -> dict[str, Callable[[int], Run]]:
        chosen = {"jobcast": jobcast, "nchan": reference}
        return {k: v for k, v in chosen.items() if args.only in (None, k)}

    try:
        if not args.skip_fanout:
            for n in counts:
                results = compare(
                    f"(a) {n} streams on one job, {FANOUT_EVENTS} events at {FANOUT_RATE:g}/s",
                    sides(
                        lambda i, n=n: fanout_jobcast(args, n, folder / f"jobcast-{n}-{i}"),
                        lambda i, n=n: fanout_nchan(args, n, folder / f"nchan-{n}-{i}"),
                    ),
                    args.rounds,
                )
                if len(results) == 2:
                    ours, ref = medians(results["jobcast"]), medians(results["nchan"])
                    print("\nTargets (issue 3):\n" + "\n".join(verdicts_fanout(results["jobcast"], ours, ref)))
        if not args.skip_spread:
            results = compare(
                f"(b) {SPREAD_JOBS} events/s spread over {SPREAD_JOBS} streams for {SPREAD_EVENTS}s",
                sides(
                    lambda i: spread_jobcast(args, folder / f"jobcast-spread-{i}"),
                    lambda i: spread_nchan(args, folder / f"nchan-spread-{i}"),
                ),
                args.rounds,
            )
            for runs in results.values():
                for r in runs:
                    print(
                        f"\n{r.server}: CPU-s "
                        + ", ".join(f"{k} {v:.2f}" for k, v in r.cpu.items())
                        + f" over {r.cpu_wall:.1f}s"
                    )
            if "jobcast" in results:
                m = medians(results["jobcast"])
                delivered = sum(r.received for r in results["jobcast"]) / sum(r.expected for r in results["jobcast"])
                print(
                    f"\nTargets (issue 3), medians: p50 ≤ 5 ms: {mark(m['p50'] <= 5)} ({ms(m['p50'])} ms); "
                    f"p99 ≤ 20 ms: {mark(m['p99'] <= 20)} ({ms(m['p99'])} ms); delivered {100 * delivered:.2f}%"
                )
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
