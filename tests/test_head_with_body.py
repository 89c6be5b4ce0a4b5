"""A response's head and body in one write (server/http_guard.py, ``HeadWithBody``): uvicorn's
protocol as ``jobcast web`` runs it, on a transport that records each write (the number of writes
is what is checked; a socket would coalesce or split them as it pleases)."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send
from uvicorn.server import ServerState

from jobcast.http_guard import HeadWithBody, guarded_protocol

from .transports import Recorder


async def served(app: Any, request: bytes) -> tuple[Recorder, ServerState]:
    """``request`` read by the guarded uvicorn protocol serving ``app``; the transport, and the
    server state whose tasks are the responses under way."""
    config = uvicorn.Config(app, http=guarded_protocol(head_timeout_s=30, max_head_bytes=65536), log_level="warning",
                            access_log=False, lifespan="off")  # fmt: skip
    config.load()
    state = ServerState()
    protocol = config.http_protocol_class(config=config, server_state=state, app_state={})  # type: ignore[call-arg]
    transport = Recorder()
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    protocol.data_received(request)
    return transport, state


async def turns_until(condition: Any, most: int = 1000) -> None:
    """Let the loop turn until ``condition()`` holds (everything here runs in this loop: no waiting
    on time)."""
    for _ in range(most):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not so after {most} turns of the loop")


async def answered(state: ServerState) -> None:
    await turns_until(lambda: all(task.done() for task in state.tasks))


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


BODY = {"id": "job_1", "status": "queued"}


async def test_a_json_answer_is_one_write_of_its_head_and_body() -> None:
    transport, state = await served(JSONResponse(BODY, status_code=202), get("/jobs/job_1"))
    await answered(state)
    [written] = transport.writes
    head, _, body = written.partition(b"\r\n\r\n")
    assert (
        head.startswith(b"HTTP/1.1 202 Accepted\r\n") and b"content-length: %d" % len(JSONResponse(BODY).body) in head
    )
    assert body == JSONResponse(BODY).body


async def test_answers_on_a_kept_connection_are_one_write_each() -> None:
    transport, _ = await served(JSONResponse(BODY), get("/a") + get("/b") + get("/c"))
    await turns_until(lambda: len(transport.writes) == 3)
    assert all(w.startswith(b"HTTP/1.1 200 OK\r\n") and w.endswith(JSONResponse(BODY).body) for w in transport.writes)


async def test_a_head_request_writes_its_head_at_once() -> None:
    transport, state = await served(Response(b"x" * 10, media_type="text/plain"), get("/", "HEAD"))
    await answered(state)
    [written] = transport.writes
    assert b"content-length: 10" in written and written.endswith(b"\r\n\r\n")


async def test_a_streamed_answer_writes_its_head_before_its_first_chunk() -> None:
    body_may_come = asyncio.Event()

    async def parts() -> Any:
        await body_may_come.wait()
        yield b"first"

    transport, state = await served(StreamingResponse(parts()), get("/"))
    await turns_until(lambda: len(transport.writes) == 1)
    assert (
        transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked" in transport.writes[0]
    )
    body_may_come.set()
    await answered(state)
    assert transport.writes[1:] == [b"5\r\nfirst\r\n", b"0\r\n\r\n"]


async def test_a_head_whose_body_comes_late_is_written_at_the_next_turn() -> None:
    """A Content-Length response whose body the application sends later: its head does not wait for it."""
    body_may_come = asyncio.Event()

    async def late_body(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await body_may_come.wait()
        await send({"type": "http.response.body", "body": b"late"})

    transport, state = await served(late_body, get("/"))
    await turns_until(lambda: len(transport.writes) == 1)
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and transport.writes[0].endswith(b"\r\n\r\n")
    body_may_come.set()
    await answered(state)
    assert transport.writes[1:] == [b"late"]


async def test_a_head_held_when_the_application_fails_is_written_before_the_connection_closes() -> None:
    async def fails(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        raise RuntimeError("failed after the head")

    transport, state = await served(fails, get("/"))
    await answered(state)
    [written] = transport.writes
    assert written.startswith(b"HTTP/1.1 200 OK\r\n") and transport.closed


async def test_the_cycle_writes_through_the_wrapper_and_take_over_unwraps_it() -> None:
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(send.__self__.transport)  # type: ignore[attr-defined]
        await JSONResponse(BODY)(scope, receive, send)

    transport, state = await served(app, get("/"))
    await answered(state)
    [wrapper] = seen
    assert isinstance(wrapper, HeadWithBody) and wrapper.transport is transport
