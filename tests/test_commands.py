"""The client commands of ``jobcast``, run as real processes against a live server.

A subprocess is the honest way to check exit statuses and what reaches stdout and stderr; the
server and the worker run in the test's event loop, so the commands run without blocking it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from jobcast.cli.client import StreamEvent, UsageError
from jobcast.cli.commands import ExitStatus, parse_params
from jobcast.cli.embedded_redis import free_port
from jobcast.cli.terminal import JobClockColumn, Output, TailView, time_left_text
from jobcast.worker import schema
from jobcast.worker.main import JobcastWorker
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store

from .children import spawn_async
from .conftest import ROOT, ServerHandle, submit, wait_for_status
from .restartable import RestartableServer
from .test_sse import new_running_job


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.stdout.splitlines()]


#: A bound on waiting for a ``jobcast`` process, against hangs only: its Python start-up alone took
#: more than 10 s when two suites ran at once on a loaded machine.
CLI_WAIT_S = 60


def cli_env(url: str, api_key: str | None = "key-acme") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCAST_")}
    env.update({"JOBCAST_URL": url, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"})
    if api_key is not None:
        env["JOBCAST_API_KEY"] = api_key
    return env


async def start_jobcast(url: str, *args: str, api_key: str | None = "key-acme") -> asyncio.subprocess.Process:
    return await spawn_async(
        sys.executable,
        "-m",
        "jobcast",
        *args,
        env=cli_env(url, api_key),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def jobcast(url: str, *args: str, api_key: str | None = "key-acme", timeout: float = 30) -> Run:
    process = await start_jobcast(url, *args, api_key=api_key)
    async with asyncio.timeout(timeout):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def assert_one_line_error(run: Run, *fragments: str) -> None:
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("jobcast: ")
    assert "Traceback" not in run.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- key=value parameters ---------------------------------------------------------------------------


def test_key_value_parameters_are_json_when_they_parse_and_strings_otherwise() -> None:
    params = parse_params(None, ["seconds=2.5", "steps=3", "fail=true", "name=report-7", "tags=[1,2]", "empty="])
    assert params == {"seconds": 2.5, "steps": 3, "fail": True, "name": "report-7", "tags": [1, 2], "empty": ""}
    assert parse_params('{"seconds": 1, "steps": 2}', ["steps=5"]) == {"seconds": 1, "steps": 5}
    assert parse_params(None, ["note=a=b"]) == {"note": "a=b"}
    for bad_json, bad_pairs in [("[1]", []), ("{", []), (None, ["seconds"]), (None, ["=5"])]:
        with pytest.raises(UsageError):
            parse_params(bad_json, bad_pairs)


# --- tail -------------------------------------------------------------------------------------------


async def test_tail_shows_every_step_and_the_result_then_exits_0(
    server: ServerHandle, client: httpx.AsyncClient, worker: JobcastWorker
) -> None:
    job = await submit(client, params={"seconds": 0.5, "steps": 5})
    run = await jobcast(server.url, "tail", job["id"])
    assert run.status == ExitStatus.OK, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == [job["id"], "sleep"]
    kinds = [line.split()[1] for line in lines[1:-1]]
    assert kinds == ["queued", "processing", *["progress"] * 5, "completed"]
    percents = [line.split()[2] for line in lines[3:8]]
    assert percents == ["20%", "40%", "60%", "80%", "100%"]
    assert "step 5 of 5" in lines[7]
    assert lines[-1] == 'result {"slept": 0.5}'
    # Time left once the worker has enough signal (two steps after the first), none at 100%.
    assert [line.endswith(" left)") or line.endswith("(finishing)") for line in lines[3:8]] == [
        False,
        False,
        True,
        True,
        False,
    ]


async def test_tail_exits_1_with_the_error_when_the_job_fails(
    server: ServerHandle, client: httpx.AsyncClient, worker: JobcastWorker
) -> None:
    job = await submit(client, params={"fail": True})
    run = await jobcast(server.url, "tail", job["id"])
    assert run.status == ExitStatus.FAILED
    assert run.stdout.splitlines()[-1] == (
        "error  PermanentError: failed on purpose (params.fail is true) (attempt 1, not retryable)"
    )


async def test_tail_exits_3_when_the_job_is_cancelled(server: ServerHandle, client: httpx.AsyncClient) -> None:
    job = await submit(client, params={"seconds": 30})
    tail = await start_jobcast(server.url, "tail", job["id"])
    assert tail.stdout is not None
    async with asyncio.timeout(CLI_WAIT_S):
        assert "queued" in (await tail.stdout.readline()).decode() + (await tail.stdout.readline()).decode()
        assert (await client.post(f"/jobs/{job['id']}/cancel")).status_code == 200
        await tail.wait()
    rest = (await tail.stdout.read()).decode()
    assert tail.returncode == ExitStatus.CANCELLED
    assert "cancelled" in rest.splitlines()[-1]


async def test_ctrl_c_ends_tail_with_130_and_no_traceback(server: ServerHandle, client: httpx.AsyncClient) -> None:
    job = await submit(client, params={"seconds": 30})
    tail = await start_jobcast(server.url, "tail", job["id"])
    assert tail.stdout is not None
    async with asyncio.timeout(CLI_WAIT_S):
        await tail.stdout.readline()  # the header: it is following the stream
        tail.send_signal(signal.SIGINT)
        _, stderr = await tail.communicate()
    assert tail.returncode == ExitStatus.INTERRUPTED
    assert b"Traceback" not in stderr


async def test_a_retried_job_shows_the_failed_attempt_then_completes(
    server: ServerHandle, client: httpx.AsyncClient, worker: JobcastWorker
) -> None:
    job = await submit(client, params={"seconds": 0.1, "steps": 1, "fail_times": 1})
    run = await jobcast(server.url, "tail", job["id"])
    assert run.status == ExitStatus.OK
    retry = next(line for line in run.stdout.splitlines() if " retrying " in line)
    assert "attempt 1 failed: RetryableError: attempt 1 failed on purpose" in retry


async def test_tail_resumes_after_a_server_restart_and_prints_every_event_once(
    settings: Settings, redis: Redis, store: Store
) -> None:
    # The job is driven by the test, not by a worker: it cannot end before tail has seen the
    # restart, however long tail takes to start on a loaded machine.
    server = RestartableServer(settings)
    await server.start()
    try:
        job_id = await new_running_job(store)
        for percent in range(1, 11):
            await store.progress(job_id, 1, percent, None, None)
        tail = await start_jobcast(server.url, "tail", "--json", job_id)
        assert tail.stdout is not None and tail.stderr is not None
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(CLI_WAIT_S):
            while len(seen) < 5:  # queued, processing and a few progress events
                seen.append(json.loads(await tail.stdout.readline()))
            await server.stop()  # drains the stream: tail reconnects, and finds nobody listening
            for percent in range(11, 101):  # the job goes on meanwhile
                await store.progress(job_id, 1, percent, None, None)
            await server.start()  # same port
            await store.complete(job_id, 1, '{"done": true}')
            stdout, stderr = await tail.communicate()
        seen += [json.loads(line) for line in stdout.decode().splitlines()]
        assert tail.returncode == ExitStatus.OK, stderr
        logged = [sid for sid, _ in await redis.xrange(schema.job_log_key(job_id))]
        assert [event["id"] for event in seen] == logged  # every event once, in order
        assert seen[-1]["event"] == "job.completed"
        assert [e["data"]["progress"]["percent"] for e in seen if e["event"] == "job.progress"][-1] == 100.0
        assert "reconnecting" in stderr.decode()
    finally:
        await server.stop()


# --- submit ----------------------------------------------------------------------------------------


async def test_submit_follow_and_wait_exit_with_the_job_s_outcome(
    server: ServerHandle, client: httpx.AsyncClient, worker: JobcastWorker
) -> None:
    follow = await jobcast(server.url, "submit", "sleep", "seconds=0.2", "steps=2", "--follow")
    assert follow.status == ExitStatus.OK
    assert follow.stdout.splitlines()[-1] == 'result {"slept": 0.2}'
    failed = await jobcast(server.url, "submit", "sleep", "fail=true", "--wait")
    assert failed.status == ExitStatus.FAILED
    assert "PermanentError" in failed.stdout
    waited = await jobcast(
        server.url, "submit", "sleep", "--params", '{"seconds": 0.1, "steps": 1}', "--wait", "--json"
    )
    assert waited.status == ExitStatus.OK
    assert waited.json()["status"] == "completed"
    assert waited.json()["result"] == {"slept": 0.1}


async def test_submit_sends_priority_and_idempotency_key(server: ServerHandle, client: httpx.AsyncClient) -> None:
    args = ["submit", "sleep", "seconds=5", "--priority", "high", "--idempotency-key", "k-1", "--json"]
    first = (await jobcast(server.url, *args)).json()
    again = (await jobcast(server.url, *args)).json()
    assert first["priority"] == "high"
    assert first["params"]["seconds"] == 5
    assert again["id"] == first["id"]


# --- --json on every command -----------------------------------------------------------------------


async def test_every_command_prints_parseable_json(
    server: ServerHandle, client: httpx.AsyncClient, worker: JobcastWorker
) -> None:
    submitted = (await jobcast(server.url, "submit", "sleep", "seconds=0.1", "steps=1", "--json")).json()
    assert submitted["status"] == "queued" and submitted["token"]
    await wait_for_status(client, submitted["id"], "completed")
    status = (await jobcast(server.url, "status", submitted["id"], "--json")).json()
    assert status["status"] == "completed" and status["result"] == {"slept": 0.1}
    listing = (await jobcast(server.url, "list", "--status", "completed", "--type", "sleep", "--json")).json()
    assert [j["id"] for j in listing["items"]] == [submitted["id"]]
    assert listing["next_cursor"] is None
    types = (await jobcast(server.url, "types", "--json")).json()
    assert {"sleep", "report"} <= {t["name"] for t in types["items"]}
    events = (await jobcast(server.url, "tail", submitted["id"], "--json")).json_lines()
    assert [e["event"] for e in events] == ["job.queued", "job.processing", "job.progress", "job.completed"]
    long = (await jobcast(server.url, "submit", "sleep", "seconds=30", "--json")).json()
    await wait_for_status(client, long["id"], "processing")
    cancelled = await jobcast(server.url, "cancel", long["id"], "--json")
    assert cancelled.status == ExitStatus.OK
    assert cancelled.json()["id"] == long["id"]


async def test_list_pages_with_the_cursor(server: ServerHandle, client: httpx.AsyncClient) -> None:
    ids = [(await submit(client, params={"seconds": 1}))["id"] for _ in range(3)]
    first = (await jobcast(server.url, "list", "--limit", "2", "--json")).json()
    assert [j["id"] for j in first["items"]] == ids[::-1][:2]
    second = (await jobcast(server.url, "list", "--limit", "2", "--cursor", first["next_cursor"], "--json")).json()
    assert [j["id"] for j in second["items"]] == [ids[0]]
    table = await jobcast(server.url, "list", "--limit", "2")
    assert table.status == ExitStatus.OK
    assert ids[2] in table.stdout and ids[0] not in table.stdout
    assert f"jobcast list --cursor {first['next_cursor']}" in table.stdout


async def test_status_and_types_read_well(server: ServerHandle, client: httpx.AsyncClient) -> None:
    job = await submit(client, params={"seconds": 2})
    status = await jobcast(server.url, "status", job["id"])
    assert status.status == ExitStatus.OK
    fields = dict(line.split(None, 1) for line in status.stdout.splitlines() if line and not line[0].isspace())
    assert fields["id"] == job["id"] and fields["status"] == "queued" and fields["attempt"] == "1 of 3"
    types = await jobcast(server.url, "types")
    assert "seconds" in types.stdout and "number, 0..3600, default 1" in types.stdout


# --- errors ------------------------------------------------------------------------------------------


async def test_errors_are_one_red_line_with_a_documented_status(
    server: ServerHandle, client: httpx.AsyncClient, worker: JobcastWorker
) -> None:
    no_key = await jobcast(server.url, "list", api_key=None)
    assert no_key.status == ExitStatus.USAGE
    assert_one_line_error(no_key, "JOBCAST_API_KEY")
    bad_pair = await jobcast(server.url, "submit", "sleep", "seconds")
    assert bad_pair.status == ExitStatus.USAGE
    assert_one_line_error(bad_pair, "key=value")
    usage = await jobcast(server.url, "list", "--status", "nope")
    assert usage.status == ExitStatus.USAGE  # argparse's own usage error
    wrong_key = await jobcast(server.url, "list", api_key="not-a-key")
    assert wrong_key.status == ExitStatus.REQUEST_FAILED
    assert_one_line_error(wrong_key, "401")
    unknown = await jobcast(server.url, "status", "job_01M8M28EZDA3FPZ9JA168K5YM8")
    assert unknown.status == ExitStatus.REQUEST_FAILED
    assert_one_line_error(unknown, "404", "No job")
    invalid = await jobcast(server.url, "submit", "sleep", "seconds=99999")
    assert invalid.status == ExitStatus.REQUEST_FAILED
    assert_one_line_error(invalid, "422", "body.params.seconds")
    done = await submit(client, params={"seconds": 0})
    await wait_for_status(client, done["id"], "completed")
    finished = await jobcast(server.url, "cancel", done["id"])
    assert finished.status == ExitStatus.REQUEST_FAILED
    assert_one_line_error(finished, "already completed")
    nobody = await jobcast(f"http://127.0.0.1:{free_port()}", "types")
    assert nobody.status == ExitStatus.REQUEST_FAILED
    assert_one_line_error(nobody, "cannot reach")
    bad_url = await jobcast("127.0.0.1:8000", "types")
    assert bad_url.status == ExitStatus.USAGE
    assert_one_line_error(bad_url, "http://")


async def test_tail_that_never_connects_fails_at_once_like_status() -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    status = await jobcast(nobody, "status", "job_01M8M28EZDA3FPZ9JA168K5YM8")
    tail = await jobcast(nobody, "tail", "job_01M8M28EZDA3FPZ9JA168K5YM8")
    wait = await jobcast(nobody, "submit", "sleep", "--wait")
    assert status.status == tail.status == wait.status == ExitStatus.REQUEST_FAILED
    assert_one_line_error(tail, "cannot reach", "is the server running?")
    assert tail.stderr == status.stderr == wait.stderr


def test_tail_s_clock_ends_on_the_figure_of_its_after_line(capsys: pytest.CaptureFixture[str]) -> None:
    events = [
        ("job.queued", "queued", "2026-12-02T12:00:00.000000Z", None),
        ("job.processing", "processing", "2026-12-02T12:00:05.000000Z", None),
        ("job.progress", "processing", "2026-12-02T12:00:10.000000Z", "2026-12-02T12:00:25.000000Z"),
        ("job.completed", "completed", "2026-12-02T12:00:17.250000Z", None),
    ]
    view = TailView(Output(json_mode=False))
    with view:
        for index, (name, status, at, eta) in enumerate(events):
            data = {"job_id": "job_x", "type": "sleep", "status": status, "attempt": 1, "at": at}
            data["progress"] = {"percent": 50.0 if eta else 0.0, "eta": eta}
            view.event(StreamEvent(f"1-{index}", name, data))
            if name == "job.progress":
                (task,) = view.progress.tasks
                assert task.fields["left"][0] == 15.0  # eta - at: what the server estimated
    (task,) = view.progress.tasks
    clock = JobClockColumn().render(task).plain
    assert clock == "12.2 s"
    assert capsys.readouterr().out.splitlines()[-1].endswith("after 12.2 s")


def test_time_left_reads_as_an_estimate() -> None:
    assert [time_left_text(s) for s in (0.4, 12.4, 59.4, 90, 3000, 7200)] == [
        "finishing",
        "about 12 s left",
        "about 59 s left",
        "about 2 min left",
        "about 50 min left",
        "about 2.0 h left",
    ]


async def test_help_documents_the_exit_statuses() -> None:
    run = await jobcast("http://127.0.0.1:1", "--help")
    assert run.status == 0
    for line in ("0    success", "1    the job failed", "3    the job was cancelled", "130  interrupted"):
        assert line in run.stdout
    tail_help = await jobcast("http://127.0.0.1:1", "tail", "--help")
    assert "--json" in tail_help.stdout and "4    the request failed" in tail_help.stdout
