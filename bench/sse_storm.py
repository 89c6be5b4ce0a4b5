"""Reconnect storm (issue 12): N open streams, a web restart, every client back with Last-Event-ID.

    .venv/bin/python bench/sse_storm.py                     # 10k streams, Jobcast and nchan's connect
    .venv/bin/python bench/sse_storm.py --streams 1000 --only jobcast

Jobcast: N streams on one running job (the load client of :mod:`bench.sse_fanout`), 10 events at
10/s, then the server is stopped (SIGTERM: it drains every stream), 5 events are published while no
server runs, a new server starts on the same port, and every client reconnects with the id of the
last event it received. Figure: the time from the first reconnect to the last 200 (clients start
once the new server answers, as EventSource clients retrying every ``retry`` ms would). Then 5 more
events; every stream must hold all 20, none twice (the client counts a repeated event as a
duplicate across connections, and a skipped one stays missing).

The reference is nginx+nchan's time to connect N fresh streams in the same run (the target is
≤ 2x that).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import tempfile
import time
from typing import Any

from bench import harness, nchan
from bench.harness import AUTH, Processes, say, table
from bench.sse_fanout import FANOUT_RATE, Clients, Run, new_running_job
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store, redis_client

BEFORE, WHILE_DOWN, AFTER = 10, 5, 5


class StormClients(Clients):
    def reconnect(self, port: int) -> dict[str, Any]:
        answers = self._ask(("reconnect", port), 600)
        errors: dict[str, int] = {}
        for a in answers:
            for k, v in a["errors"].items():
                errors[k] = errors.get(k, 0) + v
        return {
            "resumed": sum(a["resumed"] for a in answers),
            "seconds": (max(a["t1"] for a in answers) - min(a["t0"] for a in answers)) / 1e9,
            "errors": errors,
        }


def jobcast_storm(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    with Processes(folder) as procs:
        redis_server = procs.redis()
        web, port = procs.jobcast_web(redis_server.url, processes=args.processes)
        settings = Settings(redis_url=redis_server.url)

        async def store_call(fn: Any) -> Any:
            redis = redis_client(settings)
            try:
                return await fn(Store(redis, settings))
            finally:
                await redis.aclose()

        job_id = asyncio.run(new_running_job(settings))

        def publish(first: int, count: int, rate: float | None) -> None:
            async def go(store: Store) -> None:
                t0 = time.monotonic()
                for i, seq in enumerate(range(first, first + count)):
                    if rate:
                        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
                    await store.progress(job_id, 1, seq, None, f"bseq={seq} t={time.time_ns()}")

            asyncio.run(store_call(go))

        run = Run("Jobcast", args.streams)
        paths = [f"/jobs/{job_id}/events"] * args.streams
        clients = StormClients(args.clients, port, paths, {"Authorization": AUTH}, 200)
        try:
            say(f"Jobcast: opening {args.streams} streams")
            clients.connect(run)
            publish(1, BEFORE, FANOUT_RATE)
            clients.start_collect(BEFORE, time.time() + 60)
            clients.finish_collect(Run("Jobcast", args.streams), BEFORE, 90)
            say("Jobcast: restarting the server")
            procs.stop(web)
            publish(BEFORE + 1, WHILE_DOWN, None)
            procs.jobcast_web(redis_server.url, name="web2", processes=args.processes, port=port)
            say("Jobcast: clients reconnect with Last-Event-ID")
            storm = clients.reconnect(port)
            publish(BEFORE + WHILE_DOWN + 1, AFTER, FANOUT_RATE)
            total = BEFORE + WHILE_DOWN + AFTER
            final = Run("Jobcast", args.streams)
            clients.start_collect(total, time.time() + 60)
            clients.finish_collect(final, total, 90)
        finally:
            clients.close()
    return {
        "connect_s": run.connect_s,
        "storm_s": storm["seconds"],
        "resumed": storm["resumed"],
        "errors": storm["errors"],
        "received": final.received,
        "expected": args.streams * total,
        "duplicates": final.duplicates,
    }


def nchan_connect(args: argparse.Namespace, folder: Path) -> float:
    with Processes(folder) as procs:
        _, port = nchan.start(procs, workers=args.nginx_workers)
        run = Run("nginx+nchan", args.streams)
        clients = Clients(args.clients, port, ["/sub/fanout"] * args.streams, {}, 200)
        try:
            say(f"nchan: opening {args.streams} streams")
            clients.connect(run)
        finally:
            clients.close()
    return run.connect_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--processes", type=int, default=1, help="Jobcast server processes sharing the port")
    parser.add_argument("--nginx-workers", default="1")
    parser.add_argument("--only", choices=["jobcast"], help="skip nchan's reference connect")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="jobcast-bench-storm-"))
    print(f"# Reconnect storm: {args.streams} streams, {args.processes} Jobcast process(es); logs in {folder}\n")
    print(f"load {harness.machine().get('load', '?')}\n")
    result = jobcast_storm(args, folder / "jobcast")
    reference = float("nan") if args.only else nchan_connect(args, folder / "nchan")
    rows = [
        ["Jobcast: connect N fresh streams", f"{result['connect_s']:.2f} s"],
        ["Jobcast: N streams resumed after a restart", f"{result['storm_s']:.2f} s ({result['resumed']} resumed)"],
        ["nginx+nchan: connect N fresh streams", f"{reference:.2f} s"],
        ["storm / nchan connect", f"{result['storm_s'] / reference:.2f}x (target ≤ 2x)"],
        ["events delivered", f"{result['received']}/{result['expected']}"],
        ["lost", str(result["expected"] - result["received"])],
        ["duplicated", str(result["duplicates"])],
        ["refused/failed reconnect attempts", str(result["errors"] or 0)],
    ]
    print(table(["figure", "value"], rows))


if __name__ == "__main__":
    main()
