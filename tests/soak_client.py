"""The soak's load client, in processes of its own so that the client is not what limits the soak.

A single process that both submitted jobs and read every job's event stream reached 79 of the 148
jobs/s it was asked for on a loaded machine (BENCHMARKS.md §8): the test measured its own client.
Here submitters and stream readers run in separate processes (``multiprocessing``, spawned, as
``bench/sse_client.py`` is), wired by pipes::

    submitter 0..S-1  --job ids-->  reader 0..R-1        (each submitter deals its ids round-robin)
         |                              |
         +--- {"jobs", "achieved"} ---> test  <--- {"streams", "latencies", ...} ---+

A submitter posts jobs at its share of the rate (at most ``IN_FLIGHT`` requests at once; behind
schedule, it catches up) and hands each job id to a reader, which opens the job's event stream at
once over a raw connection (``Connection: close``, no HTTP library) and keeps, when the server ends
the response, only what the test checks: the stream ids in order, the last event's name, and each
event's latency (arrival minus the Redis time in its id). The test compares the ids with the job's
log in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
import uuid
from array import array
from multiprocessing.connection import Connection
from typing import Any

FRAME = re.compile(rb"id: (\d+)-(\d+)\nevent: ([a-z._]+)\n")
IN_FLIGHT = 64


class Stream(asyncio.Protocol):
    """One job's event stream: the bytes as they arrive, with the arrival time of each read."""

    def __init__(self, reader: Reader, job_id: str) -> None:
        self.reader = reader
        self.job_id = job_id
        self.buffer = bytearray()
        self.arrivals: list[tuple[int, float]] = []  # (end offset of a read, wall clock ms)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.arrivals.append((len(self.buffer), time.time() * 1000))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reader.ended(self)

    def frames(self) -> list[tuple[str, bytes, float, float]]:
        """(stream id, event, arrival ms, latency ms) of every event received."""
        found = []
        reads = iter(self.arrivals)
        end, at = next(reads, (0, 0.0))
        for match in FRAME.finditer(self.buffer):
            while match.end() > end:
                end, at = next(reads)
            ms = int(match[1])
            found.append((f"{match[1].decode()}-{match[2].decode()}", match[3], at, at - ms))
        return found


class Reader:
    """Opens a stream per job id it is handed; keeps each stream's ids once the server ends it."""

    def __init__(self, host: str, port: int, authorization: str) -> None:
        self.host = host
        self.port = port
        self.authorization = authorization
        self.ids: dict[str, list[str]] = {}
        self.last_event: dict[str, str] = {}
        self.heads: dict[str, str] = {}  # the status line of a stream that carried no event
        self.latencies = array("d")  # arrival ms, latency ms, arrival ms, ...
        self.open = 0
        self.open_by_second: dict[int, int] = {}
        self.handed = 0
        self.all_handed = False
        self.finished: asyncio.Event = asyncio.Event()
        self.connecting: set[asyncio.Task[None]] = set()

    def follow(self, job_id: str) -> None:
        self.handed += 1
        self.open += 1
        loop = asyncio.get_running_loop()
        request = (
            f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: {self.authorization}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()

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

    def sample(self) -> None:
        second = int(time.time())
        self.open_by_second[second] = max(self.open_by_second.get(second, 0), self.open)

    def _check_done(self) -> None:
        if self.all_handed and self.open == 0:
            self.finished.set()

    def no_more(self) -> None:
        self.all_handed = True
        self._check_done()

    def results(self) -> dict[str, Any]:
        return {
            "ids": self.ids,
            "last_event": self.last_event,
            "heads": self.heads,
            "latencies": self.latencies.tobytes(),
            "open_by_second": self.open_by_second,
            "handed": self.handed,
        }


def read(jobs: Connection, report: Connection, host: str, port: int, authorization: str, submitters: int) -> None:
    """Process entry point of a reader: follow every job id that arrives on ``jobs`` until each of
    the ``submitters`` has said ``None`` (no more), then send the results on ``report``."""
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reader = Reader(host, port, authorization)

        def receive() -> None:  # a thread: a blocking recv must not stop the streams being read
            ends = 0
            while ends < submitters:
                job_id = jobs.recv()
                if job_id is None:
                    ends += 1
                else:
                    loop.call_soon_threadsafe(reader.follow, job_id)
            loop.call_soon_threadsafe(reader.no_more)

        threading.Thread(target=receive, daemon=True).start()
        while not reader.finished.is_set():
            reader.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.finished.wait(), 1.0)
        report.send(reader.results())

    uvloop.run(main())


def submit(
    readers: list[Connection], report: Connection, url: str, authorization: str,
    rate: float, seconds: float, body: dict[str, Any],
) -> None:  # fmt: skip
    """Process entry point of a submitter: post ``body`` at ``rate`` jobs/s for ``seconds``, dealing
    the job ids to ``readers``; then tell each reader there are no more and report what was done."""
    import httpx
    import uvloop

    async def main() -> None:
        jobs = 0
        failures: list[str] = []
        in_flight: set[asyncio.Task[None]] = set()
        limits = httpx.Limits(max_connections=IN_FLIGHT)
        headers = {"Authorization": authorization}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as client:

            async def one(n: int) -> None:
                # Retried with the same Idempotency-Key when the connection drops mid-request (a
                # keep-alive connection the server closed as the client reused it): one job either way.
                key = {"Idempotency-Key": uuid.uuid4().hex}
                for attempt in range(3):
                    try:
                        response = await client.post("/jobs", json=body, headers=key)
                        break
                    except httpx.TransportError as exc:
                        if attempt == 2:
                            failures.append(repr(exc))
                            return
                if response.status_code not in (200, 202):
                    failures.append(f"{response.status_code} {response.text[:300]}")
                    return
                readers[n % len(readers)].send(response.json()["id"])

            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < seconds:
                due = min(int(elapsed * rate) - jobs, IN_FLIGHT - len(in_flight))
                for _ in range(max(0, due)):
                    task = asyncio.create_task(one(jobs))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    jobs += 1
                await asyncio.sleep(0.005)
            achieved = jobs / (time.monotonic() - started)
            while in_flight:
                await asyncio.gather(*in_flight)
        for reader in readers:
            reader.send(None)
        report.send({"jobs": jobs, "achieved": achieved, "failures": failures})

    uvloop.run(main())
