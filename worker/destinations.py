"""Webhook destinations: what one is, how fast it may be sent to, and its health per tenant.

A **destination** is a webhook URL's scheme, host and port (``https://hooks.example.com:443``):
what a receiver's capacity is shared by. ``lua/jobs.lua`` computes the same string
(``destination_of``) when it records a delivery; :func:`destination_of` here is its twin, and a test
holds the two to the same answers.

**Rate** (``JOBCAST_WEBHOOK_RATE``, per destination overrides in ``JOBCAST_WEBHOOK_RATES``): N
deliveries per S seconds, as a burst of up to N that refills evenly — the GCRA of the submission
limit, but *reserving*: a delivery over the rate is not refused, it is queued for the moment its
turn comes. A first attempt reserves its moment when its event is written, inside the same script
call, so a job's deliveries leave in the order of its events; retries and replays reserve theirs
when they fall due. With several cells one cell keeps a destination's turns for the whole
deployment (:class:`RateHomes`), and every attempt reserves its turn when it comes up. A
receiver's 429 or 503 with Retry-After pauses the whole destination until then (with several
cells, in the cell whose attempt got it). At most ``JOBCAST_WEBHOOK_DESTINATION_CONCURRENCY``
attempts to one destination are in flight at once, across all workers (of one cell), so a slow
receiver holds a few delivery slots, never all of them; the deliveries that find it busy wait their
turn in a queue of their own (``destination-waiting``) and are released one by one as attempts end.

**Health** is kept per tenant and destination (one tenant's failing receiver never disables
another tenant's deliveries): consecutive failures, since when, the last success. After
``JOBCAST_WEBHOOK_DISABLE_AFTER_S`` of nothing but failures the destination is disabled for that
tenant: its deliveries go to the dead letters at once, with ``reason: "disabled"``, until an
operator re-enables it (:meth:`DestinationStore.enable`). Health is forgotten after
``JOBCAST_RETENTION_S`` without any delivery to the destination.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import schema
from .cells import jump_hash, tenant_hash
from .clock import now, rfc3339
from .connections import redis_for
from .rates import MAX_DESTINATION_LENGTH, Rate, destination_of
from .settings import Settings
from .webhooks import Turn

if TYPE_CHECKING:
    from .webhooks import Delivery

logger = logging.getLogger(__name__)

#: Seconds an attempt whose destination's home cell could not be asked for a turn waits before it
#: asks again (it waits: sending without a turn could break the rate).
HOME_RETRY_S = 5.0


def rate_for(settings: Settings, destination: str) -> Rate:
    return settings.webhook_rate_for(destination)


__all__ = ["MAX_DESTINATION_LENGTH", "DestinationStore", "Rate", "RateHomes", "destination_of", "rate_for", "rate_home"]


def rate_home(destination: str, cells: int) -> int:
    """The cell that keeps ``destination``'s turns at its rate: the jump hash of its name over the
    cells (as a tenant's cell is found), so appending a cell re-homes about one destination in N."""
    return jump_hash(tenant_hash(destination), cells)


class RateHomes:
    """Turns at destinations' rates for the deliveries of cell ``cell``, when there are several.

    One cell keeps a destination's reservations (its :func:`rate_home`), so the rate holds for the
    whole deployment, not per cell. When that is this cell, ``admit`` in ``lua/jobs.lua`` reserves
    the turn itself (no extra round trip); else :meth:`turn` asks the home (op ``reserve``, one round
    trip) and ``admit`` takes the answer. A home that cannot be asked reserves nothing: the attempt
    waits :data:`HOME_RETRY_S` (``wait_reason: rate_home_unreachable``) and asks again, for as long
    as it takes; it is never sent without a turn, nor dropped. The first such wait of an outage logs
    a WARNING (the others, DEBUG: there may be thousands), the home's first answer after it an INFO."""

    def __init__(self, settings: Settings, cell: int) -> None:
        self.settings = settings
        self.cell = cell
        self.cells = len(settings.cell_urls)
        #: The other cells' scripts and clients, made when first needed.
        self._scripts: dict[int, schema.JobsScript] = {}
        self._clients: list[Redis] = []
        #: Cells that did not answer when last asked: how many attempts waited for each since.
        self._unanswered: dict[int, int] = {}

    async def turn(self, delivery: Delivery, timeout_s: float) -> Turn | None:
        """The turn of attempt ``delivery.seq`` as its destination's home reserved it, asking for at
        most ``timeout_s``; None when it needs none or this cell is the home (``admit`` reserves it)."""
        destination = delivery.destination
        if self.cells == 1 or destination is None or delivery.reserved == delivery.seq:
            return None
        home = rate_home(destination, self.cells)
        if home == self.cell:
            return None
        try:
            async with asyncio.timeout(timeout_s):
                due_ms = int(await self._script(home)("reserve", destination))
        except (RedisError, OSError, TimeoutError) as exc:
            waited = self._unanswered.get(home)
            self._unanswered[home] = (waited or 0) + 1
            logger.log(
                logging.DEBUG if waited else logging.WARNING,
                "delivery %s (job %s) to %s: not sent, cell %d, which keeps this destination's rate, did not "
                "answer (%r); it waits and asks again in %g s",
                delivery.id, delivery.job_id, destination, home, exc, HOME_RETRY_S,
            )  # fmt: skip
            return Turn(now()[1] + int(HOME_RETRY_S * 1000), "rate_home_unreachable")
        waited = self._unanswered.pop(home, None)
        if waited:
            logger.info("cell %d answers again: turns at its destinations' rates resume (%d waits)", home, waited)
        return Turn(due_ms, "rate_limit")

    def _script(self, home: int) -> schema.JobsScript:
        script = self._scripts.get(home)
        if script is None:
            client = redis_for(self.settings.cell_urls[home])
            self._clients.append(client)
            script = self._scripts[home] = schema.JobsScript(client, self.settings, home)
        return script

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()
        self._clients.clear()
        self._scripts.clear()


def _iso_of_ms(raw: str | None) -> str | None:
    return rfc3339(int(float(raw)) * 1_000_000) if raw else None


class DestinationStore:
    """A tenant's destinations as ``GET /webhooks/destinations`` lists them, and their re-enabling."""

    def __init__(self, redis: Redis, settings: Settings, cell: int = 0) -> None:
        self.redis = redis
        self.cell = cell
        self.settings = settings
        self._script = schema.JobsScript(redis, settings, cell)

    async def for_tenant(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        """The tenant's destinations, most recently used first."""
        index = schema.tenant_destinations_key(tenant, cell=self.cell)
        await self.redis.zremrangebyscore(index, "-inf", now()[1] - self.settings.retention_s * 1000)
        names: list[str] = await self.redis.zrevrange(index, 0, limit - 1)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(schema.destination_health_key(tenant, name, cell=self.cell))
            pipe.hget(schema.destination_key(name, cell=self.cell), "paused_until")
        replies = await pipe.execute()
        return [
            self.resource(name, health, paused)
            for name, health, paused in zip(names, replies[::2], replies[1::2], strict=True)
            if health
        ]

    def resource(self, name: str, health: dict[str, str], paused_until: str | None) -> dict[str, Any]:
        paused = _iso_of_ms(paused_until) if paused_until and float(paused_until) > now()[1] else None
        return {
            "destination": name,
            "state": health.get("state", "enabled"),
            "consecutive_failures": int(health.get("failures", 0)),
            "failing_since": health.get("failing_since"),
            "last_success_at": health.get("last_success_at"),
            "last_failure_at": health.get("last_failure_at"),
            "last_error": health.get("last_error") or None,
            "disabled_at": health.get("disabled_at"),
            "delivered": int(health.get("delivered", 0)),
            "failed": int(health.get("failed", 0)),
            "rate": str(rate_for(self.settings, name)),
            "paused_until": paused,
            "links": {"enable": f"/webhooks/destinations/{quote(name, safe='')}/enable"},
        }

    async def get(self, tenant: str, name: str) -> dict[str, Any] | None:
        health: dict[str, str] = await self.redis.hgetall(schema.destination_health_key(tenant, name, cell=self.cell))  # type: ignore[misc]
        if not health:
            return None
        paused_until = await self.redis.hget(schema.destination_key(name, cell=self.cell), "paused_until")  # type: ignore[misc]
        return self.resource(name, health, paused_until)

    async def enable(self, tenant: str, name: str) -> dict[str, Any] | None:
        """Enable (again) the tenant's destination, clearing its failure streak; None when unknown."""
        if str(await self._script("enable", tenant, name)) != "ok":
            return None
        return await self.get(tenant, name)

    async def disabled(self) -> dict[str, list[str]]:
        """Disabled destinations by tenant, across all tenants (for metrics and alerts)."""
        entries: dict[str, str] = await self.redis.hgetall(schema.in_cell(schema.DISABLED_DESTINATIONS, self.cell))  # type: ignore[misc]
        by_tenant: dict[str, list[str]] = {}
        for entry in sorted(entries):
            tenant, _, name = entry.partition(" ")
            by_tenant.setdefault(tenant, []).append(name)
        return by_tenant

    async def wait_counts(self) -> dict[str, float]:
        """Deferred attempts by reason (``count|<reason>``) and the seconds they waited (``seconds|<reason>``)."""
        raw: dict[str, str] = await self.redis.hgetall(schema.in_cell(schema.WEBHOOK_WAITS, self.cell))  # type: ignore[misc]
        return {name: float(value) for name, value in raw.items()}
