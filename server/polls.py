"""A long-poll's listener on the hub (``GET /jobs/{id}?wait=``): it holds no events, only the fact
that something happened, and wakes its one waiter (the request)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .hub import Item


class Subscription:
    """A long-poll's listener: remembers that something happened and wakes its one waiter."""

    __slots__ = ("_waiter", "closed", "dirty", "resync")

    def __init__(self) -> None:
        self.dirty = False
        self.resync = False
        self.closed = False  # the server is draining
        self._waiter: asyncio.Future[None] | None = None

    def deliver(self, item: Item, now: float) -> None:
        self.dirty = True
        self._wake()

    def deliver_many(self, items: list[Item], now: float) -> None:
        self.deliver(items[-1], now)

    def flag(self, *, resync: bool = False, closed: bool = False) -> None:
        self.resync = self.resync or resync
        self.closed = self.closed or closed
        self._wake()

    def ping(self, now: float, quiet_since: float) -> None:
        pass

    def reset(self) -> None:
        """Forget what was delivered and flagged (not ``closed``): the reader is about to re-read."""
        self.dirty = self.resync = False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def pending(self) -> bool:
        return self.dirty or self.resync or self.closed

    async def wait(self, timeout: float) -> bool:
        """Wait until something is pending or ``timeout`` passes; True if something is pending."""
        if self.pending:
            return True
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        except TimeoutError:
            pass
        finally:
            self._waiter = None
        return self.pending
