"""jobcast.worker.pipelined: calls in flight together on one kept connection, against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import select

import pytest
import uvloop
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker.connections import packed_by_hiredis
from jobcast.worker.pipelined import Pipelined

from .conftest import held_by_pause, wait_until


async def _client(redis_server: RedisProcess, name: str, *, hiredis_packed: bool = True) -> Redis:
    client = Redis.from_url(redis_server.url, decode_responses=True, client_name=name)
    return packed_by_hiredis(client) if hiredis_packed else client


async def _connections(redis: Redis, name: str) -> int:
    return [c["name"] for c in await redis.client_list()].count(name)


async def _kill(redis: Redis, name: str) -> None:
    """Close the connections named ``name`` from the server's side."""
    for client in await redis.client_list():
        if client["name"] == name:
            await redis.client_kill_filter(_id=client["id"])


@pytest.mark.parametrize("hiredis_packed", [True, False])
async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(
    redis_server: RedisProcess, redis: Redis, hiredis_packed: bool
) -> None:
    client = await _client(redis_server, "line", hiredis_packed=hiredis_packed)
    line = Pipelined(client)
    try:
        # Each caller gets the reply to its own command.
        replies = await asyncio.gather(*(line.call("INCRBY", f"pipelined:{i}", i) for i in range(1, 51)))
        assert replies == list(range(1, 51))
        # On one counter: Redis ran them one after the other, as written, each reply its own step.
        steps = await asyncio.gather(*(line.call("INCRBY", "pipelined:n", i) for i in range(1, 51)))
        order = sorted(range(50), key=lambda i: steps[i])
        assert [steps[i] for i in order] == list(itertools.accumulate(i + 1 for i in order))
        assert await _connections(redis, "line") == 1
        # An error reply fails its own call only; the calls around it are answered.
        results = await asyncio.gather(
            line.call("SET", "pipelined:s", "x"),
            line.call("INCR", "pipelined:s"),
            line.call("GET", "pipelined:s"),
            return_exceptions=True,
        )
        assert results[0] is True or results[0] == "OK"
        assert isinstance(results[1], ResponseError)
        assert results[2] == "x"
        assert line.in_flight == 0
    finally:
        await client.aclose()


async def _reads_processed(redis: Redis) -> int:
    return int((await redis.info("stats"))["total_reads_processed"])


async def test_the_calls_of_one_loop_turn_go_out_in_one_write(redis_server: RedisProcess, redis: Redis) -> None:
    """100 calls made in one turn of the loop reach Redis in one write: Redis reads them at once
    (its count of reads rises by a few, for the calls and for this test's own INFO, not by 100)."""
    client = await _client(redis_server, "line")
    line = Pipelined(client)
    try:
        assert await line.call("PING") in (True, "PONG")  # connected: the calls below need no set-up
        before = await _reads_processed(redis)
        calls = [asyncio.ensure_future(line.call("INCRBY", "pipelined:one-write", 1)) for _ in range(100)]
        assert sorted(await asyncio.gather(*calls)) == list(range(1, 101))
        reads = await _reads_processed(redis) - before
        assert reads <= 4, f"Redis read the 100 calls in {reads - 1} reads"
    finally:
        await client.aclose()


async def test_a_connection_lost_with_calls_in_flight_fails_them_and_the_next_call_reconnects(
    redis_server: RedisProcess, redis: Redis
) -> None:
    client = await _client(redis_server, "line")
    line = Pipelined(client)
    try:
        assert await line.call("PING") in (True, "PONG")
        # Two calls held by Redis (BLPOP on an empty list), then their connection is killed.
        held = [asyncio.create_task(line.call("BLPOP", "pipelined:empty", 30)) for _ in range(2)]
        await wait_until(lambda: held_by_pause(redis))
        await _kill(redis, "line")
        for task in held:
            with pytest.raises(ConnectionError):
                await task
        assert line.in_flight == 0
        assert await line.call("SET", "pipelined:after", "1") in (True, "OK")
        assert await redis.get("pipelined:after") == "1"
    finally:
        await client.aclose()


@pytest.mark.parametrize("hiredis_packed", [True, False])
async def test_an_idle_connection_the_server_closed_is_replaced_before_the_next_call(
    redis_server: RedisProcess, redis: Redis, hiredis_packed: bool
) -> None:
    """With Jobcast's quick check (hiredis_packed) and with redis-py's own, which raises at the end
    of the stream instead of answering True."""
    client = await _client(redis_server, "line", hiredis_packed=hiredis_packed)
    line = Pipelined(client)
    try:
        assert await line.call("PING") in (True, "PONG")
        await _kill(redis, "line")
        await wait_until(lambda: _gone(redis, "line"))
        # The kill reached a connection with nothing in flight: no call fails for it.
        assert await line.call("PING") in (True, "PONG")
        assert await _connections(redis, "line") == 1
    finally:
        await client.aclose()


