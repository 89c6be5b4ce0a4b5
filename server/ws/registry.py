"""The open sockets of this server process: closed at once (1012) on graceful shutdown, and watched
for writes that block too long (1013)."""

from __future__ import annotations

import asyncio
from typing import Protocol


class Socket(Protocol):
    #: When the write under way started (loop time), or None.
    writing_since: float | None

    def close(self, code: int, reason: str) -> None: ...

    def too_slow(self) -> None: ...


class Sockets:
    def __init__(self) -> None:
        self._open: set[Socket] = set()
        self.draining = False

    def __len__(self) -> int:
        return len(self._open)

    def add(self, socket: Socket) -> None:
        self._open.add(socket)

    def discard(self, socket: Socket) -> None:
        self._open.discard(socket)

    def drain(self) -> None:
        """Close every socket with 1012 (service restart); refuse new ones. Clients reconnect (to
        another process) and re-subscribe with their last ids."""
        self.draining = True
        for socket in list(self._open):
            socket.close(1012, "server restart: re-subscribe with your last ids")

    async def watch_writes(self, timeout_s: float) -> None:
        """Forever: tell each socket whose write has been blocked for ``timeout_s`` that it is too slow.

        One task and one scan a second for all sockets, instead of a timer armed and cancelled
        around every write of every socket (a write is late by at most a quarter of ``timeout_s``
        more, capped at 1 s).
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, timeout_s / 4))
            deadline = loop.time() - timeout_s
            for socket in list(self._open):
                since = socket.writing_since
                if since is not None and since < deadline:
                    socket.too_slow()
