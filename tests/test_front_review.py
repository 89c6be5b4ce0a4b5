"""Review of the front protocol (server/takeover.py, ``FrontProtocol``): requests a client could send
as the first of a connection, and server shutdowns, where the front must behave as uvicorn's path."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from redis.asyncio import Redis

from jobcast.http_guard import GuardedHttpToolsProtocol
from jobcast.takeover import FrontProtocol, StreamConnection, front_protocol
from jobcast.worker import schema
from jobcast.worker.store import Store

from .conftest import ServerHandle, read_until, wait_until
from .test_front import HEALTH, header_lines, held_open, stream_request, stream_slots, the_connection
from .test_sse import new_running_job
from .transports import Recorder


async def shutting_down(server: ServerHandle, *, drain: bool) -> None:
    """Start the server's shutdown (after draining its streams, as SIGTERM does, when ``drain``) and
    wait until it has told the connection's front protocol, whose open is in flight, to end."""
    front = the_connection(server, FrontProtocol)
    if drain:
        server.app.state.drain()
    server.server.should_exit = True

    async def told_to_end() -> bool:
        return not front.keep_alive

    await wait_until(told_to_end)


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
            for part in sent:  # (how the reads split is up to the kernel: every split is checked below)
                writer.write(part)
                await writer.drain()
            async with asyncio.timeout(20):
                head = await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.close()
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), (sent, head)


