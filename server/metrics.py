"""``GET /metrics``: Prometheus text format.

Job counters and histograms are kept in Redis by the state-machine script (``jobcast:stats``,
written in the same call as each transition), so any server process reports the whole system,
whichever worker did the work; a scrape costs a handful of Redis reads. What only this process
knows — its open streams, the events it handed out, the slow consumers it cut off — is reported
per process (scrape every server process, and sum).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from redis.exceptions import RedisError

from jobcast.worker import jobstats, schema
from jobcast.worker.clock import now
from jobcast.worker.models import Priority
from jobcast.worker.overview import WORKER_LIVE_S
from jobcast.worker.store import Store

from .hub import Hub
from .limits import StreamSlots

logger = logging.getLogger(__name__)

#: A scrape waits this long for Redis before it answers without it.
REDIS_TIMEOUT_S = 2.0
PICKUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)  # as in jobs.lua
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600)

JOB_COUNTERS = {
    "submitted": "Jobs submitted.",
    "started": "Attempts started.",
    "completed": "Jobs completed.",
    "failed": "Jobs failed (after their last attempt, or permanently).",
    "cancelled": "Jobs cancelled.",
    "retried": "Failed attempts that were retried.",
}


class _Snapshot:
    """One scrape's data, read from Redis beforehand (prometheus_client collects synchronously)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def _histogram(name: str, doc: str, stats: dict[str, str], prefix: str, buckets: tuple[float, ...]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=["type"])
    types = {key.split("|")[1] for key in stats if key.startswith(prefix + "|") and key.endswith("|count")}
    for job_type in sorted(types):
        base = f"{prefix}|{job_type}|"
        cumulative, points = 0, []
        for i, bound in enumerate((*buckets, float("inf")), start=1):
            cumulative += int(stats.get(f"{base}b{i}", 0))
            points.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        family.add_metric([job_type], points, float(stats.get(base + "sum", 0)))
    return family


WAIT_REASONS = ("rate_limit", "retry_after", "destination_busy")


def _destination_families(waits: dict[str, str], disabled: dict[str, str], later: int) -> list[Metric]:
    deferred = CounterMetricFamily(
        "jobcast_webhook_deferrals",
        "Delivery attempts held back, by reason: the destination's rate, a receiver's Retry-After, "
        "all of the destination's slots busy.",
        labels=["reason"],
    )
    waited = CounterMetricFamily(
        "jobcast_webhook_deferred_seconds", "Seconds delivery attempts were held back, by reason.", labels=["reason"]
    )
    for reason in WAIT_REASONS:
        deferred.add_metric([reason], float(waits.get(f"count|{reason}", 0)))
        waited.add_metric([reason], float(waits.get(f"seconds|{reason}", 0)))
    tenants: dict[str, int] = {}
    for entry in disabled:
        tenant = entry.partition(" ")[0]
        tenants[tenant] = tenants.get(tenant, 0) + 1
    off = GaugeMetricFamily(
        "jobcast_webhook_destinations_disabled", "Destinations disabled after failing too long.", labels=["tenant"]
    )
    for tenant, n in sorted(tenants.items()):
        off.add_metric([tenant], float(n))
    scheduled = GaugeMetricFamily(
        "jobcast_webhook_attempts_scheduled", "Delivery attempts queued for later (retries and held back).", value=later
    )
    return [deferred, waited, off, scheduled]


async def render(store: Store, hub: Hub, slots: StreamSlots) -> bytes:
    """The whole scrape. Without Redis it still answers: this process's own figures, and
    ``jobcast_redis_up 0`` (what the Redis-unavailable alert of deploy/prometheus watches)."""
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            families = await _shared_families(store)
        redis_up = 1.0
    except (RedisError, OSError, TimeoutError) as exc:
        logger.warning("metrics: Redis unavailable (%s); serving this process's figures only", exc)
        families, redis_up = [], 0.0
    families.append(GaugeMetricFamily("jobcast_redis_up", "1 when this process reached Redis.", value=redis_up))
    families.extend(_process_families(hub, slots))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return generate_latest(registry)


