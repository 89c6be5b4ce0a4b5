"""Redis clients for a cell's URL: a plain Redis, or a primary that Redis Sentinel manages.

A cell URL is either what redis-py reads (``redis://``, ``rediss://``, ``unix://``) or names the
sentinels that watch the cell's primary::

    redis+sentinel://[[user]:password@]host1:26379[,host2:26379...]/<service name>[/<db>][?replica_acks=<n>]

the form of the ``redis-sentinel-url`` package and of Django/Celery setups (kombu spells it
``sentinel://``, one URL per sentinel): the hosts are the *sentinels*, the path is the name the
sentinels know the primary by (``sentinel monitor <name> ...``), then the database. The user and
password are the data nodes' (the primary's and replicas'); the sentinels themselves are asked
without credentials.

:func:`redis_for` and :func:`arq_settings_for` build the clients every process uses (the store's, the
hub's, arq's). A Sentinel client asks a sentinel for the primary's address each time it opens a
connection. What redis-py does not do is let go of the connections it already holds: after a
failover they stay on the old primary, which keeps accepting writes (that will be thrown away) until
Sentinel demotes it, seconds later. :func:`follow_primary` closes that gap: it listens for Sentinel's
``+switch-master`` and drops every connection of the process's clients at once, so the next command
(and the hub's and the doorbell's reconnect) goes to the new primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import hiredis
from arq.connections import ArqRedis, RedisSettings
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.exceptions import DataError, RedisError

logger = logging.getLogger(__name__)

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
#: The options of every Jobcast client (text replies, reconnects on its own).
CLIENT_OPTIONS: dict[str, object] = {
    "decode_responses": True,
    "socket_connect_timeout": 5,
    "health_check_interval": 30,
    "retry_on_timeout": True,
}
#: What a client of a sentinel itself is given (it answers address queries and pub/sub only).
SENTINEL_OPTIONS: dict[str, object] = {"socket_connect_timeout": 5, "socket_timeout": 5, "decode_responses": True}
RECONNECT_MAX_S = 5.0
#: How long a submission waits for a replica of a Sentinel-managed cell to confirm its job.
REPLICA_ACK_TIMEOUT_MS = 1000


class NotReplicated(RedisError):
    """The primary took a write that no replica confirmed in time: a failover could still lose it."""


class CellUrlError(ValueError):
    """A ``redis+sentinel://`` URL that cannot be read (the message says which part and how to fix it)."""


