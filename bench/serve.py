"""The HTTP servers under test, each run as a subprocess by :mod:`bench.harness`.

    python -m bench.serve jobcast --port P   what ``jobcast web`` runs: create_app() under uvicorn with
                                             uvloop and jobcast web's configuration (server_config:
                                             the guarded httptools protocol), JobcastServer (drain on
                                             SIGTERM); but log level warning and no access log
    python -m bench.serve jobcast --port P --processes N
                                             N such servers sharing the port (SO_REUSEPORT), as
                                             ``jobcast web --processes N`` runs them; this process
                                             waits for them and passes SIGTERM on
    python -m bench.serve bare --port P      the reference for the submission rate: a bare Starlette
                                             ``POST /jobs`` that reads the body, does one Redis SET
                                             and answers 202, under the same uvicorn settings

Both read the ``JOBCAST_*`` environment (the Redis URL, ...), like the product. Two knobs for
experiments, read from the environment by this file only (the product has no such settings):

    BENCH_GC_THRESHOLD=50000,20,100   gc.set_threshold(...) before serving
    BENCH_GC_LOG=1                    log every garbage collection that takes 5 ms or more, as
                                      ``gc: gen2 942 ms``; the benchmarks sum these up
    BENCH_LINGER_S=0                  how long a tenant channel stays subscribed after its last
                                      listener left (jobcast.channels.LINGER_S)
    BENCH_CPROFILE=out.pstats         cProfile the server between SIGUSR1 (start) and SIGUSR2 (stop,
                                      write the stats to the file): one phase of a benchmark
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobcast import channels
from jobcast.app import JobcastServer, create_app, server_config
from jobcast.cli.web import reuse_port_socket
from jobcast.worker import collector
from jobcast.worker.settings import Settings
from jobcast.worker.store import redis_client


def bare_app(settings: Settings) -> Starlette:
    counter = itertools.count()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.redis = redis_client(settings)
        yield
        await app.state.redis.aclose()

    async def submit(request: Request) -> Response:
        body = await request.body()
        await request.app.state.redis.set(f"bare:{next(counter)}", body, ex=600)
        return Response(b'{"status":"queued"}', status_code=202, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(
        routes=[Route("/jobs", submit, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])],
        lifespan=lifespan,
    )


def log_slow_collections(threshold_s: float = 0.005) -> None:
    started = 0.0

    def callback(phase: str, info: dict[str, int]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        elif (took := time.perf_counter() - started) >= threshold_s:
            print(f"gc: gen{info['generation']} {1000 * took:.0f} ms", file=sys.stderr, flush=True)

    gc.callbacks.append(callback)


def profile_on_signals(out: str) -> None:
    """cProfile from SIGUSR1 to SIGUSR2, then the stats written to ``out`` (BENCH_CPROFILE)."""
    import cProfile

    profiler = cProfile.Profile()

    def start(signum: int, frame: object) -> None:
        profiler.enable()

    def stop(signum: int, frame: object) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


def supervise(port: int, processes: int) -> None:
    command = [sys.executable, "-m", "bench.serve", "jobcast", "--port", str(port), "--shared-port"]
    children = [subprocess.Popen(command) for _ in range(processes)]

    def forward(signum: int, frame: object) -> None:
        for child in children:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("app", choices=["jobcast", "bare"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--shared-port", action="store_true")
    args = parser.parse_args()
    if args.processes > 1:
        supervise(args.port, args.processes)
        return

    if args.app == "jobcast":
        collector.tune()  # as `jobcast web` does
    if threshold := os.environ.get("BENCH_GC_THRESHOLD"):  # to experiment with other thresholds
        gc.set_threshold(*(int(v) for v in threshold.split(",")))
    if os.environ.get("BENCH_GC_LOG"):
        log_slow_collections()
    if out := os.environ.get("BENCH_CPROFILE"):
        profile_on_signals(out)
    if (linger := os.environ.get("BENCH_LINGER_S")) is not None:
        channels.LINGER_S = float(linger)
    settings = Settings()
    app = create_app(settings) if args.app == "jobcast" else bare_app(settings)
    # jobcast web's own uvicorn configuration (its guarded httptools protocol, the /ws options),
    # for the reference app too; only the logging differs (nginx's access log is off as well).
    config = server_config(
        app,
        settings,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    if args.app == "jobcast":
        sockets = [reuse_port_socket("127.0.0.1", args.port)] if args.shared_port else None
        JobcastServer(config, app).run(sockets=sockets)
    else:
        uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
