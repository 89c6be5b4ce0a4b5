"""The load client of the stream benchmarks: one process holding many SSE streams, the same for
Jobcast and for nginx+nchan.

It runs in a process of its own (``multiprocessing``, spawned by :mod:`bench.sse_fanout`) and obeys
commands on a pipe:

    ("connect",)                          open every stream; answer when all have their 200 headers
    ("collect", per_stream, deadline)     wait until each stream saw ``per_stream`` marked events, or
                                          the deadline (epoch seconds) passes; answer with the figures
    ("reconnect", port)                   reopen every stream the server closed, on ``port``, with
                                          ``Last-Event-ID`` (its last id), retrying refused connects;
                                          answer when all have their 200 headers again
    ("close",)                            close everything and exit

A marked event is a ``job.progress`` event whose data carries ``bseq=<n> t=<epoch ns>``, written by
the publisher just before it published. Latency is the client's clock when the bytes arrive
(``data_received``) minus ``t``: one clock, one machine. Each stream counts distinct ``n`` (a
repeat is a duplicate, not a delivery).

Cost. It is an ``asyncio.Protocol`` on uvloop (no StreamReader, no HTTP library): per received frame
one callback, one regex scan and one append. Its CPU time is measured and reported by the benchmark;
it runs in 1 or 2 processes so that it is not the bottleneck at 10k streams.
"""

from __future__ import annotations

import asyncio
import re
import time
from array import array
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

#: A ``job.progress`` block whose data carries the publisher's marker (id line before or after the
#: event line: Jobcast writes it first, nchan second). Terminal events repeat the last progress, so
#: only progress events count.
MARK = re.compile(rb"event: job\.progress\n(?:id: [^\n]*\n)?data: [^\n]*?bseq=(\d+) t=(\d+)")
TAIL_MAX = 64 * 1024


