"""Webhook deliveries: what a job's webhook is, what a delivery records, and where it is kept.

A submission's ``webhook`` (``{url, events}``) is checked by
:func:`jobcast.worker.webhook_acceptance.accept_webhook` and stored on the job. From then on the
state-machine script (``lua/jobs.lua``) does the rest atomically: every event the webhook asks for
records a delivery and queues its first attempt in the very step that emits the event, so no crash
between the two can lose it. :mod:`jobcast.worker.delivery` makes the attempts; :class:`WebhookStore`
records their outcomes through the same script and answers the reads.

A delivery's ``webhook-id`` is ``msg_<job ulid>_<event's stream id>``: unique per event, and the same
on every retry and replay, so a receiver can deduplicate (delivery is at least once).

Errors::

    Exception
     ├── WebhookRejected             a submission's webhook cannot be accepted (the server answers 422)
     └── egress.DestinationRefused   the destination is not a public address; at submission it becomes
                                     a WebhookRejected, at delivery the attempt is refused and the
                                     delivery goes to the dead letters (retrying could not help)

Decisions the issue left open:

- A tenant without a signing secret cannot submit a webhook in production (422 saying which
  variable the operator sets) rather than making the secret a startup requirement for everyone;
  ``jobcast dev`` signs with a fixed development secret.
- A 410 answer ends the delivery as ``gone`` (not a dead letter: the receiver asked for it) and marks
  the job's webhook gone, so later events of that job are not sent. Other jobs are unaffected. A
  job's deliveries are attempted one at a time (:meth:`WebhookStore.lock_job`), so none is in flight
  while another's 410 is on its way: after a 410, nothing more is sent for that job. Deliveries not
  attempted yet go in the order of the job's events.
- A refused destination (SSRF guard) is not retried: the delivery is dead-lettered at once with the
  reason, and can be replayed once the operator has decided otherwise.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from . import schema
from .archive import Archive
from .clock import now, rfc3339
from .models import DeliveryStatus, job_links
from .settings import Settings

logger = logging.getLogger(__name__)

WEBHOOK_ID_RE = re.compile(r"^msg_[0-9A-HJKMNP-TV-Z]{26}_\d{1,20}-\d{1,20}$")


def job_id_of(webhook_id: str) -> str:
    """The job a (well-formed) webhook-id belongs to: ``msg_<ulid>_<stream id>`` -> ``job_<ulid>``."""
    return "job_" + webhook_id.split("_")[1]


@dataclass(frozen=True)
class PutOff:
    """An attempt that may not go yet (:meth:`WebhookStore.lock_job`): how often it was put off so
    far, this time included, and when the earlier delivery it waits for is due (epoch ms; 0 when it
    waits for an attempt in flight)."""

    deferrals: int
    due_ms: int


@dataclass(frozen=True)
class Turn:
    """An attempt's turn at its destination's rate, reserved by the destination's home cell
    (:class:`jobcast.worker.destinations.RateHomes`): due at ``due_ms`` (epoch ms), ``reason``
    ``rate_limit``; or ``rate_home_unreachable``: nothing could be reserved, ask again at ``due_ms``."""

    due_ms: int
    reason: str


@dataclass(frozen=True)
class Attempt:
    """One try of a delivery, as recorded and shown in ``GET /jobs/{id}/deliveries``."""

    at: str
    duration_ms: float
    status_code: int | None
    error: str | None

    def to_json(self) -> str:
        return orjson.dumps(
            {"at": self.at, "duration_ms": self.duration_ms, "status_code": self.status_code, "error": self.error}
        ).decode()


@dataclass(frozen=True)
class Delivery:
    """A delivery as stored (``jobcast:delivery:{id}``)."""

    id: str
    tenant: str
    job_id: str
    event: str
    job_status: str
    url: str
    timestamp: str  # the event's time: the body's "timestamp"
    created_at: str
    updated_at: str
    status: DeliveryStatus
    seq: int  # the current attempt's fencing number (arq job "{id}.{seq}")
    tries: int  # attempts in the current schedule (a replay starts a fresh one)
    attempts: int  # attempts ever made
    replays: int
    #: Times attempt ``seq`` was put off behind another delivery of its job (not interruptions).
    deferrals: int
    next_attempt_at: str | None
    finished_at: str | None
    last_error: str | None
    destination: str | None = None  # scheme://host:port (worker.destinations)
    wait_reason: str | None = None  # why the next attempt is later than planned: rate_limit, ...
    progress: str | None = None  # JSON of the job's progress, for job.progress deliveries
    dead_reason: str | None = None  # "disabled" when dead-lettered unsent, its destination disabled
    #: The attempt (seq) whose turn at its destination's rate is reserved already; any other takes one.
    reserved: int = 0

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Delivery:
        return cls(
            id=h["id"],
            tenant=h["tenant"],
            job_id=h["job_id"],
            event=h["event"],
            job_status=h["job_status"],
            url=h["url"],
            timestamp=h["timestamp"],
            created_at=h["created_at"],
            updated_at=h["updated_at"],
            status=DeliveryStatus(h["state"]),
            seq=int(h["seq"]),
            tries=int(h["tries"]),
            attempts=int(h["attempts"]),
            replays=int(h.get("replays", 0)),
            deferrals=int(h.get(f"deferrals.{h['seq']}", 0)),
            next_attempt_at=rfc3339(int(h["due_ms"]) * 1_000_000) if h.get("due_ms") else h.get("next_attempt_at"),
            finished_at=h.get("finished_at"),
            last_error=h.get("last_error") or None,
            destination=h.get("destination"),
            wait_reason=h.get("wait_reason") or None,
            progress=h.get("progress"),
            dead_reason=h.get("dead_reason"),
            reserved=int(h.get("reserved") or 0),
        )

    def body(self, public_url: str = "") -> bytes:
        """The thin body of docs/API.md, the same bytes on every attempt: nothing a receiver should fetch
        through an authenticated call instead (no params, no result); ``job.progress`` adds the
        percent and step. Links are absolute when ``public_url`` (JOBCAST_PUBLIC_URL) is set."""
        links = {name: public_url + path for name, path in job_links(self.job_id).items()}
        data: dict[str, Any] = {"job_id": self.job_id, "status": self.job_status, "links": links}
        if self.progress:
            data["progress"] = orjson.loads(self.progress)
        return orjson.dumps({"type": self.event, "timestamp": self.timestamp, "data": data})

    def resource(self, attempts: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "event": self.event,
            "url": self.url,
            "status": self.status.value,
            "created_at": self.created_at,
            "next_attempt_at": self.next_attempt_at,
            "finished_at": self.finished_at,
            "replays": self.replays,
            "destination": self.destination,
            "wait_reason": self.wait_reason if self.status is DeliveryStatus.PENDING else None,
            "attempts": attempts,
        }

    def dead_letter(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "job_id": self.job_id,
            "event": self.event,
            "url": self.url,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "reason": self.dead_reason or "failed",
            "dead_at": self.finished_at,
            "links": {"replay": f"/webhooks/dead-letters/{self.id}/replay", "job": f"/jobs/{self.job_id}"},
        }


class WebhookStore:
    """Deliveries on Redis: outcomes are written by ``lua/jobs.lua`` (fenced by ``seq``), reads are plain."""

    def __init__(self, redis: Redis, settings: Settings, archive: Archive | None = None, cell: int = 0) -> None:
        self.redis = redis
        self.cell = cell
        self.settings = settings
        self.archive = archive
        self._script = schema.JobsScript(redis, settings, cell)

    async def get(self, webhook_id: str) -> Delivery | None:
        raw: dict[str, str] = await self.redis.hgetall(schema.delivery_key(webhook_id, cell=self.cell))  # type: ignore[misc]
        return Delivery.from_hash(raw) if raw and "state" in raw else None

    async def lock_job(self, delivery: Delivery, ttl_ms: int) -> str | PutOff | None:
        """Take the job's delivery lock for attempt ``delivery.seq`` (for ``ttl_ms``: it lapses by
        itself if its holder dies): a token to unlock it with; a :class:`PutOff` while another
        attempt of the job holds it or, for a delivery never attempted, the job's earlier event's
        delivery was not attempted yet (first attempts take turns in event order); None when that
        attempt is no longer current. See ``lock_job`` in ``lua/jobs.lua``."""
        token = secrets.token_hex(8)
        reply = await self._script("lock_job", delivery.id, delivery.seq, ttl_ms, token)
        if reply[0] == "locked":
            return token
        if reply[0] == "busy":
            return PutOff(int(reply[1]), int(reply[2]))
        return None

    async def unlock_job(self, job_id: str, token: str) -> None:
        await self._script("unlock_job", job_id, token)

    async def webhook_gone(self, job_id: str) -> bool:
        """Whether a receiver answered 410 for this job's webhook (later deliveries are not made)."""
        return bool(await self.redis.hexists(schema.job_key(job_id, cell=self.cell), "webhook_gone"))  # type: ignore[misc]

    async def record(
        self,
        delivery: Delivery,
        outcome: str,
        attempt: Attempt | None,
        *,
        retry_in_s: float = 0.0,
        next_attempt_at: str = "",
        pause_s: float = 0.0,
        error: str = "",
    ) -> str | None:
        """Record ``outcome`` (``delivered``, ``retry``, ``dead``, ``gone``) of attempt ``delivery.seq``
        and, for ``retry``, queue the next attempt; ``pause_s`` pauses the whole destination (a
        receiver's Retry-After); ``error``, the last error of an outcome without an attempt. None
        when that attempt is no longer current."""
        reply = await self._script(
            "attempted",
            delivery.id,
            delivery.seq,
            outcome,
            attempt.to_json() if attempt else "",
            (attempt.error or f"HTTP {attempt.status_code}") if attempt else error,
            int(retry_in_s * 1000),
            next_attempt_at,
            int(pause_s * 1000),
        )
        if reply[0] != "ok":
            logger.warning(
                "delivery %s attempt %s: outcome not recorded, delivery is %s", delivery.id, delivery.seq, reply[1]
            )
            return None
        if reply[2] == "disabled":
            logger.error(
                "destination %s disabled for tenant %s: nothing but failures for %g s (last: %s)",
                delivery.destination,
                delivery.tenant,
                self.settings.webhook_disable_after_s,
                attempt.error if attempt else "",
            )
        return str(reply[1])

    async def admit(self, delivery: Delivery, slot_s: float, turn: Turn | None = None) -> list[str]:
        """May attempt ``delivery.seq`` go now (``["send"]``, holding a destination slot for at most
        ``slot_s``)? Else ``["wait", due_ms, reason]`` (queued again for later), ``["disabled",
        error]`` (dead-lettered unsent) or ``["stale", state]``. ``turn``: the attempt's turn at its
        destination's rate as its home cell reserved it (by default this cell reserves one when the
        attempt needs one). See ``admit`` in ``lua/jobs.lua``."""
        extra = (turn.due_ms, turn.reason) if turn is not None else ()
        reply = await self._script("admit", delivery.id, delivery.seq, int(slot_s * 1000), *extra)
        return [str(part) for part in reply]

    async def for_job(self, job_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """The job's deliveries (the latest ``limit``), oldest first, each with its attempts; an
        archived job's from the archive."""
        ids: list[str] = await self.redis.lrange(schema.job_deliveries_key(job_id, cell=self.cell), -limit, -1)  # type: ignore[misc]
        if not ids and self.archive is not None and not await self.redis.exists(schema.job_key(job_id, cell=self.cell)):
            return [
                Delivery.from_hash(raw).resource([orjson.loads(a) for a in attempts])
                for raw, attempts in await self.archive.deliveries(job_id, limit)
            ]
        pipe = self.redis.pipeline(transaction=False)
        for webhook_id in ids:
            pipe.hgetall(schema.delivery_key(webhook_id, cell=self.cell))
            pipe.lrange(schema.delivery_attempts_key(webhook_id, cell=self.cell), 0, -1)
        replies = await pipe.execute()
        items = []
        for raw, attempts in zip(replies[::2], replies[1::2], strict=True):
            if raw and "state" in raw:
                items.append(Delivery.from_hash(raw).resource([orjson.loads(a) for a in attempts]))
        return items

    async def _drop_expired_dead_letters(self, tenant: str) -> None:
        """Dead letters are kept as long as finished jobs; older entries have lost their record."""
        cutoff = now()[1] - self.settings.retention_s * 1000
        await self.redis.zremrangebyscore(schema.dead_letters_key(tenant, cell=self.cell), "-inf", cutoff)

    async def dead_letters(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        """The tenant's dead letters, newest first."""
        await self._drop_expired_dead_letters(tenant)
        key = schema.dead_letters_key(tenant, cell=self.cell)
        ids: list[str] = await self.redis.zrevrange(key, 0, limit - 1)
        pipe = self.redis.pipeline(transaction=False)
        for webhook_id in ids:
            pipe.hgetall(schema.delivery_key(webhook_id, cell=self.cell))
        items, lost = [], []
        for webhook_id, raw in zip(ids, await pipe.execute(), strict=True):
            if raw and raw.get("state") == DeliveryStatus.DEAD and raw.get("tenant") == tenant:
                items.append(Delivery.from_hash(raw).dead_letter())
            else:
                lost.append(webhook_id)
        if lost:
            await self.redis.zrem(key, *lost)
        return items

    async def dead_letter_count(self, tenant: str) -> int:
        """How many dead letters the tenant has: one ZCARD (what a metric would expose)."""
        await self._drop_expired_dead_letters(tenant)
        return int(await self.redis.zcard(schema.dead_letters_key(tenant, cell=self.cell)))

    async def replay(self, webhook_id: str, tenant: str) -> bool:
        """Try a dead letter of ``tenant`` again, on a fresh schedule; False when it is not one."""
        if not WEBHOOK_ID_RE.match(webhook_id):
            return False
        replayed = str(await self._script("replay", webhook_id, tenant)) == "ok"
        if replayed:
            logger.info("delivery %s: replay requested (tenant %s)", webhook_id, tenant)
        return replayed

    async def outcome_counts(self) -> dict[str, int]:
        """Attempt outcomes since the start (``delivered``, ``retry``, ``dead``, ``gone``): for metrics."""
        counts: dict[str, str] = await self.redis.hgetall(schema.in_cell(schema.WEBHOOK_STATS, self.cell))  # type: ignore[misc]
        return {outcome: int(count) for outcome, count in counts.items()}
