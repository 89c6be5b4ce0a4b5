"""``jobcast dev``: Redis, a worker and the web server from one command, stopped by one Ctrl-C.

What runs:

- **Redis.** ``JOBCAST_REDIS_URL``, when set, is used as is. Otherwise a private redis-server
  (:mod:`jobcast.cli.embedded_redis`) keeps its append-only files in ``<data dir>/redis``, so jobs survive a
  restart of ``jobcast dev`` on the same data dir. It listens on port 6399 when it can bind it, so a
  ``redis-cli -p 6399`` keeps working across restarts, else on any free port; the banner says which.
  It is counted as up only when the Redis answering on that port is the process it started, so two
  runs at once never share one Redis. Persistence depends on the folder, not the port. A lock file
  in that folder stops a second ``jobcast dev`` from running a second redis-server over the same files.
- **The worker and the web server**, as ``python -m jobcast worker|web`` subprocesses (the Procfile's
  two lines), with the inherited environment plus ``JOBCAST_REDIS_URL``, ``JOBCAST_ENV=development``
  (default secret and the API key ``dev-key``) and ``JOBCAST_SHUTDOWN_GRACE_S=10``; the last two only
  when not already set. The shorter grace lets the worker hand running jobs back before we give up on it.

Supervision. The worker, the web server and redis-server each get a process group of their own, so a
terminal's Ctrl-C reaches only this process. It then stops everything in dependency order: web and
worker together (SIGTERM; SIGKILL after 15 s, or after the worker's grace plus 5 s when that is
longer), Redis last, so the worker can still write while it drains. A second Ctrl-C kills the
stragglers at once. SIGTERM and SIGHUP act like Ctrl-C. A requested stop ends with status 0; a child
that exits on its own (Redis included), or a web server not ready within 30 s, stops the others and
ends with status 1 and a line saying which.

Signal handlers only count; the work happens in the main loop. ``signal.set_wakeup_fd`` (SIGCHLD
included) ends the loop's wait the moment a signal or a child's exit arrives, so there is no polling
latency and nothing runs inside a handler. Not covered: a SIGKILL of this process leaves its children
running, as it would for any supervisor.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import logging
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from pydantic import ValidationError

from jobcast.worker.settings import ConfigError, Settings

from .embedded_redis import RedisNotFound, RedisProcess

logger = logging.getLogger(__name__)

PREFERRED_REDIS_PORT = 6399
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
DEV_SHUTDOWN_GRACE_S = "10"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
# Readiness is checked on this machine: never through an HTTP proxy from the environment.
_LOCAL_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class DevError(Exception):
    """``jobcast dev`` cannot go on; the message says why (and what to do, when we know)."""


def run_dev(*, host: str, port: int, data_dir: str) -> None:
    """Run Redis (unless ``JOBCAST_REDIS_URL`` is set), a worker and the web server until stopped.

    Returns after Ctrl-C, SIGTERM or SIGHUP, everything stopped; raises ``SystemExit(1)`` when a
    process died on its own or the web server did not become ready.
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    env = _child_environment(os.environ)
    settings = _settings(env)  # bad configuration: fail before starting anything
    try:
        with _Signals() as signals:
            _run(signals, settings, env, host=host, port=port, data_dir=Path(data_dir).resolve())
    except DevError as exc:
        print(f"jobcast dev: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _run(signals: _Signals, settings: Settings, env: dict[str, str], *, host: str, port: int, data_dir: Path) -> None:
    with contextlib.ExitStack() as stack:
        redis: RedisProcess | None = None
        if env.get("JOBCAST_REDIS_URL"):
            redis_note = "from JOBCAST_REDIS_URL"
        else:
            redis = stack.enter_context(_embedded_redis(data_dir / "redis"))
            env["JOBCAST_REDIS_URL"] = redis.url
            redis_note = f"embedded, data in {redis.data_dir}"
        if signals.stops:
            return
        supervisor = _Supervisor(signals, stop_timeout=max(STOP_TIMEOUT_S, settings.shutdown_grace_s + 5.0))
        stack.callback(supervisor.stop)  # runs before the embedded Redis stops
        if redis is not None and redis.process is not None:
            supervisor.watch("redis", redis.process)
        command = [sys.executable, "-m", "jobcast"]
        supervisor.start("worker", [*command, "worker"], env)
        supervisor.start("web", [*command, "web", "--host", host, "--port", str(port)], env)
        base_url = f"http://{_client_host(host)}:{port}"
        if not supervisor.wait_ready(f"{base_url}/readyz"):
            return  # stopped while starting
        api_key = next(iter(settings.tenant_keys), None)
        _print_banner(base_url, api_key, env["JOBCAST_REDIS_URL"], redis_note)
        supervisor.wait_for_stop()


def _child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    env = dict(environ)
    env.setdefault("JOBCAST_ENV", "development")
    env.setdefault("JOBCAST_SHUTDOWN_GRACE_S", DEV_SHUTDOWN_GRACE_S)
    return env


def _settings(env: Mapping[str, str]) -> Settings:
    """The settings the children will see, checked as they will check them."""
    try:
        # Passed explicitly: the rest comes from os.environ, which the children inherit unchanged.
        overrides: dict[str, Any] = {"env": env["JOBCAST_ENV"], "shutdown_grace_s": env["JOBCAST_SHUTDOWN_GRACE_S"]}
        settings = Settings(**overrides)
        settings.check_production()
        settings.tenant_keys  # noqa: B018 - parses JOBCAST_API_KEYS, raising ConfigError when malformed
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ConfigError(f"invalid JOBCAST_* setting: {error['loc']}: {error['msg']}") from None
    return settings


@contextlib.contextmanager
def _embedded_redis(folder: Path) -> Iterator[RedisProcess]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "jobcast-dev.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DevError(
                f"another `jobcast dev` is using {folder.parent}; stop it, or pass another --data-dir"
            ) from None
        try:
            redis = RedisProcess(folder, port=PREFERRED_REDIS_PORT, fallback=True)
            redis.start()
        except (RedisNotFound, RuntimeError) as exc:
            raise DevError(f"cannot start the embedded Redis: {exc}") from None
        logger.info("embedded Redis on %s, data in %s", redis.url, folder)
        try:
            yield redis
        finally:
            logger.info("stopping embedded Redis")
            redis.stop()


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def _describe(returncode: int) -> str:
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def _print_banner(base_url: str, api_key: str | None, redis_url: str, redis_note: str) -> None:
    key = api_key or "<none: set JOBCAST_API_KEYS>"
    body = '{"type":"sleep","params":{"seconds":3}}'
    print(
        "\n"
        f"Jobcast is ready at {base_url}  (dashboard: {base_url}/, API: {base_url}/openapi.json)\n"
        f"  API key  {key}\n"
        f"  Redis    {redis_url}  ({redis_note})\n"
        f"  Try      curl -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
        f"                -X POST {base_url}/jobs -d '{body}'\n"
        "  Stop     Ctrl-C\n",
        flush=True,
    )


