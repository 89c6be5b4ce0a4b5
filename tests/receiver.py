"""A throwaway webhook receiver for the tests: a tiny HTTP/1.1 server on a loopback address.

It counts connections (so a test can assert that nothing even connected), records every request,
and answers each with the next scripted :class:`Reply` (then with ``default``). A reply with
``hang=True`` holds the request unanswered until the receiver stops; ``hold=event`` until the test sets
the event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from http import HTTPStatus

from .conftest import wait_until


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False
    #: When given, the answer waits until the test sets this event.
    hold: asyncio.Event | None = None


@dataclass(frozen=True)
class Received:
    at: float  # time.monotonic() when the request was complete
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


class Receiver:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.connections = 0
        self.requests: list[Received] = []
        self.replies: list[Reply] = []
        self.default = Reply()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._closing = asyncio.Event()

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        return self.origin + "/hook"

    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._closing.set()  # hanging requests end
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):
            writer.close()  # idle keep-alive connections end
        if self._server is not None:
            await self._server.wait_closed()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until ``count`` requests arrived; returns them all."""

        async def arrived() -> bool:
            return len(self.requests) >= count

        await wait_until(arrived, timeout=timeout)
        return self.requests

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.add(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *lines = head.rstrip("\r\n").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(Received(time.monotonic(), method, path, headers, body))
                reply = self.replies.pop(0) if self.replies else self.default
                if reply.hang:
                    await self._closing.wait()
                    return
                if reply.hold is not None:
                    await reply.hold.wait()
                extra = "".join(f"{name}: {value}\r\n" for name, value in reply.headers.items())
                writer.write(
                    f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}\r\n"
                    f"Content-Length: 2\r\n{extra}\r\nok".encode("latin-1")
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the client closed the connection
        finally:
            self._open.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
