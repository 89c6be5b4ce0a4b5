"""``jobcast web``: the HTTP server, in one process or in N processes that share the port.

One Python process serves on one core. With ``JOBCAST_WEB_PROCESSES=N`` (or ``--processes N``;
0, the default, means one per core in production and one in development) ``jobcast web`` becomes a
small supervisor: it reserves the port, then runs N ``jobcast web`` server processes that each bind
it with ``SO_REUSEPORT``, so the kernel spreads new connections over them. Each process has its own
hub (one Redis pub/sub connection) and its own stream cap; the per-tenant cap is in Redis and holds
across them.

On SIGTERM or SIGINT the supervisor passes the signal to every server process — each drains its
streams at once (clients resume with Last-Event-ID) — waits for all of them, then exits by the same
signal, as a single uvicorn does. If one server process dies on its own, the supervisor stops the
others and exits with its status: the platform's process manager restarts the whole group.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from jobcast.worker import collector
from jobcast.worker.settings import Settings

logger = logging.getLogger(__name__)


def process_count(settings: Settings, requested: int | None) -> int:
    wanted = requested if requested is not None else settings.web_processes
    if wanted > 0:
        return wanted
    return (os.cpu_count() or 1) if settings.env == "production" else 1


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` that other processes of this user may bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def serve(settings: Settings, host: str, port: int, *, shared_port: bool) -> None:
    """Run one server process (on a socket it shares with its siblings when ``shared_port``)."""
    from ..app import JobcastServer, create_app, server_config

    app = create_app(settings, bind_host=host)
    config = server_config(
        app,
        settings,
        host=host,
        port=port,
        loop="uvloop",
        timeout_graceful_shutdown=10,
        log_config=None,  # our handlers (worker.logs), so JOBCAST_LOG_FORMAT applies to uvicorn's lines too
    )
    collector.tune()
    server = JobcastServer(config, app)
    if shared_port:
        server.run(sockets=[reuse_port_socket(host, port)])
    else:
        server.run()


def supervise(host: str, port: int, processes: int) -> None:
    """Run ``processes`` server processes on one port until a signal (or one of them dies)."""
    reserved = reuse_port_socket(host, port)  # holds the port (and picks it when 0) meanwhile
    port = reserved.getsockname()[1]
    command = [sys.executable, "-m", "jobcast", "web", "--host", host, "--port", str(port), "--shared-port"]
    children = [subprocess.Popen(command) for _ in range(processes)]
    logger.info("jobcast web: %d server processes on %s:%d (pids %s)", processes, host, port, [c.pid for c in children])
    received: list[int] = []

    def stop_all() -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop_all()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while any(child.poll() is None for child in children):
        for child in children:
            code = child.poll()
            if code is not None and not received and not status:
                logger.error("jobcast web: server process %d exited (%s); stopping the others", child.pid, code)
                status = code if code > 0 else 1
                stop_all()
        time.sleep(0.1)
    reserved.close()
    if received:
        signal.signal(received[0], signal.SIG_DFL)
        os.kill(os.getpid(), received[0])
    sys.exit(status)
