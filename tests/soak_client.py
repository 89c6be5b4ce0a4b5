"""The soak's load client: ``CLIENTS`` processes of its own, each submitting its share of the jobs
and reading each one's event stream, with as little work per job as it takes.

Why lean: with httpx the submitters alone took a whole core of the machine's two (BENCHMARKS.md §8):
the last full soak reached 191 of the 447 jobs/s it was asked for, and measured its own client.
So, per process (``uvloop``):

- **Submits** go over ``SUBMIT_CONNECTIONS`` keep-alive HTTP/1.1 connections (asyncio streams, no
  HTTP library): each takes the next job due (job ``n`` is due at ``n / rate`` seconds; behind
  schedule, it catches up), posts it and reads the answer's head and its ``Content-Length`` body.
  A connection the server closed as it was reused is reopened and the job posted again with the same
  ``Idempotency-Key``: one job either way.
- **Streams**: each job's event stream is opened as its ``202`` arrives, over a raw connection
  (``Connection: close``) read by an ``asyncio.Protocol`` that only keeps the bytes and the arrival
  time of each read. When the server ends the response, its frames are parsed once, keeping what
  the test checks: the stream ids in order, the last event's name, and each event's latency
  (arrival minus the Redis time in its id). The test compares the ids with the job's log in Redis.

Each process reports on its pipe when it has submitted its jobs, then when its last stream has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from array import array
from multiprocessing.connection import Connection
from typing import Any

import orjson

FRAME = re.compile(rb"id: (\d+)-(\d+)\nevent: ([a-z._]+)\n")
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
CLOSE = re.compile(rb"\r\nconnection: *close", re.IGNORECASE)
#: Submit connections per client process: requests in flight at most.
SUBMIT_CONNECTIONS = 32
#: How often a connection dropped mid-request is retried (same Idempotency-Key).
ATTEMPTS = 3


class Stream(asyncio.Protocol):
    """One job's event stream: the bytes as they arrive, with the arrival time of each read."""

    __slots__ = ("arrivals", "buffer", "client", "job_id")

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.job_id = job_id
        self.buffer = bytearray()
        self.arrivals: list[tuple[int, float]] = []  # (end offset of a read, wall clock ms)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.arrivals.append((len(self.buffer), time.time() * 1000))

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.ended(self)

    def frames(self) -> list[tuple[str, bytes, float, float]]:
        """(stream id, event, arrival ms, latency ms) of every event received."""
        found = []
        reads = iter(self.arrivals)
        end, at = next(reads, (0, 0.0))
        for match in FRAME.finditer(self.buffer):
            while match.end() > end:
                end, at = next(reads)
            found.append((f"{match[1].decode()}-{match[2].decode()}", match[3], at, at - int(match[1])))
        return found