@dataclass(frozen=True)
class SentinelAddress:
    """A ``redis+sentinel://`` URL, read. ``repr`` hides the password."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    replica_acks: int = 1


def is_sentinel_url(url: str) -> bool:
    return url.lower().startswith(SENTINEL_SCHEME + "://")


def parse_sentinel_url(url: str) -> SentinelAddress:
    """Read a ``redis+sentinel://`` URL (see the module's docstring)."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() != SENTINEL_SCHEME:
        raise CellUrlError(f"not a {SENTINEL_SCHEME}:// URL")
    rest, _, query = rest.split("#", 1)[0].partition("?")
    acks = 1
    for name, _, value in (pair.partition("=") for pair in query.split("&") if pair):
        if name != "replica_acks" or not value.isdigit():
            raise CellUrlError(f"{SENTINEL_SCHEME}:// URL: unknown query parameter {name!r} (only replica_acks=<n>)")
        acks = int(value)
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = tuple(_host_port(part) for part in hosts.split(",") if part)
    if not sentinels:
        raise CellUrlError(f"{SENTINEL_SCHEME}:// URL names no sentinel: list them as host1:26379,host2:26379")
    parts = [unquote(p) for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise CellUrlError(
            f"{SENTINEL_SCHEME}:// URL must end with /<service name> or /<service name>/<db>: the name the "
            "sentinels monitor the primary by"
        )
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise CellUrlError(f"{SENTINEL_SCHEME}:// URL: the database after the service name must be a number")
        db = int(parts[1])
    return SentinelAddress(sentinels, parts[0], db, username, password, acks)


def _host_port(part: str) -> tuple[str, int]:
    if part.startswith("["):  # [ipv6]:port
        host, _, port = part[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
    if not host or (port and not port.isdigit()):
        raise CellUrlError(f"{SENTINEL_SCHEME}:// URL: {part!r} is not host:port")
    return host, int(port) if port else DEFAULT_SENTINEL_PORT


#: The redis-py internals :class:`HiredisPacking` relies on, and how (tests/test_connections.py
#: fingerprints each: an upgrade that changes one fails loudly).
REDIS_INTERNALS = {
    "_AsyncHiredisParser.on_connect": "keeps the connection's StreamReader as _stream and a hiredis Reader "
    "whose gets() answers NOT_ENOUGH_DATA (and has_data() whether bytes are left in it) as _reader; sets "
    "_connected",
    "_AsyncHiredisParser.can_read_destructive": "what the quick check replaces: a reply already parsed, "
    "else a read of the stream under a zero timeout",
    "AbstractConnection.can_read_destructive": "calls the parser's, turns an OSError into a ConnectionError",
    "ConnectionPool.ensure_connection": "under the pool's lock, for every connection handed out: True "
    "(data waiting, or the connection closed) means reconnect",
}


class HiredisPacking:
    """Commands packed by hiredis (C), not by redis-py's asyncio connection, which packs in Python
    whether hiredis is installed or not (its parser is hiredis's; its packer is not): a mixin of
    every connection class of Jobcast's clients (:func:`packed_by_hiredis`).

    It also checks a connection the pool hands out without waiting: redis-py's check reads the
    socket under a zero timeout, which costs every command a timer, a cancelled read and a turn of
    the event loop, with the pool's lock held (so concurrent commands take connections one loop turn
    at a time; redis-py issues #3692, #3842). What that read could find is already in the
    connection's stream buffer (the transport hands data over as it arrives): bytes waiting, the
    end of the stream or its error. :data:`REDIS_INTERNALS` lists what this relies on."""

    async def can_read_destructive(self) -> bool:
        hiredis_parts = self._hiredis_parts()
        if hiredis_parts is None:
            return bool(await super().can_read_destructive())  # type: ignore[misc]
        reader, stream = hiredis_parts
        if reader.gets() is not NOT_ENOUGH_DATA:
            return True  # a reply nobody read
        return bool(stream._buffer) or stream.at_eof() or stream.exception() is not None

    def has_buffered_data(self) -> bool:
        """Whether bytes have arrived that nobody has read yet (in the connection's stream, or left
        in hiredis's reader after the last reply): a read now finds them without waiting. Not
        destructive. True when this cannot be told (another parser, not connected): then a read
        must find out."""
        hiredis_parts = self._hiredis_parts()
        if hiredis_parts is None:
            return True
        reader, stream = hiredis_parts
        return bool(stream._buffer) or bool(reader.has_data())

    def _hiredis_parts(self) -> tuple[Any, Any] | None:
        """The connected hiredis parser's reader and the connection's stream (None otherwise)."""
        parser: Any = getattr(self, "_parser", None)
        stream = getattr(parser, "_stream", None)
        if type(parser) is not _AsyncHiredisParser or not parser._connected or stream is None:
            return None
        return parser._reader, stream

    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py's: a command name with spaces ("CONFIG GET") goes as several arguments.
        if isinstance(args[0], str):
            args = tuple(args[0].encode().split()) + args[1:]
        elif b" " in args[0]:
            args = tuple(args[0].split()) + args[1:]
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # redis-py's error for a value it cannot send (None, bool, ...)
            raise DataError(str(exc)) from None

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(self.pack_command(*command)[0] for command in commands)]


_packed: dict[type[Any], type[Any]] = {}
_Client = TypeVar("_Client")


def packed_by_hiredis(client: _Client) -> _Client:
    """``client`` (a redis-py asyncio client, arq's too), its connections now packing commands with
    hiredis; before it has made any."""
    pool = client.connection_pool  # type: ignore[attr-defined]
    base = pool.connection_class
    if not issubclass(base, HiredisPacking):
        if base not in _packed:
            _packed[base] = type(f"Hiredis{base.__name__}", (HiredisPacking, base), {})
        pool.connection_class = _packed[base]
    return client


class _Connection(SentinelManagedConnection):
    """A connection to a Sentinel-managed primary that closes at once: the pool's ``disconnect``
    after a failover then leaves no moment in which another task could write to a half-closed
    transport (uvloop raises RuntimeError there, not a ConnectionError); a task that uses it next
    reconnects, through the sentinels, to the new primary."""

    async def disconnect(self, nowait: bool = False) -> None:
        await super().disconnect(nowait=True)


class _PrimaryPool(SentinelConnectionPool):
    """redis-py's pool of a Sentinel-managed primary, which also closes the clients of the
    sentinels when the pool is closed (redis-py leaves them to the garbage collector)."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the pool is closed (a client closes its pool this way)
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()

    async def drop(self) -> None:
        """Close the connections to the primary (the sentinels' stay: one may be answering now)."""
        await super().disconnect(inuse_connections=True)


def redacted(url: str) -> str:
    """``url`` without its password (a Redis URL may carry one, a ``redis+sentinel://`` one too)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def redis_for(url: str) -> Redis:
    """A Redis client for a cell URL, as every Jobcast process uses it."""
    if not is_sentinel_url(url):
        client: Redis = Redis.from_url(url, **CLIENT_OPTIONS)  # type: ignore[arg-type]
        return packed_by_hiredis(client)
    address = parse_sentinel_url(url)
    primary: Redis = _primary_for(address, Redis, **CLIENT_OPTIONS)
    return primary


def arq_pool_for(url: str) -> ArqRedis | None:
    """arq's pool for a Sentinel-managed cell, made like :func:`redis_for`'s so that
    :func:`follow_primary` can move it (None for a plain URL: arq makes its pool from
    :func:`arq_settings_for`)."""
    if not is_sentinel_url(url):
        return None
    pool: ArqRedis = _primary_for(parse_sentinel_url(url), ArqRedis, socket_connect_timeout=5)
    return pool


def _primary_for(address: SentinelAddress, redis_class: type[Any], **options: Any) -> Any:
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(address.sentinels), sentinel_kwargs=dict(SENTINEL_OPTIONS), **options
    )
    return packed_by_hiredis(
        sentinel.master_for(
            address.service,
            redis_class=redis_class,
            connection_pool_class=_PrimaryPool,
            connection_class=_Connection,
            db=address.db,
            username=address.username,
            password=address.password,
        )
    )


def replica_acks(url: str) -> int:
    """Replicas that must confirm a new job before its 202 (``WAIT``): for a Sentinel-managed cell,
    whose failover would otherwise lose submissions already acknowledged, ``?replica_acks=`` of its
    URL (default 1); none for a plain URL. Sentinel promotes the replica it finds most up to date,
    which with several replicas need not be the one that confirmed: set it to the number of replicas
    for every acknowledged job to survive any one failover (then a replica down means 503s)."""
    if not is_sentinel_url(url):
        return 0
    return parse_sentinel_url(url).replica_acks


def arq_settings_for(url: str) -> RedisSettings:
    """arq's settings for a cell URL (arq asks the sentinels itself when ``sentinel=True``)."""
    if not is_sentinel_url(url):
        return RedisSettings.from_dsn(url)
    address = parse_sentinel_url(url)
    return RedisSettings(
        host=list(address.sentinels),
        sentinel=True,
        sentinel_master=address.service,
        database=address.db,
        username=address.username,
        password=address.password,
    )


async def follow_primary(url: str, clients: Sequence[Redis]) -> None:
    """Forever (a supervised task of its process): when the sentinels of ``url`` switch the cell's
    primary, drop every connection of ``clients``, so that each reconnects through the sentinels to
    the new one. Returns at once for a plain URL. Tries the sentinels in turn while one is away."""
    if not is_sentinel_url(url):
        return
    address = parse_sentinel_url(url)
    known: tuple[str, int] | None = None
    delay, turn = 0.1, 0
    while True:
        host, port = address.sentinels[turn % len(address.sentinels)]
        # No socket timeout: the subscription is quiet until a failover.
        sentinel = packed_by_hiredis(Redis(host=host, port=port, socket_connect_timeout=5, decode_responses=True))
        pubsub = sentinel.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe("+switch-master")
            # A switch while we were not subscribed is seen here: the address is not the one known.
            current = await sentinel.sentinel_get_master_addr_by_name(address.service)  # type: ignore[no-untyped-call]
            if current is not None:
                current = (str(current[0]), int(current[1]))
                if known is not None and current != known:
                    await _drop(address.service, clients, f"{known} -> {current}")
                known = current
            delay = 0.1
            async for message in pubsub.listen():
                name, *addresses = str(message["data"]).split()
                if name == address.service and len(addresses) == 4:
                    known = (addresses[2], int(addresses[3]))
                    await _drop(address.service, clients, " ".join(addresses))
        except (RedisError, OSError) as exc:
            logger.warning("sentinel %s:%s unreachable (%s); trying the next in %.1fs", host, port, exc, delay)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(RedisError, OSError):
                await sentinel.aclose()
        turn += 1
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX_S)


async def _drop(service: str, clients: Sequence[Redis], change: str) -> None:
    logger.warning("sentinel: primary of %s moved (%s); reconnecting", service, change)
    for client in clients:
        pool = client.connection_pool
        if isinstance(pool, _PrimaryPool):  # else a plain URL's pool: nothing to move
            await pool.drop()
