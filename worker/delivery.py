"""Making webhook deliveries: one attempt per arq job, on a queue of their own.

**Where they run.** The delivery worker is a second arq worker inside every ``jobcast worker``
process, on its own queue (``jobcast:webhooks``) with its own slots (``JOBCAST_WEBHOOK_CONCURRENCY``):
a slow or dead receiver holds a delivery slot, never a job slot. Not a separate command, because
then the Procfile's two lines (``web``, ``worker``) would no longer be a working deployment — a
forgotten third process would mean silently undelivered webhooks — and deliveries are small and
I/O-bound, so sharing the process (and its Redis pool and doorbell connection) costs jobs nothing.

**One attempt** (:meth:`Dispatcher.attempt`):

1. read the delivery; do nothing unless it is pending and this is its current attempt (``seq``);
2. sign the thin body with the tenant's keys (:mod:`jobcast.worker.signatures`);
3. POST it through httpcore over :class:`jobcast.worker.egress.GuardedBackend` (the SSRF guard), the whole
   attempt bounded by ``JOBCAST_WEBHOOK_TIMEOUT_S``. Redirects are never followed (httpcore has no
   such feature): a 3xx is a failure like a 5xx;
   The deliveries of one job are attempted one at a time (a lock per job, held for the attempt
   and lapsing after the longest an attempt can take), and those not attempted yet in the order of
   the job's events: an attempt that finds another in flight, or an earlier event's delivery not
   attempted yet, is put off (arq ``Retry`` after 50 ms, doubling up to 2 s; not counted as an
   interrupted run), so after a receiver answers 410 for a job nothing more is sent for it;
4. record the outcome, and on failure queue the next attempt, in one script call fenced by ``seq``:
   any 2xx -> delivered; 410 -> gone; a refused destination -> dead; otherwise a retry after the
   next delay of ``JOBCAST_WEBHOOK_RETRY_SCHEDULE`` (±10 % jitter, and no sooner than the
   Retry-After of a 429 or 503, capped at a day), or dead after the last one.

**At least once.** An attempt's arq job stays on the queue until its outcome is recorded. A worker
killed mid-attempt leaves it there under arq's in-progress key, which lapses just after the longest
an attempt can take; then any worker makes the same attempt again, with the same webhook-id. A
Redis error while reading or recording puts the attempt back (arq ``Retry``); an attempt interrupted
``MAX_RUNS`` times is dead-lettered (replayable) rather than retried for ever. So is one that arq
would give up on: on its last try (``MAX_TRIES``, put-offs counted) an attempt put off or failing
on Redis once more is not put back (arq would drop it without calling us, and the delivery would
stay pending for ever, outside the dead letters) but dead-lettered with why (:meth:`Dispatcher.give_up`).

**Metrics** (``/metrics`` is not built yet) to expose: attempts by outcome
(:meth:`WebhookStore.outcome_counts`: delivered, retry, dead, gone), dead letters per tenant
(:meth:`WebhookStore.dead_letter_count`, the gauge to alert on), the length of the delivery queue,
and attempt durations (recorded with every attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore
from arq.connections import ArqRedis
from arq.worker import Retry, func
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import egress, schema
from .clock import now, rfc3339
from .destinations import RateHomes
from .doorbell import IDLE_FALLBACK_S, DoorbellWorker
from .models import DeliveryStatus
from .settings import Settings
from .signatures import sign
from .webhooks import Attempt, Delivery, PutOff, Turn, WebhookStore

logger = logging.getLogger(__name__)

USER_AGENT = b"Jobcast-Webhooks/0.1"
#: Each Redis step of an attempt (read, record) must finish within this, or the attempt is put back.
STORE_TIMEOUT_S = 1.0
#: Seconds before an attempt put back after a Redis error runs again.
STORE_RETRY_S = 5
#: Runs of one attempt (killed workers, Redis errors) before the delivery is dead-lettered.
MAX_RUNS = 10
#: Times an attempt may be put off behind other deliveries of its job (each waits out the one in
#: flight) before arq gives up on it.
MAX_DEFERRALS = 1000
#: arq's ``max_tries`` for an attempt (it counts put-off runs too): its last try dead-letters the
#: delivery rather than ask for another, which arq would drop without calling us.
MAX_TRIES = MAX_RUNS + MAX_DEFERRALS
#: The first wait of a put-off attempt, doubled with each further put-off up to the second.
PUT_OFF_FIRST_S = 0.05
PUT_OFF_MAX_S = 2.0
RETRY_AFTER_MAX_S = 24 * 3600.0
JITTER = 0.1
#: At most this much of an answer's body is read (then the connection is dropped, not reused).
ANSWER_READ_MAX = 64 * 1024
KEEPALIVE_S = 30.0
ERROR_MAX = 500


class DeliveryBusy(Exception):
    """Another delivery of the same job is being attempted, or one of an earlier event was not
    attempted yet: this one is put off ``retry_in_s``."""

    def __init__(self, job_id: str, retry_in_s: float) -> None:
        super().__init__(f"another delivery of job {job_id} is in flight or goes first")
        self.retry_in_s = retry_in_s


@dataclass(frozen=True)
class Answer:
    """What a receiver answered, or why there was no answer."""

    status_code: int | None = None
    error: str | None = None
    retry_after_s: float | None = None
    refused: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def parse_retry_after(value: str, now_s: float) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or an HTTP-date); None when malformed."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT; a date without a zone is not one
        return None
    return max(0.0, when.timestamp() - now_s)


def next_step(answer: Answer, tries: int, delays: list[float]) -> tuple[str, float]:
    """The outcome of attempt number ``tries`` of the current schedule, and the seconds until the
    next attempt: ``delivered``, ``gone``, ``dead`` or ``retry``."""
    if answer.ok:
        return "delivered", 0.0
    if answer.status_code == 410:
        return "gone", 0.0
    if answer.refused or tries > len(delays):
        return "dead", 0.0
    delay = delays[tries - 1] * random.uniform(1 - JITTER, 1 + JITTER)
    if answer.retry_after_s is not None:
        delay = max(delay, min(answer.retry_after_s, RETRY_AFTER_MAX_S))
    return "retry", delay


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class Sender:
    """POSTs through one guarded httpcore pool per worker process (connections reused per origin)."""

    def __init__(self, settings: Settings, *, allow_private: bool | None = None) -> None:
        self.timeout_s = settings.webhook_timeout_s
        allow_private = settings.webhook_allow_private if allow_private is None else allow_private
        self._pool = httpcore.AsyncConnectionPool(
            network_backend=egress.GuardedBackend(allow_private=allow_private),
            max_connections=settings.webhook_concurrency,
            keepalive_expiry=KEEPALIVE_S,
        )

    async def post(self, url: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request_url = httpcore.URL(
            scheme=parts.scheme.encode(), host=(parts.hostname or "").encode(), port=parts.port, target=target.encode()
        )
        # Given explicitly: httpcore would write an IPv6 host without its brackets.
        host = parts.netloc.rpartition("@")[2].encode()
        timeouts = dict.fromkeys(("connect", "read", "write", "pool"), self.timeout_s)
        answer: Answer | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._pool.stream(
                    "POST",
                    request_url,
                    headers=[(b"Host", host), *headers],
                    content=body,
                    extensions={"timeout": timeouts},
                ) as response:
                    answer = self._answer(response.status, response.headers)
                    with contextlib.suppress(httpcore.NetworkError, httpcore.ProtocolError):
                        read = 0
                        async for chunk in response.aiter_stream():
                            read += len(chunk)
                            if read > ANSWER_READ_MAX:
                                break
                    return answer
        except egress.DestinationRefused as exc:
            return Answer(error=f"refused, nothing sent: {exc}", refused=True)
        except (TimeoutError, httpcore.TimeoutException):
            # Out of time while reading the body: the status came, and it is what counts.
            return answer or Answer(error=f"no answer within {self.timeout_s:g} s")
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as exc:
            return Answer(error=f"{type(exc).__name__}: {exc}".rstrip(": ")[:ERROR_MAX])

    @staticmethod
    def _answer(status: int, headers: list[tuple[bytes, bytes]]) -> Answer:
        if 300 <= status < 400:
            location = _header(headers, b"location") or "nowhere"
            return Answer(status, f"HTTP {status} redirect to {location[:200]} not followed (redirects never are)")
        retry_after = _header(headers, b"retry-after") if status in (429, 503) else None
        if retry_after is not None:
            seconds = parse_retry_after(retry_after, time.time())
            if seconds is not None:
                return Answer(status, f"HTTP {status}, Retry-After {seconds:g} s", retry_after_s=seconds)
        return Answer(status, None if 200 <= status < 300 else f"HTTP {status}")

    async def aclose(self) -> None:
        await self._pool.aclose()


class Dispatcher:
    """Makes one attempt of one delivery and records its outcome."""

    def __init__(
        self, store: WebhookStore, sender: Sender, settings: Settings, *, homes: RateHomes | None = None
    ) -> None:
        self.store = store
        self.sender = sender
        self.settings = settings
        self.homes = homes if homes is not None else RateHomes(settings, store.cell)
        self.delays = settings.webhook_retry_delays
        #: The longest one attempt can take, its bounded Redis steps included.
        self.attempt_max_s = attempt_max_s(settings)
        #: The longest a destination slot is held: an attempt plus its recording.
        self.slot_s = settings.webhook_timeout_s + 2 * STORE_TIMEOUT_S + 1

    async def attempt(self, webhook_id: str, seq: int, *, runs: int = 1) -> None:
        """Attempt ``seq`` of the delivery, its ``runs``-th run; :class:`DeliveryBusy` while another
        delivery of the same job is in flight (put off runs do not count as interrupted ones)."""
        async with asyncio.timeout(STORE_TIMEOUT_S):
            delivery = await self.store.get(webhook_id)
            if delivery is None or delivery.status is not DeliveryStatus.PENDING or delivery.seq != seq:
                status = delivery.status.value if delivery else "missing"
                logger.info("delivery %s attempt %s: nothing to do, delivery is %s", webhook_id, seq, status)
                return
            lock = await self.store.lock_job(delivery, int(self.attempt_max_s * 1000))
            if lock is None:
                logger.info("delivery %s attempt %s: nothing to do, it is no longer current", webhook_id, seq)
                return
            if isinstance(lock, PutOff):
                raise DeliveryBusy(delivery.job_id, put_off_s(lock, time.time()))
        try:
            await self._attempt_locked(delivery, runs - delivery.deferrals)
        finally:
            with contextlib.suppress(RedisError, OSError, TimeoutError):  # it lapses by itself otherwise
                async with asyncio.timeout(STORE_TIMEOUT_S):
                    await self.store.unlock_job(delivery.job_id, lock)

    async def _attempt_locked(self, delivery: Delivery, runs: int) -> None:
        webhook_id = delivery.id
        # With several cells, the turn at the destination's rate may come from another cell (bounded
        # too). Asked first: a turn wasted on a delivery that then does not go only slows the rate.
        turn = await self.homes.turn(delivery, STORE_TIMEOUT_S)
        async with asyncio.timeout(STORE_TIMEOUT_S):
            # Checked under the job's lock: a 410 to another delivery of the job is recorded by now.
            if await self.store.webhook_gone(delivery.job_id):
                logger.info(
                    "delivery %s (job %s): not sent, its receiver answered 410 Gone", webhook_id, delivery.job_id
                )
                await self.store.record(delivery, "gone", None)
                return
            if runs > MAX_RUNS:
                error = f"this attempt was interrupted {runs - 1} times (worker killed, or Redis unavailable)"
                await self.store.record(delivery, "dead", Attempt(now()[0], 0.0, None, error))
                logger.error("delivery %s (job %s): %s; dead-lettered", webhook_id, delivery.job_id, error)
                return
            if not await self._admitted(delivery, turn):
                return
        attempt, answer = await self._send(delivery)
        outcome, delay = next_step(answer, delivery.tries + 1, self.delays)
        next_at = rfc3339(time.time_ns() + int(delay * 1e9)) if outcome == "retry" else ""
        # A receiver's Retry-After holds back everything to it, not only this delivery.
        pause = min(answer.retry_after_s or 0.0, RETRY_AFTER_MAX_S)
        async with asyncio.timeout(STORE_TIMEOUT_S):
            await self.store.record(
                delivery, outcome, attempt, retry_in_s=delay, next_attempt_at=next_at, pause_s=pause
            )
        logger.info(
            "delivery %s (job %s, %s) attempt %d to %s: %s in %.0f ms -> %s%s",
            webhook_id,
            delivery.job_id,
            delivery.event,
            delivery.attempts + 1,
            delivery.url,
            attempt.error or f"HTTP {attempt.status_code}",
            attempt.duration_ms,
            outcome,
            f" in {delay:.1f} s" if outcome == "retry" else "",
        )

    async def give_up(self, webhook_id: str, seq: int, error: str) -> None:
        """Dead-letter the delivery (replayable) because attempt ``seq`` will not be tried again:
        arq's last try of it could not make it. Nothing was sent, so no attempt is recorded (nor a
        failure of its destination); ``error`` becomes the delivery's ``last_error``."""
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                delivery = await self.store.get(webhook_id)
                if delivery is None or delivery.status is not DeliveryStatus.PENDING or delivery.seq != seq:
                    return
                if await self.store.record(delivery, "dead", None, error=error) is None:
                    return
        except (RedisError, TimeoutError) as exc:
            logger.error(
                "delivery %s attempt %s: %s, and it could not be dead-lettered (%r); it stays pending",
                webhook_id, seq, error, exc,
            )  # fmt: skip
            return
        logger.error("delivery %s (job %s): %s; dead-lettered", webhook_id, delivery.job_id, error)

    async def _admitted(self, delivery: Delivery, turn: Turn | None) -> bool:
        """Whether the attempt may go now (its destination's rate, pause, slots and health allow);
        ``turn``: its turn at the rate as the destination's home cell reserved it, if another cell."""
        verdict = await self.store.admit(delivery, self.slot_s, turn)
        if verdict[0] == "send":
            return True
        if verdict[0] == "wait":
            logger.debug("delivery %s to %s: waits for %s", delivery.id, delivery.destination, verdict[2])
        elif verdict[0] == "disabled":
            logger.warning("delivery %s (job %s): dead-lettered unsent: %s", delivery.id, delivery.job_id, verdict[1])
        return False

    async def _send(self, delivery: Delivery) -> tuple[Attempt, Answer]:
        at, _ = now()
        started = time.monotonic()
        keys = self.settings.webhook_keys_for(delivery.tenant)
        if not keys:
            answer = Answer(error="no signing secret is configured for this tenant (JOBCAST_WEBHOOK_SECRETS)")
        else:
            body = delivery.body(self.settings.public_url)
            timestamp = int(time.time())
            headers = [
                (b"Content-Type", b"application/json"),
                (b"User-Agent", USER_AGENT),
                (b"webhook-id", delivery.id.encode()),
                (b"webhook-timestamp", str(timestamp).encode()),
                (b"webhook-signature", sign(keys, delivery.id, timestamp, body).encode()),
            ]
            answer = await self.sender.post(delivery.url, headers, body)
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        return Attempt(at=at, duration_ms=duration_ms, status_code=answer.status_code, error=answer.error), answer


