"""One Redis connection kept for a call made at a high rate, its calls in flight together.

redis-py's client takes a connection from its pool for every command (under the pool's lock),
writes the command, waits for its reply and gives the connection back: per command a checkout, a
wait and some sixty microseconds of Python, and one command at a time per connection. Opening an
event stream is one such command, and a reconnect storm makes thousands of them at once.
:class:`Pipelined` keeps one connection of the client's pool instead and writes each call the
moment it is made, without waiting for the replies of the calls before it (Redis answers the
commands of a connection in order); one task reads the replies while calls wait and hands each to
its caller. Concurrent calls thus share round trips the way a pipeline does, without being
gathered first.

It uses redis-py's public connection API only (``ConnectionPool.get_connection`` and ``release``,
``Connection.pack_command``, ``send_packed_command``, ``can_read_destructive``, ``read_response``
and ``disconnect``), so whatever the pool's connection class does (Sentinel's primary lookup, TLS,
AUTH, hiredis) holds here too. When the connection fails, every call waiting on it gets the error
and the next call takes a new connection from the pool (after a Sentinel failover: the new
primary's). A Redis Cluster client, which has no one pool, sends each call itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError, ResponseError

#: What the reader does with the reply of a call whose caller went away (cancelled) meanwhile.
Orphaned = Callable[[Any], None]


class Pipelined:
    """Calls on one connection of ``redis``'s pool, written at once and answered in order."""

    def __init__(self, redis: Redis, *, on_task: Callable[[asyncio.Task[Any]], None] | None = None) -> None:
        #: A cluster client has no one pool (it routes each command itself): it sends the calls.
        self._pool: Any = getattr(redis, "connection_pool", None)
        self._client: Any = redis
        self._connection: Any = None
        self._connecting: asyncio.Future[Any] | None = None
        self._checking: asyncio.Task[Any] | None = None
        #: The calls written and not yet answered, oldest first: each one's future and what to do
        #: with its reply when its caller has gone.
        self._waiting: deque[tuple[asyncio.Future[Any], Orphaned | None]] = deque()
        self._reader: asyncio.Task[None] | None = None
        #: Told of every reader task started (a shutdown waits for them: jobcast.worker.schema).
        self._on_task = on_task

    @property
    def pooled(self) -> bool:
        """Whether the calls go on a connection of this object's (not a cluster client's)."""
        return self._pool is not None

    @property
    def in_flight(self) -> int:
        """Calls written and not yet answered."""
        return len(self._waiting)

    async def call(self, *args: Any, orphaned: Orphaned | None = None) -> Any:
        """Send the command ``args`` and return its reply (an error reply raises ResponseError).
        ``orphaned`` gets the reply instead when the caller was cancelled before it came."""
        if self._pool is None:
            return await self._client.execute_command(*args)
        connection = self._connection
        if connection is None or not self._waiting or not connection.is_connected:
            # (Disconnected with calls in flight, by the pool, e.g. after a failover: their replies
            # are lost, and a write now would reconnect it under them and answer them with ours.)
            connection = await self._ready()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Appended and written in one step (the connection is connected: nothing is awaited before
        # the write), so the order of `waiting` is the order of the commands on the connection.
        waiting = self._waiting
        waiting.append((future, orphaned))
        try:
            await connection.send_packed_command(connection.pack_command(*args), check_health=False)
        except BaseException as exc:  # the write failed or was cancelled: the connection is unusable
            self._lost(connection, exc)
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved here: it is raised below, as exc
            raise
        if self._reader is None and self._connection is connection:
            self._reader = asyncio.get_running_loop().create_task(self._read(connection, waiting))
            if self._on_task is not None:
                self._on_task(self._reader)
        return await future

    async def _ready(self) -> Any:
        """The connection, checked when nothing is in flight on it (the server may have closed it
        while it was idle), or a new one from the pool."""
        while True:
            connection = self._connection
            if connection is None:
                await self._connect()
            elif not connection.is_connected:
                self._lost(connection, ConnectionError("the Redis connection was closed"))
            elif self._waiting:
                return connection
            elif await self._stale(connection):  # idle, yet data or its end came
                self._lost(connection, ConnectionError("the Redis connection was closed by the server"))
            elif connection is self._connection:
                return connection

    async def _stale(self, connection: Any) -> bool:
        """Whether the idle ``connection`` has something to read (its end, most likely): one caller
        asks (a connection takes one read at a time), the others wait for its answer."""
        if self._checking is None:
            self._checking = asyncio.get_running_loop().create_task(connection.can_read_destructive())
        checking = self._checking
        try:
            return bool(await asyncio.shield(checking))
        finally:
            if self._checking is checking and checking.done():
                self._checking = None

    async def _connect(self) -> None:
        """Take a connection from the pool: one caller does, the others wait for it."""
        if self._connecting is not None:
            await asyncio.shield(self._connecting)
            return
        self._connecting = asyncio.get_running_loop().create_future()
        try:
            self._connection = await self._pool.get_connection()
        except BaseException as exc:
            self._connecting.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
            self._connecting.exception()  # retrieved: each waiter raises it when it awaits
            raise
        else:
            self._connecting.set_result(None)
        finally:
            self._connecting = None

    async def _read(self, connection: Any, waiting: deque[tuple[asyncio.Future[Any], Orphaned | None]]) -> None:
        """Read the replies of ``connection`` while its calls (``waiting``) wait, each to its caller."""
        try:
            while waiting:
                try:
                    reply: Any = await connection.read_response()
                except ResponseError as exc:  # this call's error reply; the connection is fine
                    reply = exc
                if not waiting:  # the connection was given up meanwhile (_lost)
                    break
                future, orphaned = waiting.popleft()
                if not future.done():
                    if isinstance(reply, ResponseError):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
                elif orphaned is not None and not isinstance(reply, ResponseError):
                    orphaned(reply)
        except BaseException as exc:  # the connection failed, or this task is cancelled
            self._lost(connection, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if self._reader is asyncio.current_task():
                self._reader = None

    def _lost(self, connection: Any, exc: BaseException) -> None:
        """``connection`` failed: every call waiting on it fails, it goes back to the pool
        disconnected, and the next call takes another."""
        if self._connection is not connection:
            return
        self._connection = None
        self._reader = None  # the one reading it ends by itself; the next connection gets its own
        error = exc if isinstance(exc, Exception) else ConnectionError("the Redis connection was closed")
        waiting, self._waiting = self._waiting, deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error)
        waiting.clear()
        task = asyncio.get_running_loop().create_task(self._give_back(connection))
        if self._on_task is not None:
            self._on_task(task)

    async def _give_back(self, connection: Any) -> None:
        with contextlib.suppress(Exception):
            await connection.disconnect(nowait=True)
        with contextlib.suppress(KeyError):  # a pool reset meanwhile no longer counts it as in use
            await self._pool.release(connection)
