"""The uvicorn seam of event streams (server/takeover.py): what Jobcast relies on inside uvicorn,
checked against uvicorn itself, and the hand-over checked over a raw socket.

uvicorn offers no way to hand a connection over to the application, so ``take_over`` reads and sets
some of its internals. These tests fail loudly when a uvicorn upgrade changes any of them: re-read
each changed function against what ``UVICORN_INTERNALS`` says Jobcast does with it, adapt
takeover.py, then record the new fingerprints here.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import tomllib
from pathlib import Path

import uvicorn.protocols.http.httptools_impl as httptools_impl
import uvicorn.server

from jobcast.takeover import UVICORN_INTERNALS, StreamConnection
from jobcast.worker.store import Store

from .conftest import ServerHandle, read_until, wait_until
from .seams import assert_internals_unchanged, source_fingerprint
from .test_sse import new_running_job

#: sha256 (first 16 hex digits) of the source of each internal, as of uvicorn 0.55.0.
FINGERPRINTS = {
    "RequestResponseCycle.__init__": "4d2f220910c33c12",
    "RequestResponseCycle.send": "abdd8601b326a8da",
    "RequestResponseCycle.run_asgi": "0f33f2449a444bc2",
    "HttpToolsProtocol.__init__": "4f08999410347141",
    "HttpToolsProtocol.connection_made": "6efb565ff3d36b91",
    "HttpToolsProtocol.on_response_complete": "64e254f28e389e76",
    "HttpToolsProtocol.shutdown": "d7351fa33f00d430",
    "Server.startup": "2aa1d70a244bfcf2",
    "Server.shutdown": "5d01b8b1f116a786",
    "ServerState.__init__": "8daf3a9b4e4e4245",
    "HttpToolsProtocol.data_received": "010a7ae59a5d3b1a",
    "HttpToolsProtocol.on_header": "1e86ebb6cea0458c",
    "HttpToolsProtocol.on_headers_complete": "1ea8589acfad92d8",
}
ROOT = Path(__file__).resolve().parent.parent


def fingerprint(name: str) -> str:
    root = uvicorn.server if name.startswith(("Server.", "ServerState.")) else httptools_impl
    return source_fingerprint(root, name)


def test_every_uvicorn_internal_jobcast_relies_on_is_unchanged() -> None:
    assert_internals_unchanged("uvicorn", UVICORN_INTERNALS, FINGERPRINTS, fingerprint, "server/takeover.py")


def test_the_installed_uvicorn_is_the_one_the_seam_was_checked_against() -> None:
    requirement = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                       if r.startswith("uvicorn"))  # fmt: skip
    assert requirement == "uvicorn[standard]>=0.55,<0.56", "widen the pin only after this file's checks pass"
    assert importlib.metadata.version("uvicorn").startswith("0.55.")


async def test_a_stream_leaves_no_task_and_hands_its_connection_back_when_it_ends(
    server: ServerHandle, store: Store
) -> None:
    """Once a stream is open its request's task is gone (the stream lives in the hub and in the
    connection it took over); at its terminal event the connection serves the next request."""
    job_id = await new_running_job(store)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    auth = "Authorization: Bearer key-acme\r\n"
    try:
        writer.write(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        head = await read_until(reader, b"event: job.processing")
        assert b"transfer-encoding: chunked" in head.lower()
        state = server.server.server_state

        async def idle() -> bool:
            return not state.tasks and any(isinstance(c, StreamConnection) for c in state.connections)

        await wait_until(idle)
        await store.progress(job_id, 1, 50, None, None)
        await store.complete(job_id, 1, "1")
        tail = await read_until(reader, b"0\r\n\r\n")
        assert b"event: job.progress" in tail and b"event: job.completed" in tail
        # The same connection answers another request: uvicorn has it back.
        writer.write(f"GET /jobs/{job_id} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        answer = await read_until(reader, b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert not any(isinstance(c, StreamConnection) for c in state.connections)
    finally:
        writer.close()


async def test_the_response_head_goes_out_with_the_stream_head_and_the_replay(
    server: ServerHandle, store: Store
) -> None:
    """takeover.start keeps the head uvicorn makes (status line, its default headers, ours) and the
    stream writes it with its retry frame and the first replay page: one write, so the client's
    first read has all three."""
    job_id = await new_running_job(store)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        auth = "Authorization: Bearer key-acme\r\n"
        writer.write(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        async with asyncio.timeout(20):
            first = await reader.read(65536)
        assert first.startswith(b"HTTP/1.1 200 OK\r\n"), first
        head, _, body = first.partition(b"\r\n\r\n")
        assert b"\r\ntransfer-encoding: chunked" in head.lower() and b"\r\ndate: " in head.lower()
        assert b"content-type: text/event-stream" in head.lower()
        assert b"retry: " in body and b"event: job.processing" in body, first
    finally:
        writer.close()
