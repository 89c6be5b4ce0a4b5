"""``GET /metrics``: Prometheus text format.

Job counters and histograms are kept in Redis by the state-machine script (``jobcast:stats``,
written in the same call as each transition), so any server process reports the whole system,
whichever worker did the work; a scrape costs a handful of Redis reads per cell, read at once and
summed (counters, gauges, histogram buckets all add up across cells; the live workers are per cell:
``jobcast_cell_workers_live``, and ``jobcast_workers_live`` is the fewest of any cell). What only this process
knows — its open streams, the events it handed out, the slow consumers it cut off — is reported
per process (scrape every server process, and sum).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

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


def _histogram(name: str, doc: str, stats: Counter[str], prefix: str, buckets: tuple[float, ...]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=["type"])
    types = {key.split("|")[1] for key in stats if key.startswith(prefix + "|") and key.endswith("|count")}
    for job_type in sorted(types):
        base = f"{prefix}|{job_type}|"
        cumulative, points = 0, []
        for i, bound in enumerate((*buckets, float("inf")), start=1):
            cumulative += int(stats.get(f"{base}b{i}", 0))
            points.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        family.add_metric([job_type], points, stats.get(base + "sum", 0.0))
    return family


WAIT_REASONS = ("rate_limit", "retry_after", "destination_busy", "rate_home_unreachable")


def _destination_families(waits: Counter[str], disabled: set[str], later: float) -> list[Metric]:
    deferred = CounterMetricFamily(
        "jobcast_webhook_deferrals",
        "Delivery attempts held back, by reason: the destination's rate, a receiver's Retry-After, "
        "all of the destination's slots busy, the cell keeping the destination's rate not answering.",
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


GAUGES = ("running", "scheduled", "later", "finished", "due")


@dataclass
class _Figures:
    """What a cell's Redis says, summed over the cells (every figure is a count or a sum)."""

    stats: Counter[str] = field(default_factory=Counter)
    webhook_stats: Counter[str] = field(default_factory=Counter)
    waits: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    disabled: set[str] = field(default_factory=set)
    gauges: Counter[str] = field(default_factory=Counter)
    #: Per cell: the live workers (a worker serving several cells is counted in each).
    workers: list[int] = field(default_factory=list)

    def add(self, other: _Figures) -> None:
        for name in ("stats", "webhook_stats", "waits", "dead_letters", "gauges"):
            getattr(self, name).update(getattr(other, name))
        self.disabled |= other.disabled
        self.workers += other.workers


async def render(stores: Sequence[Store], hubs: Sequence[Hub], slots: StreamSlots) -> bytes:
    """The whole scrape: the cells' figures summed (read at once), then this process's. Without a
    cell's Redis it still answers: this process's own figures, ``jobcast_redis_up 0`` (what the
    Redis-unavailable alert of deploy/prometheus watches) and which cell is down."""
    figures = _Figures()
    up: list[float] = []
    read = await asyncio.gather(*(_read_cell(store) for store in stores), return_exceptions=True)
    for cell, result in enumerate(read):
        if isinstance(result, (RedisError, OSError, TimeoutError)):
            logger.warning("metrics: the Redis of cell %d unavailable (%s)", cell, result)
            up.append(0.0)
        elif isinstance(result, BaseException):
            raise result
        else:
            figures.add(result)
            up.append(1.0)
    redis_up = min(up)
    families = _shared_families(figures) if redis_up else []
    up_doc = "1 when this process reached Redis (every cell's)."
    families.append(GaugeMetricFamily("jobcast_redis_up", up_doc, value=redis_up))
    cells_up = GaugeMetricFamily("jobcast_cell_up", "1 when this process reached the cell's Redis.", labels=["cell"])
    for cell, value in enumerate(up):
        cells_up.add_metric([str(cell)], value)
    families.append(cells_up)
    if redis_up:
        live = GaugeMetricFamily(
            "jobcast_cell_workers_live",
            f"Workers serving the cell with a heartbeat in the last {WORKER_LIVE_S:g} s.",
            labels=["cell"],
        )
        for cell, workers in enumerate(figures.workers):
            live.add_metric([str(cell)], float(workers))
        families.append(live)
    families.extend(_process_families(hubs, slots))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return generate_latest(registry)


async def _read_cell(store: Store) -> _Figures:
    """What all processes share of one cell, read from its Redis (within REDIS_TIMEOUT_S)."""
    async with asyncio.timeout(REDIS_TIMEOUT_S):
        return await _read_redis(store)


async def _read_redis(store: Store) -> _Figures:
    redis = store.redis

    def key(name: str) -> str:
        return schema.in_cell(name, store.cell)

    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(key(schema.STATS))
        pipe.hgetall(key(schema.WEBHOOK_STATS))
        pipe.smembers(key(schema.DEAD_LETTER_TENANTS))
        pipe.zcard(key(schema.RUNNING))
        pipe.zcard(key(schema.SCHEDULED))
        pipe.hgetall(key(schema.WEBHOOK_WAITS))
        pipe.hgetall(key(schema.DISABLED_DESTINATIONS))
        pipe.zcount(key(schema.WEBHOOK_QUEUE), f"({time.time_ns() // 1_000_000}", "+inf")
        pipe.zcard(key(schema.FINISHED))
        pipe.zcount(key(schema.FINISHED), "-inf", now()[1] - store.settings.archive_after_s * 1000)
        (
            stats,
            webhook_stats,
            dead_tenants,
            running,
            scheduled,
            waits,
            disabled,
            later,
            finished,
            due,
        ) = await pipe.execute()
    async with redis.pipeline(transaction=False) as pipe:
        for tenant in sorted(dead_tenants):
            pipe.zcard(schema.dead_letters_key(tenant, cell=store.cell))
        dead_counts = await pipe.execute()
    return _Figures(
        stats=Counter({k: float(v) for k, v in jobstats.series(stats).items()}),
        webhook_stats=Counter({k: float(v) for k, v in webhook_stats.items()}),
        waits=Counter({k: float(v) for k, v in waits.items()}),
        dead_letters=Counter(dict(zip(sorted(dead_tenants), map(float, dead_counts), strict=True))),
        disabled=set(disabled),
        gauges=Counter(dict(zip(GAUGES, map(float, (running, scheduled, later, finished, due)), strict=True))),
        workers=[await store.live_workers(WORKER_LIVE_S)],
    )


