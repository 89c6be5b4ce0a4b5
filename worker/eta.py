"""Time left: when a job will finish, estimated from the progress it has reported so far.

The worker that runs a job feeds every ``ctx.progress()`` value into an :class:`Estimator` and
writes the estimate with the progress, as ``progress.eta`` (an RFC 3339 time, or null): the record,
both event logs and webhooks then carry the same figure, computed once, where the rate is seen.

How the estimate is made, and why:

- **Pace, not rate.** It keeps a smoothed *pace*, seconds per percentage point, and predicts
  ``pace x points left``. Averaging paces weighted by the points they cover is the same as dividing
  time by work over a window, which is what "time left" means; averaging rates would not be.
- **Smoothed by work done, not by time.** Each new segment of work moves the pace by a weight
  that grows with the points it covers (half of the weight after ``HALF_LIFE_POINTS``), so a handler
  that reports every row and one that reports every 10% get the same estimate, and a job's recent
  pace counts more than its distant past (accelerating and slowing jobs are followed).
- **A long first step is left out.** The clock starts at the first report, not at the start of the
  attempt: setup before the first report (downloading, connecting) says nothing about the pace.
- **Pauses are clipped.** A segment slower than ``PAUSE_FACTOR`` times the current pace counts as
  that much slower only, so one pause does not multiply the estimate; a lasting slowdown still
  raises it, segment after segment.
- **Nothing until there is signal.** No estimate before ``MIN_POINTS`` points and ``MIN_SEGMENTS``
  segments have been seen after the first report: a first guess that is wrong by 10x costs more
  trust than showing none.

Tiny reports (a handler in a tight loop) are gathered until a segment covers ``SEGMENT_POINTS``,
so the work per call is a few float operations under the context's lock.
"""

from __future__ import annotations

import math

#: Points of progress after which a past pace weighs half as much as it did.
HALF_LIFE_POINTS = 8.0
#: Reports closer than this (in points) are gathered into one segment.
SEGMENT_POINTS = 0.5
#: A segment counts as at most this many times slower than the current pace.
PAUSE_FACTOR = 2.0
#: Points covered, and segments seen, after the first report before there is an estimate.
MIN_POINTS = 2.0
MIN_SEGMENTS = 2


class Estimator:
    """Smoothed pace of one attempt's progress; times are monotonic seconds of the caller's clock."""

    __slots__ = ("_covered", "_pace", "_segment_at", "_segment_percent", "_segments", "at", "percent")

    def __init__(self) -> None:
        self._pace: float | None = None
        self._segment_at: float | None = None
        self._segment_percent = 0.0
        self._covered = 0.0
        self._segments = 0
        #: The latest observation.
        self.at: float | None = None
        self.percent = 0.0

    def observe(self, percent: float, at: float) -> None:
        """A progress report of ``percent`` (0..100, not going down) at monotonic time ``at``."""
        self.at, self.percent = at, percent
        if self._segment_at is None:
            self._segment_at, self._segment_percent = at, percent
            return
        points, seconds = percent - self._segment_percent, at - self._segment_at
        if points < SEGMENT_POINTS or seconds <= 0:
            return
        pace = seconds / points
        if self._pace is None:
            self._pace = pace
        else:
            pace = min(pace, self._pace * PAUSE_FACTOR)
            weight = 1.0 - math.exp2(-points / HALF_LIFE_POINTS)
            self._pace += weight * (pace - self._pace)
        self._segment_at, self._segment_percent = at, percent
        self._covered += points
        self._segments += 1

    def remaining_s(self) -> float | None:
        """Seconds left after the latest observation, or None while there is not enough signal."""
        if self._pace is None or self._covered < MIN_POINTS or self._segments < MIN_SEGMENTS:
            return None
        return self._pace * max(0.0, 100.0 - self.percent)
