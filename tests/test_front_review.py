"""Review of the front protocol (server/takeover.py, ``FrontProtocol``): requests a client could send
as the first of a connection, and server shutdowns, where the front must behave as uvicorn's path."""

from __future__ import annotations

import asyncio

from jobcast.worker.store import Store

from .conftest import ServerHandle
from .test_front import HEALTH, stream_request
from .test_sse import new_running_job


async def test_empty_lines_before_the_first_request_are_ignored_as_uvicorn_does(
    server: ServerHandle, store: Store
) -> None:
    """RFC 9112 §2.2: a server SHOULD ignore empty lines received before the request line (httptools
    does). The front must not take them for the end of the head and then wait for ever (until the
    head deadline, which closes the connection unanswered)."""
    job_id = await new_running_job(store)
    for sent in ([b"\r\n\r\n" + HEALTH], [b"\r\n", b"\r\n" + HEALTH], [b"\r\n\r\n" + stream_request(job_id)]):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            for part in sent:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.05)
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.close()
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), (sent, head)