async def _gone(redis: Redis, name: str) -> bool:
    return await _connections(redis, name) == 0


@pytest.mark.parametrize("hiredis_packed", [True, False])
def test_an_idle_check_that_runs_after_calls_went_out_leaves_the_connection_to_them(
    redis_server: RedisProcess, hiredis_packed: bool
) -> None:
    """Under uvloop, the worker's loop, which reads a socket into its stream between two loop turns.
    An idle check answers; before its callers wake and write, a late caller asks for a new one,
    which runs after their calls went out and finds a reply in the stream. That is not a connection
    the server closed: the calls still waiting (one held by BLPOP) are not failed for it, and the
    late call goes on the same connection behind them."""
    uvloop.run(_idle_check_behind_calls(redis_server, hiredis_packed))


async def _idle_check_behind_calls(redis_server: RedisProcess, hiredis_packed: bool) -> None:
    loop = asyncio.get_running_loop()
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    client = await _client(redis_server, "line", hiredis_packed=hiredis_packed)
    line = Pipelined(client)
    try:
        await redis.delete("pipelined:answered", "pipelined:late", "pipelined:empty")
        assert await line.call("PING") in (True, "PONG")
        kept = line._connection
        late_turn = loop.create_future()

        async def late() -> int:
            await late_turn
            return int(await line.call("INCR", "pipelined:late"))

        def ahead_of_the_check() -> None:
            # Queued ahead of the check's task every turn, so it runs in the turn after the check
            # answered and wakes the late caller ahead of the check's callers.
            if line._checking is not None and line._checking[1].done():
                late_turn.set_result(None)
            else:
                loop.call_soon(ahead_of_the_check)

        written = [False]

        def behind_the_callers() -> None:
            # Queued behind the callers every turn: once their calls are written, the first reply is
            # waited for on the socket itself, so uvloop reads it before the late caller's check runs.
            # The calls of a turn go out at its end (_flush), in a write task that runs in the turn
            # after: this runs once more behind that task before it waits.
            if line._connection is not kept:
                return  # given up (the failure this test is about): the assertions below say so
            if not line.in_flight or line._outbox or not written[0]:
                written[0] = bool(line.in_flight and not line._outbox)
                loop.call_soon(behind_the_callers)
                return
            socket = kept._writer.transport.get_extra_info("socket")
            assert select.select([socket.fileno()], [], [], 10)[0], "no reply from Redis in 10 s"

        late_call = asyncio.create_task(late())
        loop.call_soon(ahead_of_the_check)
        answered = asyncio.create_task(line.call("INCR", "pipelined:answered"))
        held = asyncio.create_task(line.call("BLPOP", "pipelined:empty", 30))
        loop.call_soon(behind_the_callers)
        async with asyncio.timeout(20):
            assert await answered == 1

            async def held_or_failed() -> bool:
                return held.done() or await held_by_pause(redis)

            await wait_until(held_or_failed)
            assert not held.done(), f"the held call failed: {held.exception()!r}"
            await redis.lpush("pipelined:empty", "x")
            assert await held == ["pipelined:empty", "x"]
            assert await late_call == 1
        assert line._connection is kept
        assert await _connections(redis, "line") == 1
    finally:
        await client.aclose()
        await redis.aclose()


async def test_a_reply_for_a_caller_that_went_away_goes_to_its_orphan_handler(
    redis_server: RedisProcess, redis: Redis
) -> None:
    client = await _client(redis_server, "line")
    line = Pipelined(client)
    orphaned: list[object] = []
    try:
        await redis.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
        try:
            call = asyncio.create_task(line.call("INCR", "pipelined:orphan", orphaned=orphaned.append))
            await wait_until(lambda: held_by_pause(redis))
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
        finally:
            await redis.execute_command("CLIENT", "UNPAUSE")
        assert await line.call("GET", "pipelined:orphan") == "1"  # answered after the orphaned one
        assert orphaned == [1]
    finally:
        await client.aclose()


async def test_calls_in_flight_when_the_pool_disconnects_fail_and_a_call_right_after_gets_its_own_reply(
    redis_server: RedisProcess, redis: Redis
) -> None:
    """The pool disconnects every connection (as a Sentinel failover makes it) while calls wait on
    the kept one: their replies are lost, so they fail; a call made at once after gets its own reply
    on a new connection, never one meant for another."""
    client = await _client(redis_server, "line")
    line = Pipelined(client)
    try:
        await redis.set("pipelined:k", "before")
        assert await line.call("PING") in (True, "PONG")
        await redis.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
        try:
            held = [asyncio.create_task(line.call("INCR", f"pipelined:held{i}")) for i in range(2)]
            await wait_until(lambda: held_by_pause(redis))
            # As the pool's disconnect does it, without waiting for the close: the next call comes
            # before the task reading the replies learns of it.
            await line._connection.disconnect(nowait=True)
            after = asyncio.create_task(line.call("GET", "pipelined:k"))
            for task in held:
                with pytest.raises(ConnectionError):
                    await task
        finally:
            await redis.execute_command("CLIENT", "UNPAUSE")
        assert await after == "before"
    finally:
        await client.aclose()


