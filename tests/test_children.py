"""tests/children.py: what the tests start dies with the test run."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from .children import _start_time, running, spawn
from .conftest import ROOT, wait_until

#: A parent that starts a long sleeper through the helper, says its pid and start time, and is
#: SIGKILLed: nothing of it runs on, no cleanup of its own.
PARENT = """
import os, signal, subprocess, sys
from tests.children import _start_time, spawn
child = spawn([sys.executable, "-c", "import time; time.sleep(600)"], stdout=subprocess.DEVNULL)
print(child.pid, _start_time(child.pid), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


async def test_a_child_dies_when_the_process_that_started_it_is_killed() -> None:
    parent = spawn([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out, _ = parent.communicate(timeout=60)
    assert parent.returncode == -signal.SIGKILL, out
    pid, started = out.split()
    child = int(pid)
    try:
        await wait_until(lambda: _gone(child, started), timeout=30)
    finally:
        if running(child, started):  # the helper failed: do not leave the sleeper behind
            os.kill(child, signal.SIGKILL)


#: A run whose child started a grandchild of its own, both still running at its end (stop_all).
LEFT_RUNNING = """
import subprocess, sys, time
from tests.children import _start_time, spawn, stop_all
SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
child = spawn([sys.executable, "-c", f"import subprocess; subprocess.Popen({SLEEP!r}); import time; time.sleep(600)"])
while not (grandchildren := open(f"/proc/{child.pid}/task/{child.pid}/children").read().split()):
    time.sleep(0.01)
pids = [child.pid, int(grandchildren[0])]
print(stop_all(), [_start_time(pid) for pid in pids], flush=True)
"""


def test_the_end_of_the_run_stops_what_is_left_and_what_it_started() -> None:
    run = subprocess.run([sys.executable, "-c", LEFT_RUNNING], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "1 [None, None]", run.stdout + run.stderr


#: A run whose child started a grandchild and ended (and was reaped), the grandchild still running
#: in the child's process group at the run's end (a `jobcast dev` killed, its servers not).
LEADER_GONE = """
import subprocess, sys, time
from tests.children import _start_time, spawn, stop_all
SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
child = spawn([sys.executable, "-c", f"import subprocess; print(subprocess.Popen({SLEEP!r}).pid, flush=True)"],
              stdout=subprocess.PIPE, text=True)
grandchild = int(child.stdout.readline())
child.wait()
started = _start_time(grandchild)
stop_all()
deadline = time.monotonic() + 30
while _start_time(grandchild) == started and time.monotonic() < deadline:
    time.sleep(0.01)
print(started is not None, _start_time(grandchild) != started, flush=True)
"""


def test_the_end_of_the_run_stops_the_group_of_a_child_that_ended() -> None:
    run = subprocess.run([sys.executable, "-c", LEADER_GONE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "True True", run.stdout + run.stderr


async def test_a_child_started_from_another_thread_is_refused() -> None:
    try:
        await asyncio.to_thread(spawn, [sys.executable, "-c", "pass"])
    except RuntimeError as exc:
        assert "main thread" in str(exc)
    else:
        raise AssertionError("spawn ran from a thread whose end would kill the child")


def test_a_child_gets_a_process_group_of_its_own() -> None:
    child = spawn([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
        assert _start_time(child.pid) is not None
    finally:
        child.kill()
        child.wait()
    assert _start_time(child.pid) is None


async def _gone(pid: int, started: str) -> bool:
    return not running(pid, started)