class _Signals:
    """Stop requests (SIGINT, SIGTERM, SIGHUP) as a counter, and a wait that any signal ends early."""

    def __init__(self) -> None:
        self.stops = 0
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._previous: dict[signal.Signals, _Handler] = {}
        self._previous_wakeup_fd = -1

    def __enter__(self) -> _Signals:
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_stop)
        # A Python handler, even one that does nothing, is what makes SIGCHLD reach the wakeup fd.
        self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_child)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stops += 1

    def _on_child(self, signum: int, frame: FrameType | None) -> None:
        pass

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds, less if a signal (a child's exit included) arrives."""
        select.select([self._read_fd], [], [], max(timeout, 0.0))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read_fd, 512):
                pass


class _Supervisor:
    """Starts the worker and the web server, watches them (and Redis), and stops them."""

    def __init__(self, signals: _Signals, *, stop_timeout: float) -> None:
        self._signals = signals
        self._stop_timeout = stop_timeout
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._watched: dict[str, subprocess.Popen[bytes]] = {}

    def watch(self, name: str, process: subprocess.Popen[bytes]) -> None:
        """Treat the exit of a process someone else stops (the embedded Redis) as a failure."""
        self._watched[name] = process

    def start(self, name: str, args: list[str], env: Mapping[str, str]) -> None:
        # Own process group: a terminal's Ctrl-C reaches us only, and we stop children in order.
        process = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, process_group=0)
        self._children[name] = process
        logger.info("started %s (pid %d)", name, process.pid)

    def check(self) -> None:
        """Raise :class:`DevError` when a process has exited: nothing should, unless asked to."""
        for name, process in (self._watched | self._children).items():
            returncode = process.poll()
            if returncode is not None:
                raise DevError(f"{name} exited unexpectedly ({_describe(returncode)}); its log is above")

    def wait_ready(self, url: str) -> bool:
        """Wait for ``url`` to answer 200: True when it does, False when a stop was asked first."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._signals.stops:
            self.check()
            if _answers_200(url):
                return True
            if time.monotonic() > deadline:
                raise DevError(f"the web server did not answer {url} within {READY_TIMEOUT_S:.0f}s")
            self._signals.wait(0.2)
        return False

    def wait_for_stop(self) -> None:
        while not self._signals.stops:
            self.check()
            self._signals.wait(5.0)  # a fallback only: a child's exit (SIGCHLD) ends the wait
        logger.info("stopping (press Ctrl-C again to force)")

    def stop(self) -> None:
        """SIGTERM every child, SIGKILL those still running after the stop timeout or a second stop."""
        stops = self._signals.stops
        running = {name: p for name, p in self._children.items() if p.poll() is None}
        for name, process in running.items():
            logger.info("stopping %s (pid %d)", name, process.pid)
            process.terminate()
        deadline = time.monotonic() + self._stop_timeout
        while any(p.poll() is None for p in running.values()):
            if self._signals.stops > stops or time.monotonic() >= deadline:
                break
            self._signals.wait(deadline - time.monotonic())
        for name, process in running.items():
            if process.poll() is None:
                logger.warning("%s (pid %d) is still running; killing it", name, process.pid)
                process.kill()
                process.wait()
            logger.info("%s stopped (%s)", name, _describe(process.returncode))


def _answers_200(url: str) -> bool:
    try:
        with _LOCAL_OPENER.open(url, timeout=2.0) as response:
            status: int = response.status
            return status == 200
    except urllib.error.HTTPError as exc:  # 503: Redis not answering yet
        exc.close()
        return False
    except (OSError, http.client.HTTPException):  # not listening yet, or cut off mid-answer
        return False
