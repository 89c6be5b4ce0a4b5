"""Jobcast's Redis clients pack their commands with hiredis (redis-py's asyncio connection packs them
in Python even with hiredis installed): every client a Jobcast process makes, checked on the clients
themselves and against a real Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis._parsers.hiredis as hiredis_parser
import redis.asyncio.connection as asyncio_connection
from redis.asyncio import Redis
from redis.exceptions import DataError

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker.connections import REDIS_INTERNALS, HiredisPacking, arq_pool_for, packed_by_hiredis, redis_for

from .conftest import STATE_KEY, ServerHandle, wait_until
from .seams import assert_internals_unchanged, source_fingerprint

#: sha256 (first 16 hex digits) of the source of each redis-py internal, as of redis 5.3.1.
FINGERPRINTS = {
    "_AsyncHiredisParser.on_connect": "e543524560bc72da",
    "_AsyncHiredisParser.can_read_destructive": "01f1ed43a0c89df5",
    "AbstractConnection.can_read_destructive": "a9b53a9cd2de5db1",
    "ConnectionPool.ensure_connection": "e2790e7163da5032",
}

SENTINEL_URL = "redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster"


def packs_with_hiredis(client: object) -> bool:
    return issubclass(client.connection_pool.connection_class, HiredisPacking)  # type: ignore[attr-defined]


async def test_every_client_of_a_running_server_packs_with_hiredis(server: ServerHandle) -> None:
    cells = server.server.lifespan.state[STATE_KEY].cells
    clients = [client for cell in cells for client in (cell.redis, cell.store.redis, cell.stream_slots.redis)]
    assert clients and all(packs_with_hiredis(client) for client in clients)
    pool = cells[0].redis.connection_pool
    in_use = [*pool._available_connections, *pool._in_use_connections]
    assert in_use and all(isinstance(conn, HiredisPacking) for conn in in_use)  # the hub's one too


async def test_clients_of_a_sentinel_managed_cell_pack_with_hiredis() -> None:
    primary, pool = redis_for(SENTINEL_URL), arq_pool_for(SENTINEL_URL)
    try:
        assert packs_with_hiredis(primary) and packs_with_hiredis(pool)
    finally:
        await primary.aclose()
        assert pool is not None
        await pool.aclose()


async def test_commands_packed_by_hiredis_mean_what_redis_py_would_send(redis_server: RedisProcess) -> None:
    client = redis_for(redis_server.url)
    plain = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert packs_with_hiredis(client) and packed_by_hiredis(client) is client
        conn = client.connection_pool.make_connection()
        python = plain.connection_pool.make_connection()
        for args in [("SET", "k", "é\x00"), ("EVALSHA", "ab", 2, "k1", "k2", -3, 0.1, 1e20), ("CONFIG GET", "x")]:
            assert b"".join(conn.pack_command(*args)) == b"".join(python.pack_command(*args))
        commands = [("SET", "a", 1), ("GET", "a")]
        assert b"".join(conn.pack_commands(commands)) == b"".join(python.pack_commands(commands))
        with pytest.raises(DataError):
            conn.pack_command("SET", "k", None)
        # Against Redis: a command, a spaced one, a pipeline, a script.
        await client.set("k", "é")
        assert await client.get("k") == "é"
        assert await client.execute_command("CONFIG GET", "maxmemory-policy")
        async with client.pipeline(transaction=True) as pipe:
            pipe.incr("n").incrby("n", 41)
            assert await pipe.execute() == [1, 42]
        assert await client.eval("return ARGV[1] .. KEYS[1]", 1, "k", 7) == "7k"
        assert await asyncio.gather(*(client.incr("c") for _ in range(10)))
    finally:
        await client.aclose()
        await plain.aclose()


def fingerprint(name: str) -> str:
    return source_fingerprint(hiredis_parser if name.startswith("_AsyncHiredisParser") else asyncio_connection, name)


def test_every_redis_py_internal_the_quick_check_relies_on_is_unchanged() -> None:
    assert_internals_unchanged(
        "redis", REDIS_INTERNALS, FINGERPRINTS, fingerprint, "worker/connections.py",
        "what HiredisPacking.can_read_destructive does with it",
    )  # fmt: skip


async def test_a_pooled_connection_is_checked_without_waiting_and_refused_when_not_clean(
    redis_server: RedisProcess,
) -> None:
    """The pool's check of a connection it hands out answers at once (no loop turn), and still
    catches what redis-py's check catches: a reply nobody read, and a connection the server closed."""
    client = redis_for(redis_server.url)
    other = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await client.set("k", "v")
        pool = client.connection_pool
        conn = await pool.get_connection()
        check = conn.can_read_destructive()
        with pytest.raises(StopIteration) as answered:
            check.send(None)  # a clean connection: answered without suspending
        assert answered.value.value is False
        # A reply left unread: the next command must not take it for its own.
        await conn.send_command("ECHO", "stale")

        async def buffered() -> bool:
            return bool(conn._parser._stream._buffer)  # type: ignore[union-attr]

        await wait_until(buffered)
        assert await conn.can_read_destructive()
        await pool.release(conn)
        assert await client.get("k") == "v"
        # The server closes the pooled connection: the next command reconnects.
        conn = await pool.get_connection()
        await conn.send_command("CLIENT", "ID")
        client_id = await conn.read_response()
        await pool.release(conn)
        await other.client_kill_filter(_id=client_id)

        async def closed() -> bool:
            return bool(await conn.can_read_destructive())

        await wait_until(closed)
        assert await client.get("k") == "v"
    finally:
        await client.aclose()
        await other.aclose()


async def test_bytes_waiting_on_a_connection_are_told_without_reading_them(redis_server: RedisProcess) -> None:
    """``has_buffered_data``: what the hub asks before it looks for more of a burst (a read that finds
    nothing costs a timer, a cancelled read and a loop turn). It reads nothing: the messages are all
    still there for the reads after it."""
    client = redis_for(redis_server.url)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe("buffered")
        assert (await pubsub.get_message(timeout=5) or {}).get("type") == "subscribe"
        connection = pubsub.connection
        assert not connection.has_buffered_data()
        async with client.pipeline(transaction=False) as pipe:  # one write: Redis answers both in one
            pipe.publish("buffered", "one").publish("buffered", "two")
            await pipe.execute()

        async def arrived() -> bool:
            return bool(connection.has_buffered_data())

        await wait_until(arrived)
        assert connection.has_buffered_data()  # asked twice: nothing was read
        assert (await pubsub.get_message(timeout=0) or {}).get("data") == "one"
        assert connection.has_buffered_data()  # the second, left in hiredis's reader
        assert (await pubsub.get_message(timeout=0) or {}).get("data") == "two"
        assert not connection.has_buffered_data()
    finally:
        await pubsub.aclose()
        await client.aclose()
