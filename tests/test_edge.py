"""The HTTP edge against clients that misbehave at the connection level: cut uploads, request heads
that never end or never stop growing, bytes that are not HTTP. Raw sockets on 127.0.0.1 against
a real uvicorn."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from jobcast import http_guard
from jobcast.cli.embedded_redis import RedisProcess
from jobcast.takeover import FrontProtocol
from jobcast.worker.settings import Settings

from .conftest import ACME, ServerHandle, make_settings, wait_until


async def open_raw(server: ServerHandle) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def test_a_client_that_disconnects_mid_upload_gets_one_info_line_and_no_error(
    settings: Settings, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    server = ServerHandle(settings)
    await server.start()
    uvicorn_logger = logging.getLogger("uvicorn")  # it does not propagate to the root
    uvicorn_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            _, writer = await open_raw(server)
            writer.write(
                b"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-acme\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"type": "sl'
            )
            await writer.drain()
            writer.close()
            await writer.wait_closed()

            def disconnect_lines() -> list[logging.LogRecord]:
                return [r for r in caplog.records if "closed the connection" in r.getMessage()]

            async def logged() -> list[logging.LogRecord]:
                return disconnect_lines()

            await wait_until(logged)
            await server.stop()  # every request has been handled once it returns
            assert [r.levelno for r in disconnect_lines()] == [logging.INFO]
            assert "POST /jobs" in disconnect_lines()[0].getMessage()
            errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert errors == [], [r.getMessage() for r in errors]
    finally:
        uvicorn_logger.removeHandler(caplog.handler)
        if not server.server.should_exit:
            await server.stop()


@pytest.fixture
async def strict_server(redis_server: RedisProcess, redis: Redis) -> AsyncIterator[ServerHandle]:
    """A server that gives request heads half a second and 16 KiB."""
    handle = ServerHandle(make_settings(redis_server.url, http_head_timeout_s=0.5, http_max_head_bytes=16 * 1024))
    await handle.start()
    yield handle
    await handle.stop()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded: a guard that never
    closes fails the test instead of hanging it)."""
    return await asyncio.wait_for(reader.read(), timeout=15)


async def problem_before_close(server: ServerHandle, sent: bytes, status: int) -> dict[str, Any]:
    """Send ``sent``; the server must answer a ``status`` problem+json and close the connection."""
    reader, writer = await open_raw(server)
    writer.write(sent)
    await writer.drain()
    answer = await read_until_closed(reader)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"content-type: application/problem+json" in head.lower()
    problem: dict[str, Any] = orjson.loads(body)
    assert problem["status"] == status
    return problem


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"GET /hea"])
async def test_a_request_head_that_never_ends_is_closed(strict_server: ServerHandle, sent: bytes) -> None:
    reader, writer = await open_raw(strict_server)
    writer.write(sent)
    await writer.drain()
    assert await read_until_closed(reader) == b""
    writer.close()


async def test_the_next_head_on_a_kept_alive_connection_is_timed_too(strict_server: ServerHandle) -> None:
    reader, writer = await open_raw(strict_server)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=15)
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    length = int(next(line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))[15:])
    await reader.readexactly(length)
    # The response is complete: uvicorn's keep-alive timer is armed, and stops at the next byte.
    writer.write(b"GET /healthz HTTP/1.1\r\nHo")
    await writer.drain()
    assert await read_until_closed(reader) == b""
    writer.close()


async def test_an_oversized_request_head_is_answered_431_and_closed(strict_server: ServerHandle) -> None:
    problem = await problem_before_close(strict_server, b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536, 431)
    assert problem["type"] == "/problems/header-too-large"
    assert "16384" in problem["detail"]


async def test_a_large_body_behind_a_small_head_is_not_taken_for_a_large_head(strict_server: ServerHandle) -> None:
    body = orjson.dumps({"type": "sleep", "params": {"padding": "x" * 900_000}})
    async with httpx.AsyncClient(base_url=strict_server.url, headers=ACME) as c:
        response = await c.post("/jobs", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, response.text[:300]  # read and judged: 'padding' is unknown
        assert (await c.get("/healthz")).status_code == 200  # and the connection lives on


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHo\x01st: x\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
async def test_requests_the_http_parser_refuses_get_a_problem_json_400(
    server: ServerHandle, request_bytes: bytes
) -> None:
    problem = await problem_before_close(server, request_bytes, 400)
    assert problem["type"] == "/problems/bad-request"
    assert "HTTP" in problem["detail"]


async def test_the_guard_is_what_uvicorn_serves_with(server: ServerHandle) -> None:
    """The guard extends uvicorn's httptools protocol (jobcast.http_guard), to which the front
    protocol (jobcast.takeover) hands every request but a stream open: if an upgrade of uvicorn moved
    what it hooks into, this says so before the behaviour tests above fail."""
    front = server.server.config.http_protocol_class
    assert issubclass(front, FrontProtocol)
    assert issubclass(front.uvicorn_protocol, http_guard.GuardedHttpToolsProtocol)
    http_guard.check_uvicorn_hooks()
