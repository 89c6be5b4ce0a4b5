"""Limits: the per-tenant submission rate, and caps on open event streams.

Submission rate — enforced in Redis so it holds across server processes.

``JOBCAST_SUBMIT_RATE=N/S`` allows N submissions per S seconds per tenant, as a burst of up to N
that refills evenly (GCRA, see ``worker/lua/ratelimit.lua``). Answers carry the IETF
``RateLimit-Policy`` / ``RateLimit`` headers (draft-ietf-httpapi-ratelimit-headers), on successes
too, so clients can pace themselves; a refusal is a 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from jobcast.worker import schema
from jobcast.worker.models import TERMINAL, Audience

from .problems import Problem, TooManyRequests, Unavailable

logger = logging.getLogger(__name__)

POLICY = "submit"
TERMINAL_STATUSES = [status.value for status in TERMINAL]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    headers: dict[str, str]
    retry_after_s: int = 0


class RateLimiter:
    def __init__(self, redis: Redis, rate: tuple[int, float], *, cell: int = 0) -> None:
        self._cell = cell
        self.limit, self.window_s = rate
        # Whole milliseconds keep the state an exact integer in Redis.
        self._interval_ms = max(1, round(self.window_s * 1000 / self.limit))
        self._tau_ms = self._interval_ms * (self.limit - 1)
        self._script = schema.RateLimitScript(redis)
        self._policy = f'"{POLICY}";q={self.limit};w={math.ceil(self.window_s)}'

    async def take(self, tenant: str) -> Decision:
        allowed, remaining, retry_ms, reset_ms = await self._script(
            schema.rate_key(tenant, cell=self._cell), self._interval_ms, self._tau_ms
        )
        headers = {
            "RateLimit-Policy": self._policy,
            "RateLimit": f'"{POLICY}";r={remaining};t={math.ceil(reset_ms / 1000)}',
        }
        if allowed:
            return Decision(True, headers)
        retry_after = max(1, math.ceil(retry_ms / 1000))
        headers["Retry-After"] = str(retry_after)
        return Decision(False, headers, retry_after)


class StreamsFull(Exception):
    """No stream slot: ``scope`` is "process" (this server is full) or "tenant" (the tenant is)."""

    def __init__(self, scope: str, cap: int) -> None:
        super().__init__(scope)
        self.scope = scope
        self.cap = cap


def streams_full_problem(full: StreamsFull, *, what: str, tenant_hint: str, process_hint: str = "") -> Problem:
    """The answer to a connection refused at a stream cap: 429 at the tenant's (Retry-After), 503
    at this process's. ``what`` names what the cap counts ("event streams and sockets", ...)."""
    if full.scope == "tenant":
        return TooManyRequests(
            f"This tenant already has {full.cap} {what} open, its limit. {tenant_hint}",
            headers={"Retry-After": "5"},
        )
    return Unavailable(f"This server has {full.cap} {what} open, its limit; retry shortly{process_hint}.")


