"""What Jobcast's processes write to their logs: never a credential."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from jobcast.worker.logs import configure_logging
from jobcast.worker.settings import Settings

from .conftest import ACME, WebProcess, held_by_pause, wait_until

JOB_TOKEN = "jc1.eyJzIjoiam9iIiwidCI6ImFjbWUifQ.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"
STORED_KEY = "jck_abcdefghij12_" + "S" * 43


def wait_for_text(process: WebProcess, text: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (output := process.output()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged within {timeout}s:\n{output}")
        time.sleep(0.05)
    return output


async def test_tokens_in_urls_are_redacted_in_the_access_log(settings: Settings, redis: Redis, tmp_path: Path) -> None:
    web = WebProcess(settings, tmp_path / "web.log")
    try:
        web.wait_ready()
        async with httpx.AsyncClient(base_url=web.url) as c:
            await c.get("/jobs/job_01JDXXXXXXXXXXXXXXXXXXXXXX", params={"token": JOB_TOKEN})
            await c.get("/events", params={"a": "1", "token": STORED_KEY, "last_event_id": "1-0"})
            await c.get("/jobs", params={"api_key": "key-acme", "limit": "5"})
        output = wait_for_text(web, "limit=5")
    finally:
        web.close()
    assert "/jobs/job_01JDXXXXXXXXXXXXXXXXXXXXXX?token=[redacted]" in output, output
    assert "/events?a=1&token=[redacted]&last_event_id=1-0" in output, output
    for secret in (JOB_TOKEN, JOB_TOKEN.split(".")[2], "S" * 43, "key-acme"):
        assert secret not in output, output


async def test_a_stream_opened_by_the_front_protocol_has_uvicorns_access_line(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    """A stream open served before uvicorn (jobcast.takeover.FrontProtocol) is logged as uvicorn logs
    a request: its client (from X-Forwarded-For, the proxy being trusted), its path with the token
    redacted, its status."""
    web = WebProcess(settings, tmp_path / "web.log")
    try:
        await asyncio.to_thread(web.wait_ready)
        async with httpx.AsyncClient(base_url=web.url, headers=ACME) as c:
            token = (await c.post("/tokens")).json()["token"]
        reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
        try:
            writer.write(
                f"GET /events?token={token} HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n".encode()
            )
            async with asyncio.timeout(20):
                head = await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.close()
        output = await asyncio.to_thread(wait_for_text, web, "/events?token=")
    finally:
        web.close()
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    assert '203.0.113.9:0 - "GET /events?token=[redacted] HTTP/1.1" 200' in output, output
    assert token.split(".")[2] not in output, output


@pytest.mark.parametrize(
    ("message", "args", "logged"),
    [
        ("GET %s", ("/jobs?token=" + JOB_TOKEN,), "GET /jobs?token=[redacted]"),
        ("bad credential %s", (JOB_TOKEN,), "bad credential jc1.[redacted]"),
        ("key %s revoked", (STORED_KEY,), "key jck_abcdefghij12_[redacted] revoked"),
        ("%s", ("whsec_" + "A" * 40,), "whsec_[redacted]"),
        ("url %s", ("/x?secret=s3cr3t&password=pw&ok=1",), "url /x?secret=[redacted]&password=[redacted]&ok=1"),
        ("nothing to hide: %d jobs", (3,), "nothing to hide: 3 jobs"),
    ],
)
def test_every_log_line_is_redacted(
    settings: Settings, capsys: pytest.CaptureFixture[str], message: str, args: tuple[object, ...], logged: str
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(settings)
        logging.getLogger("anything.at.all").warning(message, *args)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    err = capsys.readouterr().err
    assert err.rstrip("\n").endswith(logged), err


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_tracebacks_are_redacted_too(settings: Settings, capsys: pytest.CaptureFixture[str], log_format: str) -> None:
    """An exception's message may quote what a client sent (a URL with ?token=, a key): the
    traceback of a logged exception is redacted like the line itself, in both formats."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(settings.model_copy(update={"log_format": log_format}))
        try:
            raise ValueError(f"cannot fetch /jobs/x?token={JOB_TOKEN} with {STORED_KEY}")
        except ValueError:
            logging.getLogger("anything.at.all").exception("request failed")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    err = capsys.readouterr().err
    assert "request failed" in err and "ValueError: cannot fetch" in err, err
    assert JOB_TOKEN not in err and "S" * 43 not in err, err
    assert "?token=[redacted]" in err and "jck_abcdefghij12_[redacted]" in err, err


async def test_requests_cancelled_by_a_timed_out_shutdown_are_logged_without_tracebacks(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    """``jobcast web`` stops while a long-poll and an event stream are still opening (their Redis
    writes held by ``CLIENT PAUSE``): its graceful shutdown times out and cancels them. Each is told
    in one line, not an error with a traceback (nothing went wrong but the wait), and answered 503."""
    web = WebProcess(settings, tmp_path / "web.log")
    try:
        await asyncio.to_thread(web.wait_ready)
        async with httpx.AsyncClient(base_url=web.url, headers=ACME, timeout=60) as c:
            job = (await c.post("/jobs", json={"type": "sleep"})).json()["id"]
            await redis.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
            try:
                held = [
                    asyncio.create_task(c.get(f"/jobs/{job}", params={"wait": "60"})),
                    asyncio.create_task(c.get(f"/jobs/{job}/events")),
                ]
                await wait_until(lambda: held_by_pause(redis, 2))
                web.signal(signal.SIGTERM)
                await asyncio.to_thread(wait_for_text, web, "graceful shutdown exceeded", 60)
            finally:
                await redis.execute_command("CLIENT", "UNPAUSE")
            answers = await asyncio.gather(*held, return_exceptions=True)
        assert await asyncio.to_thread(web.wait, 30) == -signal.SIGTERM, web.output()
    finally:
        web.close()
    output = web.output()
    assert "Traceback" not in output and "Exception in ASGI application" not in output, output
    assert " ERROR " not in output.partition("Shutting down")[2], output
    assert "WARNING uvicorn.error: Cancel 2 running task(s)" in output, output
    for path in (f"/jobs/{job}", f"/jobs/{job}/events"):
        [line] = [line for line in output.splitlines() if f"GET {path}: cut short by the server's shutdown" in line]
        assert " WARNING " in line, line
    for answer in answers:  # another process will answer: told so, as a problem
        assert isinstance(answer, httpx.Response), answer
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
        assert answer.headers["content-type"] == "application/problem+json"
