"""The front protocol (server/takeover.py, ``FrontProtocol``): the first request of every connection
is read by Jobcast, which opens event streams itself and hands every other request to uvicorn's
protocol with the bytes read so far. Over raw sockets: what a client sees must not depend on which
of the two served it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from jobcast.services import STATE_KEY
from jobcast.takeover import FrontProtocol, StreamConnection
from jobcast.worker import schema
from jobcast.worker.store import Store

from .conftest import ServerHandle, held_by_pause, read_until, wait_until
from .test_sse import new_running_job

AUTH = "Authorization: Bearer key-acme\r\n"


def stream_request(job_id: str, extra: str = "") -> bytes:
    return f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n{AUTH}{extra}\r\n".encode()


HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@contextlib.asynccontextmanager
async def held_open(redis: Redis, writer: asyncio.StreamWriter, request: bytes) -> AsyncIterator[None]:
    """``request`` written while Redis holds the commands (CLIENT PAUSE WRITE): inside, its stream's
    open waits for Redis; Redis answers again on leaving."""
    await redis.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
    try:
        writer.write(request)
        await wait_until(lambda: held_by_pause(redis, 1))
        yield
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")


def the_connection(server: ServerHandle, kind: type[Any]) -> Any:
    """The server's one open connection, served by a protocol of ``kind``."""
    [connection] = [c for c in server.server.server_state.connections if isinstance(c, kind)]
    return connection


def served_by(state: Any, kind: type[Any]) -> Callable[[], Awaitable[bool]]:
    """For wait_until: a connection of the server (``state``, uvicorn's server state) is served by a
    protocol of ``kind``, and no request or open is under way."""

    async def served() -> bool:
        return any(isinstance(c, kind) for c in state.connections) and not state.tasks

    return served


def stream_slots(server: ServerHandle) -> Any:
    return server.server.lifespan.state[STATE_KEY].cells[0].stream_slots


def header_lines(head: bytes) -> list[bytes]:
    """The response's header lines, without the date (it changes each second)."""
    lines = head.split(b"\r\n\r\n")[0].split(b"\r\n")
    return sorted(line.lower() for line in lines if not line.lower().startswith(b"date:"))


async def test_a_stream_opened_by_the_front_looks_like_one_uvicorn_served(server: ServerHandle, store: Store) -> None:
    """A fresh connection's stream is opened without a uvicorn protocol; one asked for on a
    connection uvicorn already serves (after another request) goes through uvicorn and its
    take-over. The client gets the same status line, headers and first frames from both."""
    job_id = await new_running_job(store)
    state = server.server.server_state
    assert issubclass(server.server.config.http_protocol_class, FrontProtocol)

    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(HEALTH)
        await read_until(reader, b"\r\n\r\n")
        writer.write(stream_request(job_id))
        through_uvicorn = await read_until(reader, b"event: job.processing")
    finally:
        writer.close()
        await writer.wait_closed()

    async def one_connection() -> bool:
        return len(state.connections) == 0

    await wait_until(one_connection)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(stream_request(job_id))
        through_front = await read_until(reader, b"event: job.processing")

        await wait_until(served_by(state, StreamConnection))
        assert not any(isinstance(c, HttpToolsProtocol) for c in state.connections), state.connections
    finally:
        writer.close()
    assert through_front.startswith(b"HTTP/1.1 200 OK\r\n"), through_front
    assert header_lines(through_front) == header_lines(through_uvicorn)
    assert through_front.partition(b"\r\n\r\n")[2] == through_uvicorn.partition(b"\r\n\r\n")[2]


async def test_a_request_pipelined_behind_a_stream_is_answered_after_it(server: ServerHandle, store: Store) -> None:
    """Two requests in one write, the first a stream (of a job that is over: it ends at its
    terminal event): the front hands both to uvicorn, which answers them in order."""
    job_id = await new_running_job(store)
    await store.complete(job_id, 1, "1")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(stream_request(job_id) + HEALTH)
        data = await read_until(reader, b'"status":"ok"')
    finally:
        writer.close()
    stream, _, rest = data.partition(b"0\r\n\r\n")
    assert stream.startswith(b"HTTP/1.1 200 OK\r\n") and b"event: job.completed" in stream, data
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n"), data


async def test_what_a_client_sends_while_its_stream_opens_is_answered_after_the_stream(
    server: ServerHandle, store: Store, redis: Redis
) -> None:
    """The next request arrives while the open waits for Redis (held by CLIENT PAUSE): it is kept,
    unread, and answered once the stream has ended."""
    job_id = await new_running_job(store)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        async with held_open(redis, writer, stream_request(job_id)):
            writer.write(HEALTH)  # the next request, while the stream opens
            front = the_connection(server, FrontProtocol)

            async def read_meanwhile() -> bool:
                return front.received.endswith(HEALTH) and front.head_length < len(front.received)

            await wait_until(read_meanwhile)
        await read_until(reader, b"event: job.processing")
        await store.complete(job_id, 1, "1")
        data = await read_until(reader, b'"status":"ok"')
    finally:
        writer.close()
    _, _, rest = data.partition(b"0\r\n\r\n")
    assert b"event: job.completed" in data and rest.startswith(b"HTTP/1.1 200 OK\r\n"), data


