"""``jobcast dev``: one command runs Redis, a worker and the web server; Ctrl-C stops all of them.

Real processes throughout: ``python -m jobcast dev`` with its embedded Redis, on a free port and
a temporary data dir. Its children are found (and later checked for) through ``/proc``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from jobcast.cli.dev import _print_banner
from jobcast.cli.embedded_redis import answering_pid, free_port

from .children import redis_process, spawn
from .sentinel import SentinelCell

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds child processes in /proc")

AUTH = {"Authorization": "Bearer dev-key"}
SLEEP_JOB = {"type": "sleep", "params": {"seconds": 0.2, "steps": 2}}
READY_WAIT_S = 60.0
JOB_WAIT_S = 30.0
EXIT_WAIT_S = 20.0


@dataclass(frozen=True)
class Proc:
    """A process, by pid and start time (so a reused pid is not mistaken for it)."""

    pid: int
    started: str
    cmdline: str

    def alive(self) -> bool:
        try:
            state, started = _stat(self.pid)
        except OSError:
            return False
        return started == self.started and state != "Z"


def _stat(pid: int) -> tuple[str, str]:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return fields[0], fields[19]  # state, starttime (fields 3 and 22 of proc(5))


def children_of(pid: int) -> list[Proc]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) != pid:
                continue
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # it exited while we looked
            continue
        found.append(Proc(int(stat.parent.name), fields[19], cmdline))
    return found


def role(child: Proc) -> str:
    if "redis-server" in child.cmdline:
        return "redis"
    return child.cmdline.split()[3]  # python -m jobcast <role> ...


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


class Dev:
    """One ``jobcast dev`` process; its output (and its children's) goes to a file."""

    def __init__(self, data_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # No JOBCAST_* from the outside: no JOBCAST_REDIS_URL (so Redis is embedded), the dev API key.
        clean = {name: value for name, value in os.environ.items() if not name.startswith("JOBCAST_")}
        env = {**clean, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        args = [sys.executable, "-m", "jobcast", "dev", "--port", str(self.port), "--data-dir", str(data_dir)]
        with open(log_path, "wb") as log:
            # Its own process group, as a shell gives a foreground job: see interrupt().
            self.process = spawn(args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, process_group=0)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        """Wait for /readyz to answer 200 and for the banner (jobcast dev's own readiness check)."""
        deadline = time.monotonic() + READY_WAIT_S
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, f"jobcast dev exited early:\n{self.output()}"
                try:
                    ready = client.get("/readyz").status_code == 200
                except httpx.TransportError:
                    ready = False
                if ready and f"Jobcast is ready at {self.base_url}" in self.output():
                    return
                time.sleep(0.1)
        pytest.fail(f"jobcast dev was not ready within {READY_WAIT_S}s:\n{self.output()}")

    def redis_port(self) -> int:
        """The port of the embedded redis-server, from its process title (``redis-server 127.0.0.1:6399``)."""
        (redis,) = [child for child in children_of(self.process.pid) if role(child) == "redis"]
        return int(redis.cmdline.split()[1].rpartition(":")[2])

    def wait_exit(self) -> int:
        try:
            return self.process.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"jobcast dev did not exit within {EXIT_WAIT_S}s:\n{self.output()}")

    def interrupt(self) -> int:
        """Ctrl-C as a terminal sends it, to the whole foreground process group; the exit status."""
        os.killpg(self.process.pid, signal.SIGINT)
        return self.wait_exit()

    def close(self) -> None:
        """Teardown: whatever happened in the test, leave no process behind."""
        children = children_of(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for child in children:
            if child.alive():
                os.kill(child.pid, signal.SIGKILL)


@pytest.fixture
def start_dev(tmp_path: Path) -> Iterator[Callable[..., Dev]]:
    """``start(data_dir, env=None)``: a ready ``jobcast dev``, stopped at teardown whatever happened."""
    runs: list[Dev] = []

    def start(data_dir: Path, env: dict[str, str] | None = None) -> Dev:
        dev = Dev(data_dir, tmp_path / f"dev-{len(runs)}.log", env)
        runs.append(dev)
        dev.wait_ready()
        return dev

    yield start
    for dev in runs:
        dev.close()


def submit(dev: Dev, body: dict[str, Any]) -> str:
    with httpx.Client(base_url=dev.base_url, headers=AUTH, timeout=15.0) as client:
        response = client.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def wait_for_job(dev: Dev, job_id: str, until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The job resource, once ``until`` holds for it (long-polling with ``?wait=``)."""
    job: dict[str, Any] = {}
    with httpx.Client(base_url=dev.base_url, headers=AUTH, timeout=15.0) as client:
        deadline = time.monotonic() + JOB_WAIT_S
        while time.monotonic() < deadline:
            response = client.get(f"/jobs/{job_id}", params={"wait": 5})
            assert response.status_code == 200, response.text
            job = response.json()
            if until(job):
                return job
            assert job["status"] in ("queued", "processing"), job
    pytest.fail(f"job {job_id} is still {job} after {JOB_WAIT_S}s:\n{dev.output()}")


def statuses(job: dict[str, Any]) -> list[str]:
    return [entry["status"] for entry in job["history"]]


def run_sleep_job(dev: Dev) -> dict[str, Any]:
    """Submit a short ``sleep`` job with the development API key and wait until it completes."""
    return wait_for_job(dev, submit(dev, SLEEP_JOB), lambda job: job["status"] == "completed")


@pytest.mark.timeout(90)
def test_dev_runs_jobs_and_ctrl_c_stops_every_process(start_dev: Callable[..., Dev], tmp_path: Path) -> None:
    dev = start_dev(tmp_path / "data")
    children = children_of(dev.process.pid)
    assert sorted(role(child) for child in children) == ["redis", "web", "worker"]

    job = run_sleep_job(dev)
    assert job["result"] == {"slept": 0.2}
    redis_port = dev.redis_port()

    assert dev.interrupt() == 0, dev.output()
    assert [child for child in children if child.alive()] == []
    assert not accepts_connections(dev.port)
    # The dev's Redis no longer answers on its port. Another run's may, at once (jobcast dev prefers
    # 6399, and with two suites at once the other one's dev takes it as soon as it is free).
    (redis,) = [child for child in children if role(child) == "redis"]
    assert answering_pid(redis_port) != redis.pid


@pytest.mark.timeout(90)
def test_dev_keeps_jobs_across_restarts(start_dev: Callable[..., Dev], tmp_path: Path) -> None:
    first = start_dev(tmp_path / "data")
    job_id = run_sleep_job(first)["id"]
    assert first.interrupt() == 0, first.output()

    second = start_dev(tmp_path / "data")
    with httpx.Client(base_url=second.base_url, headers=AUTH, timeout=15.0) as client:
        response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed"
    assert response.json()["result"] == {"slept": 0.2}
    assert second.interrupt() == 0, second.output()


@pytest.mark.timeout(90)
def test_dev_stops_everything_and_fails_when_a_process_dies(start_dev: Callable[..., Dev], tmp_path: Path) -> None:
    dev = start_dev(tmp_path / "data")
    children = children_of(dev.process.pid)
    redis_port = dev.redis_port()
    redis_pid = next(child.pid for child in children if role(child) == "redis")
    worker = next(child for child in children if role(child) == "worker")

    os.kill(worker.pid, signal.SIGKILL)

    assert dev.wait_exit() == 1
    assert "worker exited unexpectedly (signal SIGKILL)" in dev.output()
    assert [child for child in children if child.alive()] == []
    assert not accepts_connections(dev.port)
    # Not "the port is closed": another run's `jobcast dev` may take 6399 as soon as it is free.
    assert answering_pid(redis_port) != redis_pid


@pytest.mark.timeout(90)
def test_dev_refuses_a_data_dir_already_in_use(start_dev: Callable[..., Dev], tmp_path: Path) -> None:
    start_dev(tmp_path / "data")

    second = Dev(tmp_path / "data", tmp_path / "second.log")
    try:
        assert second.wait_exit() == 1
    finally:
        second.close()
    assert "another `jobcast dev` is using" in second.output()


@pytest.mark.timeout(90)
def test_ctrl_c_hands_a_running_job_back_before_redis_stops(start_dev: Callable[..., Dev], tmp_path: Path) -> None:
    # A short worker grace, so the running job is handed back quickly instead of finishing.
    grace = {"JOBCAST_SHUTDOWN_GRACE_S": "1"}
    first = start_dev(tmp_path / "data", grace)
    job_id = submit(first, {"type": "sleep", "params": {"seconds": 600, "steps": 600}})
    wait_for_job(first, job_id, lambda job: job["status"] == "processing")

    assert first.interrupt() == 0, first.output()
    assert "Traceback" not in first.output()

    second = start_dev(tmp_path / "data", grace)
    job = wait_for_job(second, job_id, lambda job: len(job["history"]) >= 4)
    # Handed back by the first worker (queued, same attempt), then picked up by the second one; not
    # left "processing" until its lease lapsed and it was retried as lost (which costs an attempt).
    assert statuses(job) == ["queued", "processing", "queued", "processing"], job
    assert job["attempt"] == 1, job
    assert second.interrupt() == 0, second.output()


def jobcast_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m jobcast ...`` with no JOBCAST_* from the outside, as a new user's shell has."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("JOBCAST_")}
    return subprocess.run(
        [sys.executable, "-m", "jobcast", *args],
        env={**clean, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.timeout(90)
def test_keys_finds_the_redis_of_a_running_dev_and_says_so(start_dev: Callable[..., Dev], tmp_path: Path) -> None:
    # The default data dir, .jobcast-data in the folder the commands run in, as the README has it.
    dev = start_dev(tmp_path / ".jobcast-data")
    created = jobcast_cli("keys", "create", "newcomer", "--json", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert (
        f"using the Redis of the `jobcast dev` running in .jobcast-data (redis://127.0.0.1:{dev.redis_port()}/0)"
        in (created.stderr)
    )
    key = json.loads(created.stdout)["key"]
    with httpx.Client(base_url=dev.base_url, timeout=15.0) as client:
        assert client.get("/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    assert dev.interrupt() == 0, dev.output()
    # Stopped: the lock file is left behind, but no longer held, so it is not used.
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    after = jobcast_cli("keys", "list", cwd=tmp_path, env={"JOBCAST_REDIS_URL": unreachable})
    assert after.returncode == 1
    assert "using the Redis" not in after.stderr


def test_no_command_prints_a_traceback_when_redis_cannot_be_reached(tmp_path: Path) -> None:
    unreachable = f"redis://:hunter2hunter2@127.0.0.1:{free_port()}/0"
    for args in (["keys", "list"], ["keys", "create", "acme"], ["worker"]):
        result = jobcast_cli(*args, cwd=tmp_path, env={"JOBCAST_REDIS_URL": unreachable, "JOBCAST_ENV": "development"})
        assert result.returncode == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr, args
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("jobcast: cannot reach Redis at redis://:***@127.0.0.1:"), (args, last)
        assert "Set JOBCAST_REDIS_URL" in last
        assert "hunter2" not in result.stderr


@pytest.mark.timeout(90)
def test_a_dead_embedded_redis_points_at_its_log_file(start_dev: Callable[..., Dev], tmp_path: Path) -> None:
    dev = start_dev(tmp_path / "data")
    (redis,) = [child for child in children_of(dev.process.pid) if role(child) == "redis"]

    os.kill(redis.pid, signal.SIGKILL)

    assert dev.wait_exit() == 1
    log = tmp_path / "data" / "redis" / "redis.log"
    assert f"redis exited unexpectedly (signal SIGKILL); its log is {log}" in dev.output()
    assert log.exists()


def archived_ids(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {row[0] for row in db.execute("SELECT id FROM archive_jobs")}


@pytest.mark.timeout(90)
def test_dev_archives_into_a_migrated_sqlite_file_in_its_data_dir(
    start_dev: Callable[..., Dev], tmp_path: Path
) -> None:
    dev = start_dev(tmp_path / "data", {"JOBCAST_ARCHIVE_AFTER_S": "0"})
    path = tmp_path / "data" / "archive.sqlite3"
    assert f"Archive  sqlite:///{path}  (migrated empty -> 0001)" in dev.output()
    job = run_sleep_job(dev)
    deadline = time.monotonic() + JOB_WAIT_S
    while job["id"] not in archived_ids(path):
        assert time.monotonic() < deadline, f"job {job['id']} was not archived:\n{dev.output()}"
        time.sleep(0.1)
    with httpx.Client(base_url=dev.base_url, headers=AUTH, timeout=15.0) as client:
        response = client.get(f"/jobs/{job['id']}")
        listed = client.get("/jobs").json()["items"]
    assert response.status_code == 200 and response.json()["result"] == {"slept": 0.2}
    assert [item["id"] for item in listed] == [job["id"]]
    assert dev.interrupt() == 0, dev.output()


# --- the embedded Redis takes only a port it owns -------------------------------------------------------


def test_an_embedded_redis_that_finds_its_port_held_by_another_redis_listens_on_another_port(tmp_path: Path) -> None:
    # What `jobcast dev` does with 6399: another run's Redis holds the port, so ours must neither
    # adopt that Redis (the other run's data, stopped when the other run stops) nor fail.
    with redis_process(tmp_path / "theirs") as theirs:
        assert theirs.process is not None
        mine = redis_process(tmp_path / "mine", port=theirs.port, fallback=True)
        mine.start()
        try:
            assert mine.process is not None
            assert mine.port != theirs.port
            assert answering_pid(mine.port) == mine.process.pid
            assert answering_pid(theirs.port) == theirs.process.pid
        finally:
            mine.stop()
        assert theirs.process.poll() is None


def test_an_embedded_redis_held_to_its_port_refuses_to_adopt_the_redis_found_there(tmp_path: Path) -> None:
    with redis_process(tmp_path / "theirs") as theirs:
        assert theirs.process is not None
        mine = redis_process(tmp_path / "mine", port=theirs.port)
        with pytest.raises(RuntimeError, match=f"port {theirs.port} of 127.0.0.1 is already in use"):
            mine.start()
        assert mine.process is not None and mine.process.poll() is not None  # its own process is gone
        assert answering_pid(theirs.port) == theirs.process.pid


def test_an_embedded_redis_restarts_on_the_port_it_was_given(tmp_path: Path) -> None:
    redis = redis_process(tmp_path / "redis", fallback=True)
    redis.start()
    try:
        port = redis.port
        redis.stop()
        redis.start()
        assert redis.process is not None
        assert redis.port == port and answering_pid(port) == redis.process.pid
    finally:
        redis.stop()


@pytest.mark.timeout(120)
def test_dev_and_keys_run_on_a_sentinel_managed_redis(start_dev: Callable[..., Dev], tmp_path: Path) -> None:
    """``JOBCAST_REDIS_URL=redis+sentinel://...``: dev starts no Redis of its own, its worker and web
    server find the primary through the sentinel, and ``jobcast keys`` does too."""
    cell = SentinelCell(tmp_path / "cell")
    cell.start()
    try:
        env = {"JOBCAST_REDIS_URL": cell.url}
        dev = start_dev(tmp_path / "data", env)
        assert f"Redis    {cell.url}  (from JOBCAST_REDIS_URL)" in dev.output()
        assert [role(child) for child in children_of(dev.process.pid) if role(child) == "redis"] == []
        job_id = submit(dev, SLEEP_JOB)
        wait_for_job(dev, job_id, lambda job: job["status"] == "completed")
        created = jobcast_cli("keys", "create", "newcomer", "--json", cwd=tmp_path, env=env)
        assert created.returncode == 0, created.stderr
        key = json.loads(created.stdout)["key"]
        with httpx.Client(base_url=dev.base_url, timeout=15.0) as client:
            assert client.get("/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        listed = jobcast_cli("keys", "list", cwd=tmp_path, env=env)
        assert listed.returncode == 0 and "newcomer" in listed.stdout, listed.stderr
        assert dev.interrupt() == 0, dev.output()
    finally:
        cell.stop()


@pytest.mark.timeout(90)
def test_dev_never_prints_the_password_of_its_redis_url(start_dev: Callable[..., Dev], tmp_path: Path) -> None:
    server = redis_process(tmp_path / "redis")
    server.start()
    try:
        with redis.Redis(port=server.port) as admin:
            admin.config_set("requirepass", "hunter2hunter2")
        url = f"redis://:hunter2hunter2@127.0.0.1:{server.port}/0"
        for env in ({"JOBCAST_REDIS_URL": url}, {"JOBCAST_REDIS_URLS": url}):
            dev = start_dev(tmp_path / f"data-{len(env)}-{next(iter(env))}", env)
            job_id = submit(dev, SLEEP_JOB)
            wait_for_job(dev, job_id, lambda job: job["status"] == "completed")
            assert dev.interrupt() == 0, dev.output()
            output = dev.output()
            assert f"Redis    redis://:***@127.0.0.1:{server.port}/0" in output
            assert "hunter2" not in output
    finally:
        server.kill()


def test_the_dev_banner_masks_the_password_of_every_cell_url(capsys: pytest.CaptureFixture[str]) -> None:
    urls = ["redis://u:pw1secret@h:1/0", "redis+sentinel://:pw2secret@s1:26379,s2:26379/cell1/0"]
    _print_banner("http://127.0.0.1:8000", "dev-key", urls, "cells of JOBCAST_REDIS_URLS", "none")
    banner = capsys.readouterr().out
    assert "redis://u:***@h:1/0, redis+sentinel://:***@s1:26379,s2:26379/cell1/0" in banner
    assert "secret" not in banner
