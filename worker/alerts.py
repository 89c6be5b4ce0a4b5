"""Operator alerts, pushed: Jobcast POSTs to ``JOBCAST_ALERT_WEBHOOK_URL`` when something needs a person.

**What is watched** (:meth:`Alerter.conditions`), per tenant where it belongs to one:

============================  ==========================================================  ========
kind                          holds while                                                 tenant
============================  ==========================================================  ========
``dead_letters``              the tenant has dead letters                                 yes
``destination_disabled``      one of the tenant's destinations is disabled                yes
``no_workers``                jobs wait and no worker has been alive for ALERT_NO_WORKER_S no
``queue_backlog``             more than ALERT_QUEUE_THRESHOLD jobs queued for ALERT_QUEUE_FOR_S no
============================  ==========================================================  ========

**Deduplicated and rate-limited.** State per kind and tenant lives in Redis (``jobcast:alerts``),
so every server process agrees. A condition that starts holding is announced (``firing``) unless
an announcement of that kind and tenant went out less than ``JOBCAST_ALERT_WINDOW_S`` ago; then it
is counted as suppressed and said in the next one. Something new while it holds (another dead
letter, another destination) is announced again, at most once per window. When it stops holding,
a ``resolved`` alert says so — once, and only if its ``firing`` was sent.

**What is sent**: JSON with a human ``text`` (what Slack-compatible incoming webhooks show) and the
structured ``alert`` object for other receivers; signed with Standard Webhooks headers like
deliveries (``JOBCAST_ALERT_WEBHOOK_SECRET``, else ``JOBCAST_WEBHOOK_SECRET``). The URL is the
operator's own, so the SSRF guard does not apply to it. An alert that cannot be sent is tried again
at the next evaluation (its state is written only after a 2xx).

**Who evaluates**: every server process runs :meth:`Alerter.run_forever`; each round takes a Redis
lock, so one process evaluates at a time. Servers, not workers: "no worker alive" must be seen by
something that is not a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import schema
from .clock import now, rfc3339
from .delivery import USER_AGENT, Sender
from .destinations import DestinationStore
from .settings import Settings
from .signatures import sign
from .store import Store
from .webhooks import WebhookStore

logger = logging.getLogger(__name__)

#: A worker counts as alive with a heartbeat this recent (as in GET /metrics).
WORKER_LIVE_S = 30.0
LOCK_MS = 60_000


class AlertKind(StrEnum):
    DEAD_LETTERS = "dead_letters"
    DESTINATION_DISABLED = "destination_disabled"
    NO_WORKERS = "no_workers"
    QUEUE_BACKLOG = "queue_backlog"


@dataclass(frozen=True)
class Condition:
    """One kind of trouble for one tenant (or ``None``: the whole system), as seen now."""

    kind: AlertKind
    tenant: str | None
    holds: bool
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    #: Changes when there is something new to say while it holds (a newer dead letter, ...).
    fingerprint: str = ""
    #: It must hold this long before it is announced.
    for_s: float = 0.0
    links: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind.value}|{self.tenant or ''}"


class Alerter:
    """The alerts of one cell's Redis (its own lock and state). ``cell``: its index when there are
    several, said in the system-wide conditions (a cell nobody serves is what ``no_workers`` means)."""

    def __init__(self, redis: Redis, settings: Settings, cell: int | None = None) -> None:
        self.redis = redis
        self.settings = settings
        self._where = f" in cell {cell}" if cell is not None else ""
        self._cell = {"cell": cell} if cell is not None else {}
        #: The cell's index (0 when there is one), whose tag its keys carry.
        self._index = index = cell or 0
        self._dead_letter_tenants = schema.in_cell(schema.DEAD_LETTER_TENANTS, index)
        self._queued_count = schema.in_cell(schema.QUEUED_COUNT, index)
        self._state = schema.in_cell(schema.ALERTS, index)
        self._lock = schema.in_cell(schema.ALERTS_LOCK, index)
        self.store = Store(redis, settings, cell=cell or 0)
        self.webhooks = WebhookStore(redis, settings, cell=cell or 0)
        self.destinations = DestinationStore(redis, settings, cell=cell or 0)
        self.sender = Sender(settings, allow_private=True)
        self.keys = settings.alert_keys

    async def conditions(self) -> list[Condition]:
        """Every condition as it is now, plus 'no longer holds' for each one remembered as firing."""
        found: list[Condition] = []
        tenants: set[str] = await self.redis.smembers(self._dead_letter_tenants)  # type: ignore[misc]
        for tenant in sorted(tenants):
            count = await self.webhooks.dead_letter_count(tenant)
            newest = await self.redis.zrevrange(schema.dead_letters_key(tenant, cell=self._index), 0, 0)
            found.append(
                Condition(
                    AlertKind.DEAD_LETTERS,
                    tenant,
                    count > 0,
                    f"{count} webhook deliveries of tenant {tenant} are in the dead-letter list",
                    {"dead_letters": count, "newest": newest[0] if newest else None},
                    newest[0] if newest else "",
                    links={"dead_letters": "/webhooks/dead-letters"},
                )
            )
        for tenant, names in (await self.destinations.disabled()).items():
            found.append(
                Condition(
                    AlertKind.DESTINATION_DISABLED,
                    tenant,
                    True,
                    f"webhook destination(s) of tenant {tenant} disabled after failing for too long: "
                    + ", ".join(names),
                    {"destinations": names},
                    " ".join(names),
                    links={"destinations": "/webhooks/destinations"},
                )
            )
        queued = int(await self.redis.get(self._queued_count) or 0)
        live = await self.store.live_workers(WORKER_LIVE_S)
        found.append(
            Condition(
                AlertKind.NO_WORKERS,
                None,
                live == 0 and queued > 0,
                f"{queued} jobs are waiting{self._where} and no worker has been alive for "
                f"{self.settings.alert_no_worker_s:g} s",
                {"queued": queued, "live_workers": live, **self._cell},
                for_s=self.settings.alert_no_worker_s,
            )
        )
        threshold = self.settings.alert_queue_threshold
        found.append(
            Condition(
                AlertKind.QUEUE_BACKLOG,
                None,
                threshold > 0 and queued > threshold,
                f"{queued} jobs queued{self._where}, over the threshold of {threshold} for "
                f"{self.settings.alert_queue_for_s:g} s",
                {"queued": queued, "threshold": threshold, **self._cell},
                for_s=self.settings.alert_queue_for_s,
            )
        )
        seen = {c.key for c in found}
        remembered: dict[str, str] = await self.redis.hgetall(self._state)  # type: ignore[misc]
        for key in remembered:
            if key not in seen:
                kind, _, tenant = key.partition("|")
                found.append(Condition(AlertKind(kind), tenant or None, False))
        return found

    async def check(self) -> int:
        """One evaluation round (if no other process is in one): the number of alerts sent."""
        token = secrets.token_hex(8)
        if not await self.redis.set(self._lock, token, nx=True, px=LOCK_MS):
            return 0
        try:
            sent = 0
            for condition in await self.conditions():
                sent += await self._evaluate(condition)
            return sent
        finally:
            if await self.redis.get(self._lock) == token:
                await self.redis.delete(self._lock)

    async def _evaluate(self, c: Condition) -> int:
        raw = await self.redis.hget(self._state, c.key)  # type: ignore[misc]
        state: dict[str, Any] = orjson.loads(raw) if raw else {}
        before = dict(state)
        now_ms = now()[1]
        sent = 0
        if c.holds:
            state.setdefault("since_ms", now_ms)
        else:
            state.pop("since_ms", None)
        active = c.holds and now_ms - state["since_ms"] >= c.for_s * 1000
        if active and (not state.get("notified") or c.fingerprint != state.get("fingerprint")):
            if now_ms - state.get("sent_ms", 0) >= self.settings.alert_window_s * 1000:
                if await self._send(c, "firing", state):
                    state.update(notified=True, sent_ms=now_ms, fingerprint=c.fingerprint, suppressed=0)
                    sent = 1
            elif c.fingerprint != state.get("suppressed_fingerprint"):
                state["suppressed"] = state.get("suppressed", 0) + 1
                state["suppressed_fingerprint"] = c.fingerprint
        elif not active and state.get("notified") and await self._send(c, "resolved", state):
            state.update(notified=False, fingerprint=None)
            sent = 1
        if (
            not c.holds
            and not state.get("notified")
            and now_ms - state.get("sent_ms", 0) >= (self.settings.alert_window_s * 1000)
        ):
            await self.redis.hdel(self._state, c.key)  # type: ignore[misc]
        elif state != before:
            await self.redis.hset(self._state, c.key, orjson.dumps(state).decode())  # type: ignore[misc]
        return sent

    def payload(self, c: Condition, status: str, state: dict[str, Any]) -> dict[str, Any]:
        base = self.settings.public_url
        since = rfc3339(state["since_ms"] * 1_000_000) if "since_ms" in state else None
        links = {name: base + path for name, path in c.links.items()}
        who = f" (tenant {c.tenant})" if c.tenant else ""
        if status == "firing":
            text = f"[FIRING] Jobcast {c.kind.value}{who}: {c.summary}."
            suppressed = state.get("suppressed", 0)
            if suppressed:
                text += f" ({suppressed} similar alert(s) held back in the last window.)"
            if links:
                text += " See " + ", ".join(links.values())
        else:
            text = f"[RESOLVED] Jobcast {c.kind.value}{who}: resolved, no longer the case."
        return {
            "text": text,
            "alert": {
                "kind": c.kind.value,
                "status": status,
                "tenant": c.tenant,
                "summary": c.summary if status == "firing" else "resolved",
                "details": c.details,
                "since": since,
                "at": now()[0],
                "suppressed": state.get("suppressed", 0),
                "links": links,
            },
        }

    async def _send(self, c: Condition, status: str, state: dict[str, Any]) -> bool:
        body = orjson.dumps(self.payload(c, status, state))
        msg_id = f"alert_{c.kind.value}_{c.tenant or 'all'}_{time.time_ns() // 1_000_000}"
        timestamp = int(time.time())
        headers = [
            (b"Content-Type", b"application/json"),
            (b"User-Agent", USER_AGENT),
            (b"webhook-id", msg_id.encode()),
            (b"webhook-timestamp", str(timestamp).encode()),
            (b"webhook-signature", sign(self.keys, msg_id, timestamp, body).encode()),
        ]
        answer = await self.sender.post(self.settings.alert_webhook_url, headers, body)
        if answer.ok:
            logger.info("alert %s %s%s sent", c.kind.value, status, f" (tenant {c.tenant})" if c.tenant else "")
            return True
        logger.warning(
            "alert %s %s could not be sent (%s); trying again in %g s",
            c.kind.value,
            status,
            answer.error or f"HTTP {answer.status_code}",
            self.settings.alert_check_s,
        )
        return False

    async def run_forever(self) -> None:
        try:
            while True:
                try:
                    await self.check()
                except (RedisError, OSError, TimeoutError) as exc:
                    logger.warning("alerts not evaluated (%s); trying again in %g s", exc, self.settings.alert_check_s)
                await asyncio.sleep(self.settings.alert_check_s)
        finally:
            with contextlib.suppress(RuntimeError):
                await self.sender.aclose()