async def test_a_refused_stream_is_uvicorns_answer_and_the_connection_stays_usable(
    server: ServerHandle, store: Store
) -> None:
    """Any answer but an opened stream (here a 401, then a 404) is given by uvicorn's path, as
    before; the connection is kept alive for the next request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        unauthorized = await read_until(reader, b"}")
        writer.write(stream_request("job_01JDXXXXXXXXXXXXXXXXXXXXXX"))
        missing = await read_until(reader, b"}")
    finally:
        writer.close()
    assert unauthorized.startswith(b"HTTP/1.1 401 "), unauthorized
    assert b"application/problem+json" in unauthorized and b"connection: close" not in unauthorized.lower()
    assert missing.startswith(b"HTTP/1.1 404 "), missing


async def test_a_client_gone_while_its_stream_opens_frees_its_places(
    server: ServerHandle, store: Store, redis: Redis
) -> None:
    """The open waits for Redis (held by CLIENT PAUSE) while the client goes away: once Redis
    answers, the stream lets go of the process's place and of the tenant's slot."""
    job_id = await new_running_job(store)
    slots = stream_slots(server)
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    async with held_open(redis, writer, stream_request(job_id)):
        assert slots.open_streams == 1
        writer.close()
        await writer.wait_closed()

    async def let_go() -> bool:
        return slots.open_streams == 0 and await redis.zcard(schema.streams_key("acme")) == 0

    await wait_until(let_go)
    assert not any(isinstance(c, StreamConnection) for c in server.server.server_state.connections)


async def test_a_stream_pipelined_on_a_connection_uvicorn_serves_is_refused_and_the_rest_answered(
    server: ServerHandle, store: Store
) -> None:
    """On a connection uvicorn already serves, a stream request with another request behind it in
    the same write cannot take its connection over: it is answered 400 (why, and what to do), and
    the request behind it is answered after it."""
    job_id = await new_running_job(store)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(HEALTH)
        await read_until(reader, b'"status":"ok"')
        writer.write(stream_request(job_id) + HEALTH)
        data = await read_until(reader, b'"status":"ok"')
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert b"pipelining" in data and b"application/problem+json" in data
    assert data.count(b"HTTP/1.1 200 OK") == 1, data
    slots = stream_slots(server)
    assert slots.open_streams == 0


async def test_a_connection_whose_stream_ended_goes_back_to_the_front(server: ServerHandle, store: Store) -> None:
    """A job's stream ends at its terminal event and its connection is kept alive: it goes back to
    the front protocol, so the next stream asked for on it is opened there too (no uvicorn protocol
    on the way), and any other request is still uvicorn's."""
    finished = await new_running_job(store)
    await store.complete(finished, 1, "1")
    running = await new_running_job(store)
    state = server.server.server_state
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(stream_request(finished))
        await read_until(reader, b"0\r\n\r\n")

        await wait_until(served_by(state, FrontProtocol))
        front = the_connection(server, FrontProtocol)
        assert front.idle and not any(isinstance(c, HttpToolsProtocol) for c in state.connections)
        writer.write(stream_request(running))
        second = await read_until(reader, b"event: job.processing")

        await wait_until(served_by(state, StreamConnection))
        assert not any(isinstance(c, HttpToolsProtocol) for c in state.connections), state.connections
        assert second.startswith(b"HTTP/1.1 200 OK\r\n"), second
    finally:
        writer.close()
    # And a request that is not a stream, after a stream, is answered by uvicorn on the same connection.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(stream_request(finished))
        await read_until(reader, b"0\r\n\r\n")
        writer.write(HEALTH)
        health = await read_until(reader, b'"status":"ok"')
    finally:
        writer.close()
    assert health.startswith(b"HTTP/1.1 200 OK\r\n"), health


async def test_a_kept_alive_connection_back_at_the_front_is_closed_when_idle_and_times_a_new_head(
    server: ServerHandle, store: Store
) -> None:
    """Back at the front after a stream, an idle connection is closed at uvicorn's keep-alive
    timeout (it was before, by uvicorn's protocol); once the next request begins, its head is timed
    by the head deadline instead."""
    finished = await new_running_job(store)
    await store.complete(finished, 1, "1")
    server.server.config.timeout_keep_alive = 0.2
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(stream_request(finished))
        await read_until(reader, b"0\r\n\r\n")
        assert await asyncio.wait_for(reader.read(1), 20) == b""  # closed by the server
    finally:
        writer.close()

    server.server.config.timeout_keep_alive = 600  # (longer than the head deadline, 30 s: told apart below)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(stream_request(finished))
        await read_until(reader, b"0\r\n\r\n")

        await wait_until(served_by(server.server.server_state, FrontProtocol))
        front = the_connection(server, FrontProtocol)
        assert front.timer is not None and front.timer.when() > asyncio.get_running_loop().time() + 300
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # a head begun

        async def head_begun() -> bool:
            return not front.idle

        await wait_until(head_begun)
        deadline = asyncio.get_running_loop().time() + front.head_timeout_s
        assert front.timer is not None and deadline - 60 < front.timer.when() <= deadline
    finally:
        writer.close()
