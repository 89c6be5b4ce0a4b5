"""The HTTP edge against clients that misbehave at the connection level: cut uploads, request heads
that never end or never stop growing, bytes that are not HTTP. Raw sockets on 127.0.0.1 against
a real uvicorn."""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.asyncio import Redis

from jobcast.worker.settings import Settings

from .conftest import ServerHandle, wait_until


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