class Client:
    def __init__(self, host: str, port: int, requests: list[Any], connect_concurrency: int) -> None:
        self.host = host
        self.port = port
        self.requests = requests
        self.connect_concurrency = connect_concurrency
        self.streams: list[Stream] = []
        self.latencies_us = array("q")
        self.seqs = array("i")  # the event number of each latency
        self.expected = 0
        self.complete = 0
        self.done: asyncio.Future[None] | None = None

    def on_event(self, stream: Stream) -> None:
        if self.expected and len(stream.seen) == self.expected:
            self.complete += 1
            if self.complete == len(self.streams) and self.done is not None and not self.done.done():
                self.done.set_result(None)

    def protocol(self, request: Any) -> Any:
        """The connection's protocol: a Stream; its ``headers`` future gives the status (200: in)."""
        return Stream(self, request)

    async def connect(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(self.connect_concurrency)
        errors: dict[str, int] = {}

        async def one(request: bytes) -> None:
            async with gate:
                stream = self.protocol(request)
                try:
                    await loop.create_connection(lambda: stream, self.host, self.port)
                    async with asyncio.timeout(30):
                        status = await stream.headers
                    if status != 200:
                        raise ConnectionError(f"status {status}")
                    self.streams.append(stream)
                except (OSError, TimeoutError) as exc:
                    key = type(exc).__name__ + ": " + str(exc)[:80]
                    errors[key] = errors.get(key, 0) + 1
                    if stream.transport is not None:
                        stream.transport.close()

        t0 = time.time_ns()
        await asyncio.gather(*(one(r) for r in self.requests))
        t1 = time.time_ns()
        return {"connected": len(self.streams), "failed": sum(errors.values()), "errors": errors, "t0": t0, "t1": t1}

    async def reconnect(self, port: int) -> dict[str, Any]:
        """Resume every closed stream (a reconnect storm); ``seen`` carries over, so a repeated
        event counts as a duplicate and a skipped one stays missing."""
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(self.connect_concurrency)
        self.port = port
        errors: dict[str, int] = {}
        resumed = 0

        async def one(old: Stream) -> None:
            nonlocal resumed
            header = b"Last-Event-ID: " + old.last_id + b"\r\n" if old.last_id else b""
            request = old.request[:-2] + header + b"\r\n"
            for _ in range(200):
                async with gate:
                    stream = Stream(self, request, old.seen, old.last_id)
                    stream.duplicates = old.duplicates
                    try:
                        await loop.create_connection(lambda s=stream: s, self.host, port)  # type: ignore[misc]
                        async with asyncio.timeout(30):
                            status = await stream.headers
                        if status != 200:
                            raise ConnectionError(f"status {status}")
                    except (OSError, TimeoutError) as exc:
                        key = type(exc).__name__ + ": " + str(exc)[:80]
                        errors[key] = errors.get(key, 0) + 1
                        if stream.transport is not None:
                            stream.transport.close()
                        await asyncio.sleep(0.05)
                        continue
                self.streams[self.streams.index(old)] = stream
                resumed += 1
                return

        t0 = time.time_ns()
        await asyncio.gather(*(one(s) for s in list(self.streams) if s.lost))
        t1 = time.time_ns()
        return {"resumed": resumed, "errors": errors, "t0": t0, "t1": t1}

    async def collect(self, per_stream: int, deadline: float) -> dict[str, Any]:
        self.expected = per_stream
        self.complete = sum(1 for s in self.streams if len(s.seen) >= per_stream)
        self.done = asyncio.get_running_loop().create_future()
        if self.complete < len(self.streams):
            try:
                async with asyncio.timeout(max(0.0, deadline - time.time())):
                    await self.done
            except TimeoutError:
                pass
        return {
            "latencies_us": self.latencies_us.tobytes(),
            "seqs": self.seqs.tobytes(),
            "received": sum(len(s.seen) for s in self.streams),
            "duplicates": sum(s.duplicates for s in self.streams),
            "complete": self.complete,
            "streams": len(self.streams),
            "closed_early": sum(1 for s in self.streams if s.lost and len(s.seen) < per_stream),
        }

    def close(self) -> None:
        for stream in self.streams:
            if stream.transport is not None:
                stream.transport.close()


class Stream(asyncio.Protocol):
    def __init__(self, client: Client, request: bytes, seen: set[int] | None = None, last_id: bytes = b"") -> None:
        self.client = client
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.headers: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._head = b""
        self._tail = b""
        self.seen: set[int] = seen if seen is not None else set()
        self.last_id = last_id  # of the last complete event block, for Last-Event-ID
        self.duplicates = 0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if not self.headers.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = int(self._head[9:12])
            data, self._head = self._head[end + 4 :], b""
            self.headers.set_result(status)
        buf = self._tail + data if self._tail else data
        cut = buf.rfind(b"\n\n")  # the end of the last complete event block
        if cut < 0:
            self._tail = buf[-TAIL_MAX:]
            return
        self._tail = buf[cut + 2 :]
        id_at = buf.rfind(b"id: ", 0, cut)
        if id_at >= 0 and (id_at == 0 or buf[id_at - 1] == 10):  # at the start of a line
            self.last_id = buf[id_at + 4 : buf.index(b"\n", id_at)]
        for match in MARK.finditer(buf, 0, cut):
            seq = int(match[1])
            if seq in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(seq)
            self.client.latencies_us.append((now - int(match[2])) // 1000)
            self.client.seqs.append(seq)
            self.client.on_event(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.headers.done():
            self.headers.set_exception(ConnectionError("closed before the response headers"))


def request_bytes(host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def run(conn: Connection, host: str, port: int, paths: list[str], headers: dict[str, str], concurrency: int) -> None:
    """Process entry point: obey the commands on ``conn`` until ``("close",)``."""
    serve(conn, lambda: Client(host, port, [request_bytes(host, port, p, headers) for p in paths], concurrency))


def serve(conn: Connection, make_client: Callable[[], Client]) -> None:
    """Obey the commands on ``conn`` with the client ``make_client`` builds (in the event loop)."""
    import resource

    import uvloop

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        client = make_client()
        while True:
            # A thread reads the pipe: the loop's add_reader would make it non-blocking, and a
            # large answer (all latencies) must be sent whole.
            command = await loop.run_in_executor(None, conn.recv)
            if command[0] == "connect":
                conn.send(await client.connect())
            elif command[0] == "collect":
                conn.send(await client.collect(command[1], command[2]))
            elif command[0] == "reconnect":
                conn.send(await client.reconnect(command[1]))
            else:
                client.close()
                await asyncio.sleep(0.1)
                return

    uvloop.run(main())
