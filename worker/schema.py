"""Every Redis key, channel and Lua script Jobcast uses, named in this one place.

Layout (``{id}`` is a job id, ``{rid}`` an arq run id ``{id}.{run}``, ``{t}`` a tenant):

=====================================  =======  ===============================================
key                                    type     holds
=====================================  =======  ===============================================
``jobcast:job:{id}``                   hash     the job record (status, progress, history, ...)
``jobcast:log:job:{id}``               stream   the job's event log (capped)
``jobcast:log:tenant:{t}``             stream   the tenant's event log (capped)
``jobcast:jobs:{t}``                   zset     the tenant's job ids, all scores 0 (ids sort by time)
``jobcast:jobs:{t}:status:{s}``        zset     ... with status ``s``
``jobcast:jobs:{t}:type:{type}``       zset     ... of job type ``type``
``jobcast:idem:{t}:{sha256(key)}``     string   ``{id}|{sha256(body)}`` for Idempotency-Key, 24 h
``jobcast:finished``                   zset     finished job ids scored by finish time (ms): the archiver's queue
``jobcast:running``                    zset     processing job ids scored by lease deadline (ms)
``jobcast:scheduled``                  zset     run ids waiting for a retry, scored by due time (ms)
``jobcast:rate:submit:{t}``            string   the tenant's submission rate limiter (GCRA state)
``jobcast:tenant-running:{t}``         set      the tenant's processing job ids (per-tenant concurrency)
``jobcast:tenant-waiting:{t}``         zset     run ids parked until the tenant has a free slot
``jobcast:waiting-tenants``            set      tenants with parked runs
``jobcast:queued-count``               string   how many jobs are queued (capacity check, metrics)
``jobcast:apikeys``                    hash     key id -> tenant, label, time, SHA-256 of the key
``jobcast:streams:{t}``                zset     the tenant's open event streams, scored by expiry (ms)
``arq:queue``, ``arq:job:{rid}``, ...  arq's    the run being executed (arq's own keys)
``jobcast:delivery:{wid}``             hash     a webhook delivery (``{wid}`` is its webhook-id)
``jobcast:delivery:{wid}:attempts``    list     its attempts, JSON each, oldest first (capped)
``jobcast:deliveries:{id}``            list     the webhook-ids of a job's deliveries, in order
``jobcast:dead-letters:{t}``           zset     the tenant's dead deliveries, scored by death (ms)
``jobcast:webhook-stats``              hash     attempt outcome -> count, since the start
``jobcast:stats``                      hash     job counters and histogram buckets for /metrics
``jobcast:dead-letter-tenants``        set      tenants that have (had) dead letters
``jobcast:workers``                    zset     worker ids scored by their last heartbeat (ms)
``jobcast:webhooks``                   zset     arq's queue of delivery attempts (``{wid}.{seq}``)
``jobcast:destination:{d}``            hash     destination ``{d}``'s rate state (``tat``) and pause
``jobcast:destination-slots:{d}``      zset     its attempts in flight (``{wid}.{seq}``), by expiry (ms)
``jobcast:destination-waiting:{d}``    zset     deliveries waiting for one of its slots
``jobcast:destination-health:{t}:{d}`` hash     its health for tenant ``t`` (failures, last success, state)
``jobcast:destinations:{t}``           zset     the tenant's destinations, by last use (ms)
``jobcast:disabled-destinations``      hash     ``{t} {d}`` -> when it was disabled (ms)
``jobcast:webhook-waits``              hash     deferred attempts and their waits, by reason
``jobcast:alerts``                     hash     operator alert state, by ``{kind}|{tenant}``
``jobcast:alerts:lock``                string   which server process evaluates alerts this round
=====================================  =======  ===============================================

Channels: ``jobcast:events`` (every event; the server's hub is its only subscriber per process),
``jobcast:doorbell`` (a run was queued: idle workers poll now), ``jobcast:control`` (``cancel {id}``),
``jobcast:webhooks:doorbell`` (a delivery attempt was queued).

The Lua script computes keys from a job's tenant and status, which it reads inside the script; that
is fine on one Redis (with replicas or Sentinel) and is why Redis Cluster is not supported.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from arq.constants import (
    default_queue_name,
    in_progress_key_prefix,
    job_key_prefix,
    retry_key_prefix,
)
from redis.asyncio import Redis

from .clock import now
from .models import EventName, JobStatus
from .settings import Settings

PREFIX = "jobcast:"
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
EVENTS_CHANNEL = PREFIX + "events"
DOORBELL_CHANNEL = PREFIX + "doorbell"
CONTROL_CHANNEL = PREFIX + "control"

DELIVERY = PREFIX + "delivery:"
JOB_DELIVERIES = PREFIX + "deliveries:"
#: Held while one delivery of a job is attempted: a job's deliveries are made one at a time.
WEBHOOK_LOCK = PREFIX + "webhook-lock:"
DEAD_LETTERS = PREFIX + "dead-letters:"
WEBHOOK_STATS = PREFIX + "webhook-stats"
STATS = PREFIX + "stats"
DEAD_LETTER_TENANTS = PREFIX + "dead-letter-tenants"
WORKERS = PREFIX + "workers"
WEBHOOK_DOORBELL_CHANNEL = PREFIX + "webhooks:doorbell"
DESTINATION = PREFIX + "destination:"
DESTINATION_SLOTS = PREFIX + "destination-slots:"
DESTINATION_WAITING = PREFIX + "destination-waiting:"
DESTINATION_HEALTH = PREFIX + "destination-health:"
TENANT_DESTINATIONS = PREFIX + "destinations:"
DISABLED_DESTINATIONS = PREFIX + "disabled-destinations"
WEBHOOK_WAITS = PREFIX + "webhook-waits"
ALERTS = PREFIX + "alerts"
ALERTS_LOCK = PREFIX + "alerts:lock"
#: The cell's epoch: which primary (replication id) the event logs are read from, since when
#: (``lua/streams.lua``, which says why).
EPOCH = PREFIX + "epoch"

ARQ_QUEUE = default_queue_name
ARQ_FUNCTION = "jobcast.run"
#: Delivery attempts have an arq queue of their own, so a slow receiver never delays a job.
WEBHOOK_QUEUE = PREFIX + "webhooks"
DELIVER_FUNCTION = "jobcast.deliver"

#: Attempts kept per delivery (a replayed delivery adds a fresh schedule's worth each time).
ATTEMPTS_KEPT = 100

#: Results and errors up to this many bytes travel inside terminal events; larger ones as a link.
INLINE_MAX = 4096


def job_key(job_id: str) -> str:
    return JOB + job_id


def job_log_key(job_id: str) -> str:
    return JOB_LOG + job_id


def tenant_log_key(tenant: str) -> str:
    return TENANT_LOG + tenant


def index_key(tenant: str, *, status: str | None = None, job_type: str | None = None) -> str:
    if status is not None:
        return f"{INDEX}{tenant}:status:{status}"
    if job_type is not None:
        return f"{INDEX}{tenant}:type:{job_type}"
    return INDEX + tenant


def idempotency_key(tenant: str, key: str) -> str:
    return f"{IDEMPOTENCY}{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"


def rate_key(tenant: str) -> str:
    return RATE + tenant


def streams_key(tenant: str) -> str:
    return STREAMS + tenant


def arq_run_id(job_id: str, run: int) -> str:
    return f"{job_id}.{run}"


def delivery_key(webhook_id: str) -> str:
    return DELIVERY + webhook_id


def delivery_attempts_key(webhook_id: str) -> str:
    return DELIVERY + webhook_id + ":attempts"


def job_deliveries_key(job_id: str) -> str:
    return JOB_DELIVERIES + job_id


def webhook_lock_key(job_id: str) -> str:
    return WEBHOOK_LOCK + job_id


def dead_letters_key(tenant: str) -> str:
    return DEAD_LETTERS + tenant


def destination_key(destination: str) -> str:
    return DESTINATION + destination


def destination_health_key(tenant: str, destination: str) -> str:
    return f"{DESTINATION_HEALTH}{tenant}:{destination}"


def tenant_destinations_key(tenant: str) -> str:
    return TENANT_DESTINATIONS + tenant


def _lua_literal(value: Any) -> str:
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, dict):  # keys and values are checked configuration (no quotes in them)
        return "{" + ", ".join(f"[{_lua_literal(k)}] = {_lua_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple):
        return "{" + ", ".join(_lua_literal(v) for v in value) + "}"
    return repr(value)


def _prelude(settings: Settings) -> str:
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
        "K_EVENTS_CHANNEL": EVENTS_CHANNEL,
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
        "CFG_DESTINATION_CONCURRENCY": settings.webhook_destination_concurrency,
        "CFG_DISABLE_AFTER_MS": int(settings.webhook_disable_after_s * 1000),
    }
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


class RateLimitScript:
    """``lua/ratelimit.lua``: one GCRA step for one key."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(_lua("ratelimit.lua"))

    async def __call__(self, key: str, interval_ms: float, tau_ms: float) -> list[int]:
        reply = await self._script(keys=[key], args=[interval_ms, tau_ms])
        return [int(x) for x in reply]


