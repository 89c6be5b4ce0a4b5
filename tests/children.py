"""The processes the tests start (``jobcast web``/``worker``/``dev``, redis-servers, CLI commands)
die with the test run, whatever happens to the test or to pytest.

A test that fails between starting a process and the ``try`` that stops it, or a pytest killed
outright (a CI timeout's SIGKILL), used to leave them running, holding ports, files and CPU. So every
spawn site of the suite goes through :func:`spawn` or :func:`spawn_async` (:func:`redis_process`
for a :class:`RedisProcess`), which:

- ask the kernel to SIGKILL the child when the thread that started it ends (``prctl(2)``
  ``PR_SET_PDEATHSIG``, Linux), set between fork and exec; a child whose parent died before that
  kills itself. That covers a pytest killed outright. It is the starting *thread* that counts, so
  spawn only from the main thread (:func:`spawn` refuses otherwise);
- put the child in a process group of its own (unless the caller chose one), so that what it
  starts in turn can be stopped with it, and a terminal's Ctrl-C reaches pytest only;
- record the child (pid and start time, so that a pid used again by another process is never
  signalled), for :func:`stop_all`: at the end of the run (conftest's ``pytest_sessionfinish``, and
  at exit), each child's group still running gets SIGTERM (``jobcast dev`` and a multi-process
  ``jobcast web`` stop their own children then), and SIGKILL after :data:`STOP_WAIT_S`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jobcast.cli.embedded_redis import RedisProcess

PR_SET_PDEATHSIG = 1
#: How long :func:`stop_all` waits for the children it sent SIGTERM before it SIGKILLs their groups.
STOP_WAIT_S = 10.0

_libc = ctypes.CDLL(None, use_errno=True)
#: The children started, as (pid, start time, whether it leads its own process group).
_started: list[tuple[int, str, bool]] = []


def _die_with(parent: int) -> Callable[[], None]:
    """The child's ``preexec_fn``: SIGKILL when the parent's starting thread ends."""

    def preexec() -> None:
        if _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            os._exit(127)  # no promise to die with the run: no child
        if os.getppid() != parent:  # the parent died before the promise was made
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _options(options: dict[str, Any]) -> dict[str, Any]:
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("spawn from the main thread: a child dies with the thread that started it")
    if options.get("preexec_fn") is not None:
        raise ValueError("spawn sets preexec_fn itself")
    if "process_group" not in options and not options.get("start_new_session"):
        options["process_group"] = 0
    return {**options, "preexec_fn": _die_with(os.getpid())}


def _record(pid: int, options: dict[str, Any]) -> None:
    if not _started:
        atexit.register(stop_all)
    own_group = options.get("process_group") == 0 or bool(options.get("start_new_session"))
    _started.append((pid, _start_time(pid) or "", own_group))


def spawn(args: Sequence[str], **options: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(args, **options)``, for a child that dies with the test run."""
    options = _options(options)
    process: subprocess.Popen[Any] = subprocess.Popen(args, **options)
    _record(process.pid, options)
    return process


async def spawn_async(program: str, *args: str, **options: Any) -> asyncio.subprocess.Process:
    """``asyncio.create_subprocess_exec(program, *args, **options)``, for a child that dies with the test run."""
    options = _options(options)
    process = await asyncio.create_subprocess_exec(program, *args, **options)
    _record(process.pid, options)
    return process


def child_pids(pid: int) -> list[int]:
    """The pids of ``pid``'s children (Linux: its main thread's), in the order they were started."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def redis_process(data_dir: Path, **options: Any) -> RedisProcess:
    """A :class:`RedisProcess` (``options`` as its own) whose redis-server dies with the test run."""
    return RedisProcess(data_dir, spawn=spawn, **options)


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None when it has ended (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after the name, which may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def running(pid: int, started: str) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs (not the pid of another)."""
    return _start_time(pid) == started


def stop_all() -> int:
    """Stop every child still running (and its process group); how many there were."""
    left = [(pid, started, group) for pid, started, group in _started if running(pid, started)]
    for pid, started, group in _started:
        if group and not running(pid, started):
            # Its leader is gone but members may be left (a `jobcast dev` killed, its servers not):
            # a group id is not given to a new process while any member lives, so this reaches
            # only them, or no one.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    _started.clear()
    count = len(left)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, _, group in left:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
        deadline = time.monotonic() + STOP_WAIT_S
        while any(running(pid, started) for pid, started, _ in left) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [child for child in left if running(child[0], child[1])]
        if not left:
            break
    return count