class Client:
    """Submits ``body`` at ``rate`` jobs/s for ``seconds`` and follows every job's stream to its end."""

    def __init__(self, host: str, port: int, authorization: str, rate: float, seconds: float, body: bytes) -> None:
        self.host, self.port = host, port
        self.rate, self.seconds = rate, seconds
        self.post_head = (
            f"POST /jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: {authorization}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nIdempotency-Key: "
        ).encode()
        self.body = body
        self.stream_head = f"HTTP/1.1\r\nHost: {host}\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n"
        self.due = 0  # the next job to submit
        self.jobs = 0  # submitted (202)
        self.failures: list[str] = []
        self.started = 0.0
        self.last_submitted = 0.0
        self.ids: dict[str, list[str]] = {}
        self.last_event: dict[str, str] = {}
        self.heads: dict[str, str] = {}  # the start of a stream that carried no event
        self.latencies = array("d")  # arrival ms, latency ms, arrival ms, ...
        self.open = 0
        self.open_by_second: dict[int, int] = {}
        self.submitting = True
        self.finished = asyncio.Event()
        self.sampler: asyncio.Task[None] | None = None
        self.connecting: set[asyncio.Task[None]] = set()

    async def submit_all(self) -> dict[str, Any]:
        """Submit every job due (following each one's stream); what was submitted, at what rate."""
        self.started = time.monotonic()
        self.sampler = asyncio.create_task(self._sample())
        await asyncio.gather(*(self._submitter() for _ in range(SUBMIT_CONNECTIONS)))
        self.submitting = False
        elapsed = max(self.last_submitted - self.started, 1e-3)
        return {"jobs": self.jobs, "achieved": self.jobs / elapsed, "failures": self.failures}

    async def read_all(self) -> dict[str, Any]:
        """Once every stream has ended: what each carried."""
        self._check_done()
        await self.finished.wait()
        if self.sampler is not None:
            self.sampler.cancel()
        return {
            "ids": self.ids,
            "last_event": self.last_event,
            "heads": self.heads,
            "latencies": self.latencies.tobytes(),
            "open_by_second": self.open_by_second,
        }

    # --- submitting ------------------------------------------------------------------------------

    async def _submitter(self) -> None:
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                at = self.due / self.rate
                if at >= self.seconds:
                    return
                self.due += 1
                wait = self.started + at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                request = self.post_head + uuid.uuid4().hex.encode() + b"\r\n\r\n" + self.body
                for attempt in range(ATTEMPTS):
                    try:
                        if connection is None:
                            connection = await asyncio.open_connection(self.host, self.port)
                        status, body, keep = await _exchange(*connection, request)
                        if not keep:
                            connection[1].close()
                            connection = None
                        break
                    except (OSError, asyncio.IncompleteReadError) as exc:
                        if connection is not None:
                            connection[1].close()
                            connection = None
                        if attempt == ATTEMPTS - 1:
                            self.failures.append(repr(exc))
                            status, body = 0, b""
                if status not in (200, 202):
                    if status:
                        self.failures.append(f"{status} {body[:300]!r}")
                    continue
                self.jobs += 1
                self.last_submitted = time.monotonic()
                self._follow(orjson.loads(body)["id"])
        finally:
            if connection is not None:
                connection[1].close()

    # --- reading ---------------------------------------------------------------------------------

    def _follow(self, job_id: str) -> None:
        self.open += 1
        request = f"GET /jobs/{job_id}/events {self.stream_head}".encode()
        loop = asyncio.get_running_loop()

        async def connect() -> None:
            stream = Stream(self, job_id)
            try:
                transport, _ = await loop.create_connection(lambda: stream, self.host, self.port)
            except OSError as exc:
                stream.buffer += f"connect failed: {exc!r}".encode()
                self.ended(stream)
                return
            transport.write(request)

        task = loop.create_task(connect())
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    def ended(self, stream: Stream) -> None:
        frames = stream.frames()
        self.ids[stream.job_id] = [sid for sid, *_ in frames]
        self.last_event[stream.job_id] = frames[-1][1].decode() if frames else ""
        if not frames:
            self.heads[stream.job_id] = bytes(stream.buffer[:200]).decode(errors="replace")
        for _, _, at, latency in frames:
            self.latencies.extend((at, latency))
        self.open -= 1
        self._check_done()

    def _check_done(self) -> None:
        if not self.submitting and self.open == 0:
            self.finished.set()

    async def _sample(self) -> None:
        while True:
            second = int(time.time())
            self.open_by_second[second] = max(self.open_by_second.get(second, 0), self.open)
            await asyncio.sleep(1.0)


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes, bool]:
    """One request on a keep-alive connection: the answer's status and body, and whether the
    connection stays open."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = CONTENT_LENGTH.search(head)
    body = await reader.readexactly(int(length[1])) if length else b""
    return int(head[9:12]), body, CLOSE.search(head) is None


def run(report: Connection, host: str, port: int, authorization: str, rate: float, seconds: float, body: bytes) -> None:
    """Process entry point: submit and follow; on ``report``, what was submitted once it was, then
    what every stream carried once the last one ended."""
    import uvloop

    from jobcast.worker import collector

    collector.tune()  # as the servers do: this process keeps every stream's ids, the collector would walk them

    async def main() -> None:
        client = Client(host, port, authorization, rate, seconds, body)
        report.send(await client.submit_all())
        report.send(await client.read_all())

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main())
