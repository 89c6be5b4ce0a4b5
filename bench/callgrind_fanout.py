"""Instructions per delivered event in the Jobcast server, counted by valgrind's callgrind: a
repeatable CPU-per-event figure on a shared machine, for comparing two versions of the stream path.

    .venv/bin/python bench/callgrind_fanout.py                    # this checkout
    .venv/bin/python bench/callgrind_fanout.py --streams 500 --events 20
    .venv/bin/python bench/callgrind_fanout.py --phase connect --streams 2000   # per stream open

The server (``bench.serve jobcast``) runs under ``valgrind --tool=callgrind --instr-atstart=no``;
the load client (:mod:`bench.sse_client`, in a process of its own) opens N streams on one running
job; instrumentation is switched on (``callgrind_control -i on``), 20 ``Store.progress()`` events are
published and read by every stream, and switched off before the dump. The figure is
the server's instructions (Ir) over that window divided by N x events. With ``--phase connect``
the window is the opening of the N streams instead (their requests, the Redis calls, the heads and
replays), divided by N: the CPU of a stream open. Run it from each checkout to compare (both use
that checkout's server code).
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

from bench import harness
from bench.harness import AUTH, Processes, free_port, say
from bench.sse_fanout import Clients, Run, new_running_job
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store, redis_client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--phase", choices=["events", "connect"], default="events", help="what is counted")
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
        web = procs.start("web", command, harness.jobcast_env(redis_server.url))
        harness.wait_http(port, web, timeout=300)

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
    dumps = sorted(folder.glob("callgrind.out*"))
    total = 0
    for dump in dumps:
        text = dump.read_text(errors="replace")
        # "summary:" may be written as 0 before the costs, and "totals:" after them: take the largest.
        for match in re.finditer(r"^(?:summary|totals): (\d+)", text, re.MULTILINE):
            total = max(total, int(match[1]))
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


if __name__ == "__main__":
    main()
