"""jobcast.worker.pipelined: calls in flight together on one kept connection, against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, ResponseError

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker.connections import packed_by_hiredis
from jobcast.worker.pipelined import Pipelined

from .conftest import wait_until


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


async def _blocked(redis: Redis) -> bool:
    return int((await redis.info("clients"))["blocked_clients"]) >= 1


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


async def test_a_connection_lost_with_calls_in_flight_fails_them_and_the_next_call_reconnects(
    redis_server: RedisProcess, redis: Redis
) -> None:
    client = await _client(redis_server, "line")
    line = Pipelined(client)
    try:
        assert await line.call("PING") in (True, "PONG")
        # Two calls held by Redis (BLPOP on an empty list), then their connection is killed.
        held = [asyncio.create_task(line.call("BLPOP", "pipelined:empty", 30)) for _ in range(2)]
        await wait_until(lambda: _blocked(redis))
        await _kill(redis, "line")
        for task in held:
            with pytest.raises(ConnectionError):
                await task
        assert line.in_flight == 0
        assert await line.call("SET", "pipelined:after", "1") in (True, "OK")
        assert await redis.get("pipelined:after") == "1"
    finally:
        await client.aclose()


async def test_an_idle_connection_the_server_closed_is_replaced_before_the_next_call(
    redis_server: RedisProcess, redis: Redis
) -> None:
    client = await _client(redis_server, "line")
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
            await wait_until(lambda: _blocked(redis))
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
            await wait_until(lambda: _blocked(redis))
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
