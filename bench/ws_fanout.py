"""WebSocket fan-out beside SSE, in the same run (issue 16, bench).

    .venv/bin/python bench/ws_fanout.py                        # 10k sockets vs 10k SSE streams, 2 rounds
    .venv/bin/python bench/ws_fanout.py --streams 1000,10000 --rounds 1

Scenario (a) of :mod:`bench.sse_fanout`, once over SSE (``GET /jobs/{id}/events``) and once over
``GET /ws`` (one socket per client, each subscribed to ``job:<id>``), on fresh servers, alternating
which goes first: N idle connections (memory per connection: server RSS with N open minus before,
/ N), then 20 ``job.progress`` events at 10/s published with the same Lua call a worker makes, each
carrying ``bseq=<n> t=<epoch ns>``; latency = the client's receive time minus ``t``. The ratio row
is WebSocket / SSE of the medians.

Both load clients are bare asyncio protocols of the same weight (:mod:`bench.sse_client`,
:mod:`bench.ws_client`: no HTTP or WebSocket library per message), so that the ratio is the
server's. Their CPU is printed; at 10k connections on 2 shared cores the clients are part of what
the latency measures.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import shutil
import tempfile

from bench import harness
from bench.harness import table
from bench.sse_fanout import compare, fanout_jobcast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="10000", help="comma-separated connection counts")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--clients", type=int, default=2, help="load-client processes (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (logs)")
    args = parser.parse_args()
    args.profile = False

    limit = harness.raise_fd_limit()
    counts = [int(n) for n in args.streams.split(",") if n.strip()]
    if 2 * max(counts) // args.clients + 100 > limit:
        sys.exit(f"ws_fanout: the open-file limit is {limit}; use more --clients or fewer --streams")
    folder = Path(tempfile.mkdtemp(prefix="jobcast-bench-ws-"))
    print("# WebSocket fan-out beside SSE (Jobcast)\n")
    print(table(["machine", ""], list(harness.machine().items())))
    print(f"\nload client: {args.clients} process(es) per side; {args.rounds} round(s) per side; logs in {folder}")
    try:
        for n in counts:
            compare(
                f"{n} connections on one job, 20 events at 10/s",
                {
                    "ws": lambda i, n=n: fanout_jobcast(args, n, folder / f"ws-{n}-{i}", transport="ws"),
                    "sse": lambda i, n=n: fanout_jobcast(args, n, folder / f"sse-{n}-{i}", transport="sse"),
                },
                args.rounds,
            )
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
