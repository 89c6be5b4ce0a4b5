"""One Redis connection kept for a call made at a high rate, its calls in flight together.

redis-py's client takes a connection from its pool for every command (under the pool's lock),
writes the command, waits for its reply and gives the connection back: per command a checkout, a
wait and some sixty microseconds of Python, and one command at a time per connection. Opening an
event stream is one such command, and a reconnect storm makes thousands of them at once.
:class:`Pipelined` keeps one connection of the client's pool instead and writes each call the
moment it is made, without waiting for the replies of the calls before it (Redis answers the
commands of a connection in order); one task reads the replies while calls wait and hands each to
its caller. Concurrent calls thus share round trips the way a pipeline does, without being
gathered first. The calls made in one turn of the event loop go out in one write, at the end of
that turn: one system call (and one read and wake-up of Redis) for a burst of calls, not one each.

It uses redis-py's public connection API only (``ConnectionPool.get_connection`` and ``release``,
``Connection.pack_command``, ``send_packed_command``, ``can_read_destructive``, ``read_response``
and ``disconnect``), so whatever the pool's connection class does (Sentinel's primary lookup, TLS,
AUTH, hiredis) holds here too. When the connection fails, every call waiting on it gets the error
and the next call takes a new connection from the pool (after a Sentinel failover: the new
primary's). A Redis Cluster client, which has no one pool, sends each call itself.

**Shared fate.** What used to be isolated per pooled connection is shared by the calls in flight
on this one: an error reply, or a value that cannot be sent, fails its own call only (and a caller
cancelled before its reply came leaves its call to run, its reply to ``orphaned``); but a
connection that fails, or whose write fails or is cancelled (the write is this object's task, not a
caller's), fails every call waiting on it (Redis may have run some of them; the state machine's
fences make a repeat harmless), and one that goes silent (a dead host, a NAT that dropped it) holds them until
:attr:`Pipelined.stall_s` has passed without a reply: the next call then gives it up, fails them,
and goes on a new connection. Head-of-line waiting behind a slow or large reply is what Redis,
which runs one command at a time, imposes on every connection anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: What the reader does with the reply of a call whose caller went away (cancelled) meanwhile.
Orphaned = Callable[[Any], None]


class Pipelined:
    """Calls on one connection of ``redis``'s pool, written at once and answered in order."""

    #: Seconds without a reply, calls waiting, after which the connection counts as silent (dead).
    stall_s = 10.0

    def __init__(
        self,
        redis: Redis,
        *,
        on_task: Callable[[asyncio.Task[Any]], None] | None = None,
        stall_s: float | None = None,
    ) -> None:
        #: A cluster client has no one pool (it routes each command itself): it sends the calls.
        self._pool: Any = getattr(redis, "connection_pool", None)
        self._client: Any = redis
        self._connection: Any = None
        self._connecting: asyncio.Future[None] | None = None
        #: The idle check under way: of which connection, and the task asking.
        self._checking: tuple[Any, asyncio.Task[Any]] | None = None
        #: The calls made and not yet answered, oldest first: each one's future and what to do
        #: with its reply when its caller has gone.
        self._waiting: deque[tuple[asyncio.Future[Any], Orphaned | None]] = deque()
        #: The packed calls of this loop turn, not written yet (:meth:`_flush` writes them at its end).
        self._outbox: list[bytes] = []
        #: Loop time of the last reply read, or of the first call written after none was waiting.
        self._progress = 0.0
        self._reader: asyncio.Task[None] | None = None
        #: Told of every task started (a shutdown waits for them: jobcast.worker.schema).
        self._on_task = on_task
        self._tasks: set[asyncio.Task[Any]] = set()
        if stall_s is not None:
            self.stall_s = stall_s

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
        loop = asyncio.get_running_loop()
        connection = self._connection
        if connection is None or not self._waiting or not connection.is_connected:
            # (Disconnected with calls in flight, by the pool, e.g. after a failover: their replies
            # are lost, and a write now would reconnect it under them and answer them with ours.)
            connection = await self._ready()
        elif loop.time() - self._progress > self.stall_s:
            silent = RedisTimeoutError(f"no reply from Redis in {self.stall_s:g} s: connection given up")
            self._lost(connection, silent)
            connection = await self._ready()
        packed = connection.pack_command(*args)  # a value it cannot send fails this call only
        future: asyncio.Future[Any] = loop.create_future()
        # Appended to `waiting` and to the outbox in one step, so the order of `waiting` is the
        # order of the commands on the connection.
        waiting = self._waiting
        if not waiting:
            self._progress = loop.time()
        waiting.append((future, orphaned))
        if not self._outbox:
            loop.call_soon(self._flush, connection)
        self._outbox += packed
        if self._reader is None:
            self._reader = self._start(self._read(connection, waiting))
        return await future

    def _flush(self, connection: Any) -> None:
        """Write the calls of the loop turn that ended (one write, in a task: redis-py's write is a
        coroutine); a connection given up meanwhile has failed them already."""
        if self._connection is not connection:
            return  # given up (_lost emptied the outbox); what is in it now is the next one's
        outbox, self._outbox = self._outbox, []
        if outbox:
            self._start(self._write(connection, outbox))

    async def _write(self, connection: Any, outbox: list[bytes]) -> None:
        if not connection.is_connected:  # (disconnected by the pool meanwhile: redis-py would reconnect it)
            self._lost(connection, ConnectionError("the Redis connection was closed"))
            return
        try:
            await connection.send_packed_command(outbox, check_health=False)
        except BaseException as exc:  # the write failed or was cancelled: the connection is unusable
            if isinstance(exc, Exception) and not isinstance(exc, RedisError):
                exc = ConnectionError(f"writing to Redis failed: {exc!r}")
            self._lost(connection, exc)
            if not isinstance(exc, Exception):
                raise

    async def _ready(self) -> Any:
        """A connected connection, checked when nothing is in flight on it (the server may have
        closed it while it was idle), or a new one from the pool. Nothing is awaited between its
        last check and its return."""
        while True:
            connection = self._connection
            if connection is None:
                await self._connect()
            elif not connection.is_connected:
                self._lost(connection, ConnectionError("the Redis connection was closed"))
            elif self._waiting:
                return connection
            elif await self._stale(connection):  # idle, yet data or its end came (or the check failed)
                self._lost(connection, ConnectionError("the Redis connection was closed by the server"))
            elif connection is self._connection and connection.is_connected:
                return connection

    async def _stale(self, connection: Any) -> bool:
        """Whether the idle ``connection`` has something to read (its end, most likely), or cannot
        be asked: one caller asks (a connection takes one read at a time), the others wait for its
        answer."""
        if self._checking is None or self._checking[0] is not connection:
            task = asyncio.get_running_loop().create_task(self._probe(connection))
            self._checking = (connection, task)
            task.add_done_callback(self._checked)
        checking = self._checking[1]
        try:
            return bool(await asyncio.shield(checking))
        except (RedisError, OSError):  # redis-py's own check raises at the end of the stream
            return True

    async def _probe(self, connection: Any) -> bool:
        """The idle check itself, run a loop turn after it is asked for. One asked for between the
        end of the check before it and the waking of that check's callers (``_checking`` is cleared
        first) runs after those callers wrote their calls: what it finds in the connection's stream
        then are their replies (uvloop reads a socket into its stream before the next turn's tasks
        run), not an end of the connection. So a connection with calls in flight is not checked (an
        end of it reaches the reader of those calls); and no call is written while a check reads,
        as every other caller waits for its answer."""
        if self._waiting:
            return False
        return bool(await connection.can_read_destructive())

    def _checked(self, task: asyncio.Task[Any]) -> None:
        if self._checking is not None and self._checking[1] is task:
            self._checking = None
        if not task.cancelled():
            task.exception()  # retrieved: each waiter got it (or none waited any more)

    async def _connect(self) -> None:
        """Take a connection from the pool: one caller does, the others wait for it (and, should
        it be cancelled, try again themselves)."""
        if self._connecting is not None:
            await asyncio.shield(self._connecting)
            return
        connecting = self._connecting = asyncio.get_running_loop().create_future()
        try:
            self._connection = await self._pool.get_connection()
        except asyncio.CancelledError:
            connecting.set_result(None)  # the others find no connection, and one of them connects
            raise
        except BaseException as exc:
            connecting.set_exception(exc)
            connecting.exception()  # retrieved: each waiter raises it when it awaits
            raise
        else:
            connecting.set_result(None)
        finally:
            self._connecting = None

    async def _read(self, connection: Any, waiting: deque[tuple[asyncio.Future[Any], Orphaned | None]]) -> None:
        """Read the replies of ``connection`` while its calls (``waiting``) wait, each to its caller."""
        loop = asyncio.get_running_loop()
        try:
            while waiting:
                try:
                    reply: Any = await connection.read_response()
                except ResponseError as exc:  # this call's error reply; the connection is fine
                    reply = exc
                if not waiting:  # the connection was given up meanwhile (_lost)
                    break
                self._progress = loop.time()
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
        if isinstance(exc, RedisError):
            error: Exception = exc
        elif isinstance(exc, Exception):
            error = ConnectionError(f"the Redis connection failed: {exc!r}")
        else:
            error = ConnectionError("the Redis connection was closed")
        waiting, self._waiting = self._waiting, deque()
        self._outbox = []  # not written: their calls fail with the rest
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error)
        waiting.clear()
        self._start(self._give_back(connection))

    def _start(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task of this object's, kept until it ends (and told of: a shutdown waits for it)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._on_task is not None:
            self._on_task(task)
        return task

    async def _give_back(self, connection: Any) -> None:
        with contextlib.suppress(Exception):
            await connection.disconnect(nowait=True)
        with contextlib.suppress(KeyError):  # a pool reset meanwhile no longer counts it as in use
            await self._pool.release(connection)