async def _shared_families(store: Store) -> list[Metric]:
    """What all processes share, read from Redis."""
    redis = store.redis
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(schema.STATS)
        pipe.hgetall(schema.WEBHOOK_STATS)
        pipe.smembers(schema.DEAD_LETTER_TENANTS)
        pipe.zcard(schema.RUNNING)
        pipe.zcard(schema.SCHEDULED)
        pipe.hgetall(schema.WEBHOOK_WAITS)
        pipe.hgetall(schema.DISABLED_DESTINATIONS)
        pipe.zcount(schema.WEBHOOK_QUEUE, f"({time.time_ns() // 1_000_000}", "+inf")
        pipe.zcard(schema.FINISHED)
        pipe.zcount(schema.FINISHED, "-inf", now()[1] - store.settings.archive_after_s * 1000)
        stats, webhook_stats, dead_tenants, running, scheduled, waits, disabled, later, finished, due = (
            await pipe.execute()
        )
    async with redis.pipeline(transaction=False) as pipe:
        for tenant in sorted(dead_tenants):
            pipe.zcard(schema.DEAD_LETTERS + tenant)
        dead_counts = await pipe.execute()
    live_workers = await store.live_workers(WORKER_LIVE_S)

    stats = jobstats.series(stats)
    families: list[Metric] = []
    for counter, doc in JOB_COUNTERS.items():
        family = CounterMetricFamily(f"jobcast_jobs_{counter}", doc, labels=["type"])
        for key, value in sorted(stats.items()):
            parts = key.split("|")
            if parts[0] == counter and len(parts) == 2:
                family.add_metric([parts[1]], float(value))
        families.append(family)

    queued = GaugeMetricFamily("jobcast_queue_depth", "Jobs waiting to run, by priority.", labels=["priority"])
    for priority in Priority:
        queued.add_metric([priority.value], float(stats.get(f"queued|{priority.value}", 0)))
    families.append(queued)
    families.append(GaugeMetricFamily("jobcast_jobs_running", "Jobs processing now.", value=float(running)))
    families.append(
        GaugeMetricFamily("jobcast_retries_waiting", "Retries waiting for their backoff.", value=float(scheduled))
    )
    families.append(
        GaugeMetricFamily("jobcast_finished_in_redis", "Finished jobs not moved to the archive yet.", value=finished)
    )
    families.append(
        GaugeMetricFamily(
            "jobcast_archive_backlog",
            "Finished jobs past JOBCAST_ARCHIVE_AFTER_S still in Redis: the archive's lag (a job whose webhook "
            "delivery is pending or dead waits too). Alert when it grows.",
            value=due,
        )
    )
    families.append(
        GaugeMetricFamily(
            "jobcast_workers_live", f"Workers with a heartbeat in the last {WORKER_LIVE_S:g} s.", value=live_workers
        )
    )
    families.append(
        _histogram("jobcast_job_pickup_seconds", "From ready (queued) to started.", stats, "pickup", PICKUP_BUCKETS)
    )
    families.append(
        _histogram(
            "jobcast_job_duration_seconds", "From started to a terminal status.", stats, "duration", DURATION_BUCKETS
        )
    )
    families.append(
        CounterMetricFamily(
            "jobcast_events_published", "Job events written and published.", value=float(stats.get("events", 0))
        )
    )

    outcomes = CounterMetricFamily(
        "jobcast_webhook_attempts", "Webhook delivery attempts by outcome.", labels=["outcome"]
    )
    for outcome, value in sorted(webhook_stats.items()):
        outcomes.add_metric([outcome], float(value))
    families.append(outcomes)
    dead = GaugeMetricFamily("jobcast_webhook_dead_letters", "Deliveries in the dead-letter list.", labels=["tenant"])
    for tenant, value in zip(sorted(dead_tenants), dead_counts, strict=True):
        dead.add_metric([tenant], float(value))
    families.append(dead)
    families.extend(_destination_families(waits, disabled, later))
    return families


def _process_families(hub: Hub, slots: StreamSlots) -> list[Metric]:
    """What only this process knows."""
    families: list[Metric] = []
    families.append(
        GaugeMetricFamily("jobcast_sse_streams_open", "Event streams open on this process.", value=slots.open_streams)
    )
    families.append(
        CounterMetricFamily(
            "jobcast_sse_events_delivered", "Events handed to stream subscribers by this process.", value=hub.delivered
        )
    )
    families.append(
        CounterMetricFamily(
            "jobcast_sse_slow_consumers_cut", "Streams this process cut off as too slow.", value=hub.slow_consumers
        )
    )
    writes = CounterMetricFamily(
        "jobcast_sse_writes",
        "Writes to event streams by this process: 'direct' made at once by the hub, 'deferred' finished "
        "by the stream's own writer because the client's connection was not taking data.",
        labels=["path"],
    )
    writes.add_metric(["direct"], float(hub.direct_writes))
    writes.add_metric(["deferred"], float(hub.deferred_writes))
    families.append(writes)
    return families
