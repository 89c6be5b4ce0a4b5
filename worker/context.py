"""What a handler gets as ``ctx``: who it is running for, and ``ctx.progress()``.

``progress()`` is synchronous and cheap: it records the latest value and, at most
``JOBCAST_PROGRESS_RATE`` times a second, a background task writes the newest one to Redis (one
script call: record + both event logs + PUBLISH). A handler may call it in a tight loop, or from a
thread (``asyncio.to_thread``); intermediate values are coalesced, never the latest one: the runner
drains the pending value before it records the job's outcome, so a final 100% always lands.

Every call also feeds the attempt's :class:`~jobcast.worker.eta.Estimator`; each write carries its
estimate as ``progress.eta`` (the wall-clock time of the report plus the time left, or None).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from .clock import rfc3339
from .eta import Estimator
from .store import Store

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    percent: float
    step: str | None
    message: str | None
    #: Wall-clock time of the report, and the seconds left after it (None: too little signal).
    at_ns: int
    remaining_s: float | None

    @property
    def eta(self) -> str | None:
        """When the work is expected to be done, as RFC 3339."""
        return None if self.remaining_s is None else rfc3339(self.at_ns + int(self.remaining_s * 1e9))


@dataclass
class JobContext:
    job_id: str
    job_type: str
    attempt: int
    max_attempts: int
    run: int
    store: Store
    #: Minimum seconds between two progress writes of this job.
    interval_s: float
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop, repr=False)
    _thread: int = field(default_factory=threading.get_ident, repr=False)
    _percent: float = field(default=0.0, repr=False)
    _pending: _Pending | None = field(default=None, repr=False)
    _flusher: asyncio.Task[None] | None = field(default=None, repr=False)
    _last_write: float = field(default=-math.inf, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _draining: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _estimator: Estimator = field(default_factory=Estimator, repr=False)

    def progress(self, percent: float, *, step: str | None = None, message: str | None = None) -> None:
        """Report progress of this attempt: ``percent`` in 0..100, never going down.

        A lower percent than already reported is ignored (progress is monotonic per attempt);
        the same percent with a new ``step`` or ``message`` is a valid update.
        """
        if not isinstance(percent, int | float) or math.isnan(percent) or not 0 <= percent <= 100:
            raise ValueError(f"progress percent must be a number from 0 to 100, got {percent!r}")
        with self._lock:
            if percent < self._percent:
                logger.debug("job %s: progress %.1f ignored, already at %.1f", self.job_id, percent, self._percent)
                return
            self._percent = float(percent)
            self._estimator.observe(self._percent, time.monotonic())
            remaining = self._estimator.remaining_s() if percent < 100 else None
            self._pending = _Pending(float(percent), step, message, time.time_ns(), remaining)
        if threading.get_ident() == self._thread:
            self._kick()
        else:
            self._loop.call_soon_threadsafe(self._kick)

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = self._loop.create_task(self._flush(), name=f"progress-{self.job_id}")

    async def _flush(self) -> None:
        while True:
            wait = self._last_write + self.interval_s - self._loop.time()
            if wait > 0 and not self._draining.is_set():
                # Sleep out the interval, unless drain() asks for the write now.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._draining.wait()
            with self._lock:
                pending, self._pending = self._pending, None
            if pending is None:
                return
            self._last_write = self._loop.time()
            try:
                await self.store.progress(
                    self.job_id, self.run, pending.percent, pending.step, pending.message, eta=pending.eta
                )
            except (RedisError, OSError) as exc:
                # Progress is advisory; the outcome write that follows is what must not be lost.
                logger.warning("job %s: progress %.1f not written: %s", self.job_id, pending.percent, exc)

    async def drain(self) -> None:
        """Write the pending progress now (before the job's outcome is recorded)."""
        self._draining.set()
        self._kick()
        if self._flusher is not None:
            await self._flusher

    def close(self) -> None:
        """Stop writing progress (the run is over or no longer ours)."""
        if self._flusher is not None:
            self._flusher.cancel()