def put_off_s(put_off: PutOff, now_s: float) -> float:
    """How long an attempt put off behind another of its job waits before it tries again: 50 ms,
    doubling with each put-off up to 2 s (what it waits for is usually a short request), and no
    sooner than the earlier delivery it waits for is due."""
    backoff = min(PUT_OFF_MAX_S, PUT_OFF_FIRST_S * 2.0 ** min(put_off.deferrals - 1, 16))
    return max(backoff, put_off.due_ms / 1000 - now_s)


def attempt_max_s(settings: Settings) -> float:
    """The longest one attempt can take: the request, plus its bounded Redis steps (the lock, the
    checks and admission, the record, the unlock; with several cells also the turn from the
    destination's home cell), plus a second to spare."""
    steps = 5 if len(settings.cell_urls) > 1 else 4
    return settings.webhook_timeout_s + steps * STORE_TIMEOUT_S + 1


async def deliver(ctx: dict[str, Any], webhook_id: str, seq: int) -> None:
    """The arq function: attempt ``seq`` of delivery ``webhook_id``. On arq's last try
    (:data:`MAX_TRIES`) an attempt that cannot be made dead-letters the delivery instead of asking
    for another try: arq would drop that try without calling us, and leave the delivery pending for
    ever (never settled, never in the dead letters)."""
    dispatcher: Dispatcher = ctx["dispatcher"]
    tries = int(ctx["job_try"])
    try:
        await dispatcher.attempt(webhook_id, seq, runs=tries)
        return
    except DeliveryBusy as busy:
        if tries < MAX_TRIES:
            logger.info("delivery %s attempt %s: %s; trying again in %.1f s", webhook_id, seq, busy, busy.retry_in_s)
            raise Retry(defer=busy.retry_in_s) from busy
        reason = str(busy)
    except (RedisError, TimeoutError) as exc:
        if tries < MAX_TRIES:
            logger.warning(
                "delivery %s attempt %s: Redis failed (%r); trying again in %d s", webhook_id, seq, exc, STORE_RETRY_S
            )
            raise Retry(defer=STORE_RETRY_S) from exc
        reason = f"Redis failed ({exc!r})"
    await dispatcher.give_up(webhook_id, seq, f"gave up after {tries} tries: {reason}")