class StreamOpenScript:
    """``lua/streams.lua``: open an event stream in one round trip (checks, the tenant's stream slot,
    the first page of the log); see the script for its arguments and outcomes."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._script = redis.register_script(_lua("streams.lua"))

    async def load(self) -> None:
        """Load the script now (a Redis that restarted has none): otherwise a storm of reconnecting
        streams would each pay a failed EVALSHA and a SCRIPT LOAD first."""
        await self._redis.script_load(self._script.script)

    async def __call__(self, keys: list[str], args: list[str | int]) -> tuple[str, str, list[Any]]:
        outcome, tip, entries = await self._script(keys=keys, args=args)
        return str(outcome), str(tip), list(entries)


class JobsScript:
    """The state-machine script (``lua/jobs.lua``) bound to a Redis client, called by op name."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._script = redis.register_script(_prelude(settings) + _lua("jobs.lua"))

    async def __call__(
        self, op: str, *args: str | int | float, at: tuple[str, int] | None = None, client: Redis | None = None
    ) -> Any:
        """Run ``op`` as of ``at`` (RFC 3339, epoch ms), by default now, read once; on ``client``
        (one connection, e.g. to ``WAIT`` for this very write) instead of the pool."""
        now_iso, now_ms = at if at is not None else now()
        return await self._script(keys=[], args=[op, now_iso, now_ms, *args], client=client)