async def test_a_value_that_cannot_be_sent_fails_its_own_call_only(redis_server: RedisProcess, redis: Redis) -> None:
    client = await _client(redis_server, "line")
    line = Pipelined(client)
    try:
        results = await asyncio.gather(
            *(line.call("INCR", f"pipelined:v{i}") for i in range(5)),
            line.call("SET", "pipelined:none", None),
            return_exceptions=True,
        )
        assert results[:5] == [1] * 5
        assert isinstance(results[5], DataError)
        assert await line.call("GET", "pipelined:v0") == "1"
    finally:
        await client.aclose()


async def test_a_disconnect_during_the_idle_check_sends_nothing_on_the_closed_connection(
    redis_server: RedisProcess, redis: Redis
) -> None:
    """The pool drops the kept connection (nowait, as after a failover) while the callers of an idle
    spell are checking it: they go on a new connection, each call runs once, and the old connection
    object is not reconnected under them."""
    client = await _client(redis_server, "line")
    line = Pipelined(client)
    try:
        assert await line.call("PING") in (True, "PONG")
        old = line._connection
        calls = [asyncio.create_task(line.call("INCR", f"pipelined:d{i}")) for i in range(3)]
        for _ in range(2):
            await asyncio.sleep(0)  # the callers are in the idle check
        await old.disconnect(nowait=True)
        assert await asyncio.gather(*calls) == [1, 1, 1]
        assert not old.is_connected
        assert line._connection is not old
    finally:
        await client.aclose()


async def test_a_write_failing_under_a_socket_timeout_is_a_connection_error(
    redis_server: RedisProcess, redis: Redis
) -> None:
    """With ``socket_timeout`` redis-py writes in a task of its own: a pool disconnect before it ran
    must reach every caller as a Redis ConnectionError (what callers handle), then calls work again."""
    client = packed_by_hiredis(Redis.from_url(redis_server.url + "?socket_timeout=5", decode_responses=True))
    line = Pipelined(client)
    try:
        assert await line.call("PING") in (True, "PONG")
        await redis.execute_command("CLIENT", "PAUSE", 500, "WRITE")
        calls = [asyncio.create_task(line.call("INCR", f"pipelined:t{i}")) for i in range(5)]
        await asyncio.sleep(0)  # one loop turn: the calls are queued, redis-py's write tasks not yet run
        await client.connection_pool.disconnect()
        for result in await asyncio.gather(*calls, return_exceptions=True):
            assert result == 1 or isinstance(result, ConnectionError), repr(result)
        assert await line.call("PING") in (True, "PONG")
    finally:
        await client.aclose()


class SilencingRelay:
    """A TCP relay to Redis whose connections can be made to go silent: what they carry is
    swallowed, nothing is closed (a host gone without a reset, a NAT that forgot the flow). New
    connections after that are relayed as usual."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.silent: set[asyncio.StreamWriter] = set()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def silence(self) -> None:
        self.silent.update(self.writers)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self.writers.append(client_writer)

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                if client_writer not in self.silent:
                    writer.write(data)
                    await writer.drain()

        with contextlib.suppress(ConnectionResetError):
            await asyncio.gather(pump(client_reader, redis_writer), pump(redis_reader, client_writer))
        for writer in (client_writer, redis_writer):
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()


async def test_a_connection_gone_silent_is_given_up_once_no_reply_came_for_the_stall_time(
    redis_server: RedisProcess, redis: Redis
) -> None:
    """Calls time out on a silent connection (their callers' own deadlines); once nothing has been
    read for ``stall_s``, the next call gives it up (its waiting calls fail) and runs on a new one."""
    relay = SilencingRelay(redis_server.port)
    client = packed_by_hiredis(Redis.from_url(await relay.start(), decode_responses=True))
    line = Pipelined(client, stall_s=0.5)
    try:
        assert await line.call("PING") in (True, "PONG")
        relay.silence()
        held = asyncio.create_task(line.call("INCR", "pipelined:silent"))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await line.call("PING")
        await asyncio.sleep(0.6)  # the fault itself: time passes with no reply
        async with asyncio.timeout(10):  # bounded: without the stall rule these would wait for ever
            assert await line.call("SET", "pipelined:after-silence", "1") in (True, "OK")
            with pytest.raises(RedisTimeoutError):
                await held
        assert await redis.get("pipelined:after-silence") == "1"
        assert line.in_flight == 0
    finally:
        await client.aclose()
        await relay.close()