def _shared_families(figures: _Figures) -> list[Metric]:
    """What all processes share: the cells' figures, summed."""
    stats, gauges = figures.stats, figures.gauges
    families: list[Metric] = []
    for counter, doc in JOB_COUNTERS.items():
        family = CounterMetricFamily(f"jobcast_jobs_{counter}", doc, labels=["type"])
        for key, value in sorted(stats.items()):
            parts = key.split("|")
            if parts[0] == counter and len(parts) == 2:
                family.add_metric([parts[1]], value)
        families.append(family)

    queued = GaugeMetricFamily("jobcast_queue_depth", "Jobs waiting to run, by priority.", labels=["priority"])
    for priority in Priority:
        queued.add_metric([priority.value], stats.get(f"queued|{priority.value}", 0.0))
    families.append(queued)
    families.append(GaugeMetricFamily("jobcast_jobs_running", "Jobs processing now.", value=gauges["running"]))
    families.append(
        GaugeMetricFamily("jobcast_retries_waiting", "Retries waiting for their backoff.", value=gauges["scheduled"])
    )
    families.append(
        GaugeMetricFamily(
            "jobcast_finished_in_redis", "Finished jobs not moved to the archive yet.", value=gauges["finished"]
        )
    )
    families.append(
        GaugeMetricFamily(
            "jobcast_archive_backlog",
            "Finished jobs past JOBCAST_ARCHIVE_AFTER_S still in Redis: the archive's lag (a job whose webhook "
            "delivery is pending or dead waits too). Alert when it grows.",
            value=gauges["due"],
        )
    )
    families.append(
        GaugeMetricFamily(
            "jobcast_workers_live",
            f"Workers with a heartbeat in the last {WORKER_LIVE_S:g} s, in the cell that has the fewest "
            "(jobcast_cell_workers_live has each cell's).",
            value=min(figures.workers),
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
            "jobcast_events_published", "Job events written and published.", value=stats.get("events", 0.0)
        )
    )

    outcomes = CounterMetricFamily(
        "jobcast_webhook_attempts", "Webhook delivery attempts by outcome.", labels=["outcome"]
    )
    for outcome, value in sorted(figures.webhook_stats.items()):
        outcomes.add_metric([outcome], value)
    families.append(outcomes)
    dead = GaugeMetricFamily("jobcast_webhook_dead_letters", "Deliveries in the dead-letter list.", labels=["tenant"])
    for tenant, value in sorted(figures.dead_letters.items()):
        dead.add_metric([tenant], value)
    families.append(dead)
    families.extend(_destination_families(figures.waits, figures.disabled, gauges["later"]))
    return families


def _process_families(hubs: Sequence[Hub], slots: StreamSlots) -> list[Metric]:
    """What only this process knows (its hubs: one per cell)."""
    delivered = sum(hub.delivered for hub in hubs)
    slow = sum(hub.slow_consumers for hub in hubs)
    direct = sum(hub.direct_writes for hub in hubs)
    deferred = sum(hub.deferred_writes for hub in hubs)
    families: list[Metric] = []
    families.append(
        GaugeMetricFamily("jobcast_sse_streams_open", "Event streams open on this process.", value=slots.open_streams)
    )
    families.append(
        CounterMetricFamily(
            "jobcast_sse_events_delivered", "Events handed to stream subscribers by this process.", value=delivered
        )
    )
    families.append(
        CounterMetricFamily("jobcast_sse_slow_consumers_cut", "Streams this process cut off as too slow.", value=slow)
    )
    families.append(
        GaugeMetricFamily(
            "jobcast_sse_tenant_channels",
            "Tenant event channels this process is subscribed to (tenants it has listeners of, and lingering ones).",
            value=sum(hub.channels.subscribed for hub in hubs),
        )
    )
    families.append(
        CounterMetricFamily(
            "jobcast_sse_messages_received",
            "Event messages this process received from Redis pub/sub (only its tenant channels').",
            value=sum(hub.received for hub in hubs),
        )
    )
    writes = CounterMetricFamily(
        "jobcast_sse_writes",
        "Writes to event streams by this process: 'direct' made at once by the hub, 'deferred' finished "
        "by the stream's own writer because the client's connection was not taking data.",
        labels=["path"],
    )
    writes.add_metric(["direct"], float(direct))
    writes.add_metric(["deferred"], float(deferred))
    families.append(writes)
    reconnects = CounterMetricFamily(
        "jobcast_sse_hub_reconnects",
        "Times this process's event hub lost its pub/sub connection to the cell's Redis (each attempt "
        "that failed while Redis was away counts too); every stream then re-read its log.",
        labels=["cell"],
    )
    for cell, hub in enumerate(hubs):
        reconnects.add_metric([str(cell)], float(hub.reconnects))
    families.append(reconnects)
    return families