class ProcessStreams:
    """This process's count of open streams and held long-polls, against its cap: one for all cells.

    Taken by :meth:`reserve`, which checks and counts without awaiting anything: concurrent
    connects cannot all pass a check made before any of them counted."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.count = 0

    def reserve(self) -> None:
        """Count one more stream in this process; raises :class:`StreamsFull` at the cap."""
        if self.count >= self.cap:
            raise StreamsFull("process", self.cap)
        self.count += 1

    def unreserve(self) -> None:
        self.count -= 1


#: What every slot id of this process starts with (new each start), and its count.
_SLOT_PREFIX = secrets.token_hex(8)
_slot_numbers = itertools.count()


class StreamSlots:
    """Caps on open event streams, and on held long-polls (``GET /jobs/{id}?wait=``, which hold a
    connection the same way): per server process (in memory, no Redis, shared by the cells'
    StreamSlots: :class:`ProcessStreams`) and per tenant (in the Redis of one cell, so the cap holds
    across processes; a stream of a job is counted in the job's cell, which is its tenant's unless
    the tenant was moved since).

    The process cap is taken by :meth:`reserve`. The tenant's slot
    is taken by the script that opens a stream (``worker/lua/streams.lua``, in the same round trip
    as the log read): each open stream holds a member of the tenant's zset whose score is an
    expiry, and this process pushes its members' expiry forward every ``REFRESH_S`` (one ZADD per
    tenant), so the slots of a process that died free themselves within ``TTL_S``.
    """

    TTL_S = 60.0
    REFRESH_S = 20.0
    #: How long the slots let go of gather before one pipeline removes them from Redis: streams end
    #: hundreds a second under load (a job's stream at its terminal event), and a removal each is a
    #: round trip each. A slot let go of counts against its tenant's cap this much longer.
    REMOVE_AFTER_S = 0.1

    def __init__(
        self,
        redis: Redis,
        *,
        process: ProcessStreams,
        per_tenant: int,
        cell: int = 0,
        log_max: dict[Audience, int],
    ) -> None:
        self.redis = redis
        #: The logs' caps (``JOBCAST_JOB_LOG_MAX``, ``JOBCAST_TENANT_LOG_MAX``): on Redis 6, a log at
        #: its cap counts as trimmed.
        self.log_max = log_max
        #: The cell this Redis is (its keys carry its tag).
        self.cell = cell
        self.process = process
        self.per_tenant = per_tenant
        self._open: dict[str, set[str]] = {}
        #: Tenant slots let go of (release_soon) and not yet removed from Redis; who removes them.
        self._leaving: list[tuple[str, str]] = []
        self._remover: asyncio.Task[None] | None = None
        #: Shutting down: slots let go of are no longer removed (:meth:`settle`).
        self._settled = False
        #: Opens a stream: takes the tenant's slot in the round trip that reads the log.
        self.open_script = schema.StreamOpenScript(redis, release=self._remove_soon)

    @property
    def open_streams(self) -> int:
        """Open in this process, all cells."""
        return self.process.count

    def reserve(self) -> None:
        self.process.reserve()

    def unreserve(self) -> None:
        self.process.unreserve()

    @staticmethod
    def new_slot() -> str:
        """A slot id no other stream of any process holds: this process's random prefix (8 bytes),
        then a count (no system call per stream)."""
        return f"{_SLOT_PREFIX}{next(_slot_numbers):x}"

    def opened(self, tenant: str, slot: str) -> None:
        """The tenant's slot ``slot`` was taken in Redis: keep its expiry fresh until released."""
        if self.per_tenant:
            self._open.setdefault(tenant, set()).add(slot)

    async def open_log(
        self,
        audience: Audience,
        key: str,
        tenant: str,
        last_id: str | None,
        *,
        page: int,
        slot: str | None = None,
    ) -> tuple[str, str, list[Any]]:
        """The one check of where a stream resumes (``worker/lua/streams.lua``), for SSE streams and
        WebSocket subscriptions alike: the job, ``last_id`` against the log (trimmed past it, lost by
        a failover, ahead of it, or nothing after it for a finished job), then the first ``page``
        events after it (without ``last_id``: a job's from its start, the tenant's log's tip only).
        ``slot``: also take one of the tenant's stream slots (none is taken without it).
        (outcome, tip, entries): see :func:`jobcast.resumes.refusal` for what an outcome tells the
        client."""
        cell = self.cell
        log = schema.job_log_key(key, cell=cell) if audience == "job" else schema.tenant_log_key(key, cell=cell)
        keys = [
            log,
            schema.streams_key(tenant, cell=cell),
            schema.job_key(key, cell=cell) if audience == "job" else log,
            schema.in_cell(schema.EPOCH, cell),
        ]
        now_ms, ttl_ms = int(time.time() * 1000), int(self.TTL_S * 1000)
        cap = self.per_tenant if slot is not None else 0
        mode = "replay" if audience == "job" else "live"
        args: list[str | int] = [audience, tenant, last_id or "", mode, page, now_ms, ttl_ms, cap, slot or ""]
        try:
            return await self.open_script(keys, [*args, self.log_max[audience], *TERMINAL_STATUSES])
        except BaseException:
            # Cancelled or failed without an outcome: the script may still have taken the slot (its
            # reply lost, or not waited for). Removed from Redis (a no-op if it was not taken)
            # rather than left to count against the tenant's cap until it expires.
            if cap:
                self._remove_soon(tenant, str(slot))
            raise

    async def acquire(self, tenant: str) -> str:
        """A place for a held long-poll: this process's cap, then the tenant's, taken by the same
        script that opens a tenant feed (live, so it reads nothing but the log's tip); its slot id.
        Raises :class:`StreamsFull`; :meth:`release` gives the place back."""
        self.reserve()
        slot = self.new_slot()
        try:
            if self.per_tenant:
                outcome, _, _ = await self.open_log("tenant", tenant, tenant, None, page=0, slot=slot)
                if outcome == "full":
                    raise StreamsFull("tenant", self.per_tenant)
        except BaseException:
            self.unreserve()
            raise
        self.opened(tenant, slot)
        return slot

    async def release(self, tenant: str, slot: str) -> None:
        """The stream that reserved a place and opened ``slot`` ended."""
        if self._forget(tenant, slot):
            with contextlib.suppress(RedisError, OSError):  # it expires by itself otherwise
                await self.redis.zrem(schema.streams_key(tenant, cell=self.cell), slot)

    def release_soon(self, tenant: str, slot: str) -> None:
        """:meth:`release`, from a callback that cannot wait: the process's place is free now, the
        tenant's slot is removed from Redis within ``REMOVE_AFTER_S``, together with the others let
        go meanwhile (one pipeline for a whole reconnect storm, not a task per stream)."""
        if self._forget(tenant, slot):
            self._remove_soon(tenant, slot)

    def _remove_soon(self, tenant: str, slot: str) -> None:
        """Remove the tenant's slot ``slot`` from Redis shortly (idempotent), with the others."""
        if not self._settled:
            self._leaving.append((tenant, slot))
            if self._remover is None:
                self._remover = asyncio.get_running_loop().create_task(self._remove_leaving())

    def _forget(self, tenant: str, slot: str) -> bool:
        """Give the process's place back; whether ``slot`` was a tenant slot held here."""
        self.unreserve()
        slots = self._open.get(tenant)
        if slots is None or slot not in slots:
            return False
        slots.discard(slot)
        if not slots:
            del self._open[tenant]
        return True

    async def settle(self, timeout: float) -> None:
        """Before the Redis client is closed: remove the slots let go of so far (within ``timeout``
        seconds; cancelled after that), and none from now on (they expire by themselves within
        ``TTL_S``). A removal left running would take a new connection of a closed client."""
        self._settled = True
        remover = self._remover
        if remover is not None:
            _, pending = await asyncio.wait([remover], timeout=timeout)
            if pending:
                remover.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await remover

    async def _remove_leaving(self) -> None:
        try:
            await asyncio.sleep(self.REMOVE_AFTER_S)  # the others let go of meanwhile go in the same pipeline
            while self._leaving:
                leaving, self._leaving = self._leaving, []
                with contextlib.suppress(RedisError, OSError):  # they expire by themselves otherwise
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for tenant, slot in leaving:
                            pipe.zrem(schema.streams_key(tenant, cell=self.cell), slot)
                        await pipe.execute()
        finally:
            self._remover = None

    async def refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.REFRESH_S)
            if not self.per_tenant:
                continue
            expiry = int((time.time() + self.TTL_S) * 1000)
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for tenant, slots in list(self._open.items()):
                        pipe.zadd(schema.streams_key(tenant, cell=self.cell), dict.fromkeys(slots, expiry), xx=True)
                        pipe.pexpire(schema.streams_key(tenant, cell=self.cell), int(self.TTL_S * 1000))
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                logger.warning("stream slots not refreshed: %s", exc)
