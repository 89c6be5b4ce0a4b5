"""``jobcast dev``: Redis, a worker and the web server from one command, stopped by one Ctrl-C.

What runs:

- **Redis.** ``JOBCAST_REDIS_URL`` (or the cells of ``JOBCAST_REDIS_URLS``), when set, is used as is.
  Otherwise one embedded cell: a private redis-server
  (:mod:`jobcast.cli.embedded_redis`) keeps its append-only files in ``<data dir>/redis``, so jobs survive a
  restart of ``jobcast dev`` on the same data dir. It listens on port 6399 when it can bind it, so a
  ``redis-cli -p 6399`` keeps working across restarts, else on any free port; the banner says which.
  It is counted as up only when the Redis answering on that port is the process it started, so two
  runs at once never share one Redis. Persistence depends on the folder, not the port. A lock file
  in that folder stops a second ``jobcast dev`` from running a second redis-server over the same files;
  while the lock is held the file holds the Redis URL, which is how ``jobcast keys`` run from the
  same folder finds this Redis (:func:`running_dev_redis`).
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

from sqlalchemy.exc import SQLAlchemyError

from jobcast.worker.archive import display_url, migrate_now
from jobcast.worker.connections import redacted
from jobcast.worker.settings import Settings

from .embedded_redis import RedisNotFound, RedisProcess

logger = logging.getLogger(__name__)

PREFERRED_REDIS_PORT = 6399
#: In ``<data dir>/redis``: held (flock) while a ``jobcast dev`` runs there, and holds its Redis URL.
LOCK_FILE = "jobcast-dev.lock"
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
        if env.get("JOBCAST_REDIS_URL") or env.get("JOBCAST_REDIS_URLS"):
            redis_note = "from JOBCAST_REDIS_URL" if env.get("JOBCAST_REDIS_URL") else "cells of JOBCAST_REDIS_URLS"
        else:
            redis = stack.enter_context(_embedded_redis(data_dir / "redis"))
            env["JOBCAST_REDIS_URL"] = redis.url
            _move_to_cells(redis.url)
            redis_note = f"embedded, data in {redis.data_dir}"
        archive_note = _prepare_archive(env, data_dir)
        if signals.stops:
            return
        supervisor = _Supervisor(signals, stop_timeout=max(STOP_TIMEOUT_S, settings.shutdown_grace_s + 5.0))
        stack.callback(supervisor.stop)  # runs before the embedded Redis stops
        if redis is not None and redis.process is not None:
            supervisor.watch("redis", redis.process, log=redis.data_dir / "redis.log")
        command = [sys.executable, "-m", "jobcast"]
        supervisor.start("worker", [*command, "worker"], env)
        supervisor.start("web", [*command, "web", "--host", host, "--port", str(port)], env)
        base_url = f"http://{_client_host(host)}:{port}"
        if not supervisor.wait_ready(f"{base_url}/readyz"):
            return  # stopped while starting
        api_key = next(iter(settings.tenant_keys), None)
        redis_urls = [redis.url] if redis is not None else settings.cell_urls
        _print_banner(base_url, api_key, redis_urls, redis_note, archive_note)
        supervisor.wait_for_stop()


def _prepare_archive(env: dict[str, str], data_dir: Path) -> str:
    """The archive of ``jobcast dev``: a SQLite file in the data directory unless
    ``JOBCAST_ARCHIVE_URL`` says otherwise, migrated before the children start."""
    if not env.get("JOBCAST_ARCHIVE_URL"):
        data_dir.mkdir(parents=True, exist_ok=True)
        env["JOBCAST_ARCHIVE_URL"] = f"sqlite:///{data_dir / 'archive.sqlite3'}"
    url = env["JOBCAST_ARCHIVE_URL"]
    try:
        before, after = migrate_now(url)
    except (SQLAlchemyError, OSError) as exc:
        raise DevError(f"the archive at {display_url(url)} cannot be migrated: {exc}") from None
    migrated = f"migrated {before or 'empty'} -> {after}" if before != after else f"schema {after}"
    return f"{display_url(url)}  ({migrated})"


def _child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    env = dict(environ)
    env.setdefault("JOBCAST_ENV", "development")
    env.setdefault("JOBCAST_SHUTDOWN_GRACE_S", DEV_SHUTDOWN_GRACE_S)
    return env


def _settings(env: Mapping[str, str]) -> Settings:
    """The settings the children will see, checked as they will check them."""
    # Passed explicitly: the rest comes from os.environ, which the children inherit unchanged.
    return Settings.from_env(env=env["JOBCAST_ENV"], shutdown_grace_s=env["JOBCAST_SHUTDOWN_GRACE_S"])


def running_dev_redis(data_dir: Path) -> str | None:
    """The Redis URL of the ``jobcast dev`` running with ``data_dir``, or None when none is."""
    try:
        lock = open(data_dir / "redis" / LOCK_FILE)  # noqa: SIM115 - closed below, after the probe
    except OSError:
        return None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: that `jobcast dev` is running
            url = lock.read().strip()
            return url if url.startswith("redis://") else None
        return None  # a leftover of a `jobcast dev` that has stopped


def _move_to_cells(url: str) -> None:
    """The embedded Redis is this command's own: data written there before 0.3 is moved into cell 0's
    layout now (what ``jobcast migrate --redis`` does for a Redis of one's own)."""
    import asyncio

    from redis.asyncio import Redis

    from jobcast.worker.relayout import Moved, move_to_cells

    async def move() -> Moved:
        client = Redis.from_url(url, decode_responses=True)
        try:
            return await move_to_cells(client)
        finally:
            await client.aclose()

    moved = asyncio.run(move())
    if moved.conflicts:
        raise DevError("cannot move the embedded Redis to the new key layout: " + "; ".join(moved.conflicts))
    if moved.keys:
        logger.info("moved %d keys of the embedded Redis into cell 0's layout", moved.keys)


@contextlib.contextmanager
def _embedded_redis(folder: Path) -> Iterator[RedisProcess]:
    folder.mkdir(parents=True, exist_ok=True)
    # Not opened with "w": that would empty the file of a `jobcast dev` already holding the lock.
    with open(folder / LOCK_FILE, "a+") as lock:
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
        lock.truncate(0)
        lock.write(redis.url + "\n")
        lock.flush()
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


def _print_banner(
    base_url: str, api_key: str | None, redis_urls: list[str], redis_note: str, archive_note: str
) -> None:
    """What dev prints once ready; the Redis URLs without their passwords (the terminal is a log)."""
    key = api_key or "<none: set JOBCAST_API_KEYS>"
    redis_url = ", ".join(redacted(url) for url in redis_urls)
    body = '{"type":"sleep","params":{"seconds":3}}'
    print(
        "\n"
        f"Jobcast is ready at {base_url}  (dashboard: {base_url}/, API: {base_url}/openapi.json)\n"
        f"  API key  {key}\n"
        f"  Redis    {redis_url}  ({redis_note})\n"
        f"  Archive  {archive_note}\n"
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
        #: Where the log of a process that does not write to our terminal is.
        self._logs: dict[str, Path] = {}

    def watch(self, name: str, process: subprocess.Popen[bytes], *, log: Path) -> None:
        """Treat the exit of a process someone else stops (the embedded Redis) as a failure."""
        self._watched[name] = process
        self._logs[name] = log

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
                where = f"its log is {self._logs[name]}" if name in self._logs else "its log is above"
                raise DevError(f"{name} exited unexpectedly ({_describe(returncode)}); {where}")

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