class DeliveryWorker(DoorbellWorker):
    """The arq worker of the delivery queue, run inside a :class:`jobcast.worker.main.JobcastWorker`, which
    shares its arq pool and Redis client and rings :meth:`wake` on the webhook doorbell."""

    def __init__(self, settings: Settings, *, redis: Redis, pool: ArqRedis, cell: int = 0) -> None:
        self.sender = Sender(settings)
        self.homes = RateHomes(settings, cell)
        dispatcher = Dispatcher(WebhookStore(redis, settings, cell=cell), self.sender, settings, homes=self.homes)
        # Longer than an attempt can take (its Redis steps are bounded too), so arq never
        # times a delivery out: that would drop its arq job and lose the delivery.
        timeout = attempt_max_s(settings)
        super().__init__(
            functions=[func(deliver, name=schema.DELIVER_FUNCTION, timeout=timeout, max_tries=MAX_TRIES)],
            redis_pool=pool,
            queue_name=schema.in_cell(schema.WEBHOOK_QUEUE, cell),
            max_jobs=settings.webhook_concurrency,
            handle_signals=False,
            ctx={"dispatcher": dispatcher},
            # A killed worker's attempt is taken up again once this lapses: just after the longest an
            # attempt can take, rather than arq's default of 10 s more.
            lock_timeout_s=timeout + 1,
        )

    async def _idle_timeout(self) -> float:
        """Until the next retry falls due, at most the fallback."""
        now_ms = time.time_ns() // 1_000_000
        due = await self.pool.zrangebyscore(self.queue_name, f"({now_ms}", "+inf", start=0, num=1, withscores=True)
        if not due:
            return IDLE_FALLBACK_S
        return float(min(IDLE_FALLBACK_S, max(0.001, (due[0][1] - now_ms) / 1000)))

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop delivering: in-flight attempts get ``grace_s`` seconds, the rest go back on the queue."""
        await self.halt(grace_s)
        await self.sender.aclose()
        await self.homes.aclose()