async def test_a_stream_refused_while_the_server_shuts_down_closes_its_connection(
    server: ServerHandle, store: Store, redis: Redis
) -> None:
    """uvicorn's shutdown asks every connection to end after its current response: a refusal (here
    a 404) of an open that was in flight when the shutdown began is answered with
    ``connection: close`` and the connection closed, as uvicorn does for the requests it serves; not
    kept alive for more requests while the server waits for its connections."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        async with held_open(redis, writer, stream_request("job_01JDXXXXXXXXXXXXXXXXXXXXXX")):
            await shutting_down(server, drain=False)
        answer = await read_until(reader, b"}")
        assert answer.startswith(b"HTTP/1.1 404 "), answer
        assert b"connection: close" in answer.lower(), answer
        async with asyncio.timeout(20):
            assert await reader.read() == b""  # closed after the answer
    finally:
        writer.close()


async def test_a_stream_opened_while_the_server_shuts_down_ends_at_once_and_frees_its_places(
    server: ServerHandle, store: Store, redis: Redis
) -> None:
    """SIGTERM (drain, then uvicorn's shutdown) while an open waits for Redis: once Redis answers,
    the stream is answered and ended at once (its last chunk, the connection closed), its places
    freed, and the server's shutdown completes."""
    job_id = await new_running_job(store)
    slots = stream_slots(server)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        async with held_open(redis, writer, stream_request(job_id)):
            await shutting_down(server, drain=True)
        async with asyncio.timeout(20):
            answer = await reader.read()  # to the close
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert answer.endswith(b"0\r\n\r\n"), answer
    assert server.task is not None
    async with asyncio.timeout(20):
        await asyncio.shield(server.task)
    assert slots.open_streams == 0
    assert await redis.zcard(schema.streams_key("acme")) == 0


async def test_an_open_cut_short_by_the_graceful_timeout_is_answered_503_with_one_warning(
    server: ServerHandle, store: Store, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """An open still waiting for Redis when the graceful-shutdown timeout (5 s here) passes is
    cancelled: answered 503 (Retry-After), one WARNING line, no ERROR and no traceback; and, as
    uvicorn's path logs the 503 it writes, its access line."""
    job_id = await new_running_job(store)
    slots = stream_slots(server)
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        async with held_open(redis, writer, stream_request(job_id)):
            server.app.state.drain()
            server.server.should_exit = True
            async with asyncio.timeout(60):  # (a hang guard: the graceful timeout is 5 s)
                answer = await reader.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b"retry-after: 1" in answer.lower(), answer
    assert server.task is not None
    async with asyncio.timeout(60):
        await asyncio.shield(server.task)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]
    cut = [r for r in caplog.records if "cut short" in r.getMessage()]
    assert len(cut) == 1 and cut[0].levelno == logging.WARNING, [r.getMessage() for r in caplog.records]
    assert slots.open_streams == 0
    assert await redis.zcard(schema.streams_key("acme")) == 0
    access = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert access == [f'127.0.0.1:{writer.get_extra_info("sockname")[1]} - "GET /jobs/{job_id}/events HTTP/1.1" 503'], (
        access
    )


async def test_a_stream_asked_with_connection_close_has_the_same_head_on_both_paths(
    server: ServerHandle, store: Store
) -> None:
    """``Connection: close`` (any case): the front's head is uvicorn's (``connection: close``)."""
    job_id = await new_running_job(store)
    heads = []
    for first in (b"", HEALTH):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            if first:
                writer.write(first)
                await read_until(reader, b'"status":"ok"')
            writer.write(stream_request(job_id, "Connection: Close\r\n"))
            heads.append(await read_until(reader, b"event: job.processing"))
        finally:
            writer.close()
    assert heads[0].startswith(b"HTTP/1.1 200 OK\r\n"), heads
    assert header_lines(heads[0]) == header_lines(heads[1]), heads
    assert b"connection: close" in heads[0], heads


async def test_a_request_begun_behind_a_stream_on_a_connection_uvicorn_serves_loses_no_bytes(
    server: ServerHandle, store: Store, redis: Redis
) -> None:
    """On a connection uvicorn already serves, the start of the next request arrives while the
    stream opens (held by CLIENT PAUSE): uvicorn's parser has read it. The stream must not take the
    connection over (the bytes read would be lost with uvicorn's parser): it is refused 400 as a
    pipelined one, and the next request, completed afterwards, is answered."""
    job_id = await new_running_job(store)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(HEALTH)
        await read_until(reader, b'"status":"ok"')
        async with held_open(redis, writer, stream_request(job_id)):
            writer.write(HEALTH[:20])
            http = the_connection(server, GuardedHttpToolsProtocol)

            async def read_by_uvicorn() -> bool:
                return bool(http.reading_head)

            await wait_until(read_by_uvicorn)
        first = await read_until(reader, b"\r\n\r\n")
        writer.write(HEALTH[20:])
        await store.complete(job_id, 1, "1")
        data = first + await read_until(reader, b'"status":"ok"')
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert b"pipelining" in data, data
    slots = stream_slots(server)
    assert slots.open_streams == 0


# --- every read boundary, on the protocol itself (a socket would coalesce the reads) --------------


class _Uvicorn:
    """Stands in for uvicorn's protocol: keeps what it is given."""

    def __init__(self, config: Any, server_state: Any, app_state: Any) -> None:
        self.data = b""

    def connection_made(self, transport: Any) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.data += data


class _Owner:
    def let_go(self) -> None:
        pass

    def shut_down(self) -> None:
        pass


class _Opened:
    owner = _Owner()

    async def serve_on(self, connection: StreamConnection, http_head: bytes) -> None:
        pass


class _Opener:
    def __init__(self, answer: _Opened | None) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.requests: set[asyncio.Task[Any]] = set()
        self.scopes: list[dict[str, Any]] = []
        self.answer = answer

    def wants(self, path: str) -> bool:
        return path == "/events"

    async def open(self, scope: dict[str, Any]) -> _Opened | None:
        self.scopes.append(scope)
        return self.answer


async def _fed(parts: list[bytes], answer: _Opened | None) -> tuple[Any, _Opener]:
    config = SimpleNamespace(loaded=True, limit_concurrency=None, root_path="", proxy_headers=False)
    state = SimpleNamespace(connections=set(), tasks=set(), default_headers=[])
    opener = _Opener(answer)
    protocol = front_protocol(opener, _Uvicorn, head_timeout_s=30, max_head_bytes=65536)(config, state, {})  # type: ignore[arg-type]
    transport = Recorder()
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    for part in parts:
        transport.protocol.data_received(part)
        await asyncio.sleep(0)
    for _ in range(3):
        await asyncio.sleep(0)
    protocol._stop_timer()
    return transport.protocol, opener


STREAM = b"GET /events?token=a%20b HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k \r\n\r\n"


@pytest.mark.parametrize("blank", [b"", b"\r\n", b"\r\n\r\n"])
async def test_a_stream_request_split_at_every_byte_is_read_whole(blank: bytes) -> None:
    """The stream request (with empty lines before it, and the next request behind it) in two reads
    split at every byte, and byte by byte: the open gets the same scope, a refused open hands every
    byte to uvicorn, an opened one keeps the next request for after the stream."""
    sent = blank + STREAM + HEALTH
    splits = [[sent[:i], sent[i:]] for i in range(1, len(sent))] + [[sent[i : i + 1] for i in range(len(sent))]]
    for parts in splits:
        refused, opener = await _fed(parts, None)
        assert isinstance(refused, _Uvicorn) and refused.data == sent, parts
        [scope] = opener.scopes
        assert (scope["path"], scope["query_string"]) == ("/events", b"token=a%20b"), parts
        assert scope["headers"] == [(b"host", b"x"), (b"authorization", b"Bearer k")], parts
        opened, _ = await _fed(parts, _Opened())
        assert isinstance(opened, StreamConnection) and opened._held == HEALTH, parts
