"""The WebSocket load client of the fan-out benchmark: one process holding many ``/ws`` sockets,
each subscribed to one channel. It obeys the same pipe commands and answers with the same figures
as :mod:`bench.sse_client` (so :class:`bench.sse_fanout.Clients` drives either):

    ("connect",)                          open every socket and subscribe; answer when every ok is in
    ("collect", per_socket, deadline)     wait until each socket saw ``per_socket`` marked events
    ("close",)                            close everything and exit

The client is :class:`bench.sse_client.Client` with another protocol per connection (its
``headers`` future says 200 once the subscription's ok is in). A marked event is an event frame of
``job.progress`` whose data carries ``bseq=<n> t=<epoch ns>``; latency is the client's clock when
the bytes arrive minus ``t``.

Cost. Like the SSE client it is a bare ``asyncio.Protocol`` on uvloop: the handshake is written by
hand, server frames (unmasked, RFC 6455 §5.2) are cut out of the byte stream, one regex scan per
read, so that both transports are measured with a client of the same weight. It speaks only what
the benchmark needs: text frames from the server, one masked text frame (the subscribe) to it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import struct
import time
from multiprocessing.connection import Connection

from bench import sse_client

MARK = re.compile(rb'"event":"job\.progress".*?bseq=(\d+) t=(\d+)')
OK = re.compile(rb'"op":"ok"')


def masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([0x81]) + (bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + struct.pack("!H", size))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def handshake(host: str, port: int, headers: dict[str, str]) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /ws HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Client(sse_client.Client):
    def protocol(self, request: tuple[bytes, str]) -> Socket:
        return Socket(self, *request)


class Socket(asyncio.Protocol):
    def __init__(self, client: Client, handshake: bytes, channel: str) -> None:
        self.client = client
        self.handshake = handshake
        self.channel = channel
        self.transport: asyncio.Transport | None = None
        #: 200 once subscribed (what :meth:`bench.sse_client.Client.connect` waits for).
        self.headers: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._upgraded = False
        self._buf = b""
        self.seen: set[int] = set()
        self.duplicates = 0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        transport.write(self.handshake)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        buf = self._buf + data if self._buf else data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            if buf[9:12] != b"101":
                self.headers.set_result(int(buf[9:12]))
                return
            self._upgraded = True
            buf = buf[end + 4 :]
            assert self.transport is not None
            self.transport.write(masked_text_frame(f'{{"op":"subscribe","ref":"1","channel":"{self.channel}"}}'))
        pos = 0
        while len(buf) - pos >= 2:
            size = buf[pos + 1] & 0x7F
            head = 2
            if size == 126:
                if len(buf) - pos < 4:
                    break
                size, head = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif size == 127:
                if len(buf) - pos < 10:
                    break
                size, head = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            if len(buf) - pos < head + size:
                break
            self.frame(buf[pos + head : pos + head + size], now)
            pos += head + size
        self._buf = buf[pos:]

    def frame(self, payload: bytes, now: int) -> None:
        if not self.headers.done():
            if OK.search(payload):
                self.headers.set_result(200)
            return
        match = MARK.search(payload)
        if match is None:
            return
        seq = int(match[1])
        if seq in self.seen:
            self.duplicates += 1
            return
        self.seen.add(seq)
        self.client.latencies_us.append((now - int(match[2])) // 1000)
        self.client.seqs.append(seq)
        self.client.on_event(self)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.headers.done():
            self.headers.set_exception(ConnectionError("closed before the subscription"))


def run(conn: Connection, host: str, port: int, channels: list[str], headers: dict[str, str], concurrency: int) -> None:
    """Process entry point: obey the commands on ``conn`` until ``("close",)``."""
    sse_client.serve(
        conn, lambda: Client(host, port, [(handshake(host, port, headers), c) for c in channels], concurrency)
    )
