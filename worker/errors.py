"""Exceptions a job handler raises to say how its attempt failed.

    Exception
     ├── RetryableError    the attempt failed, another attempt may succeed (optionally after a delay)
     └── PermanentError    the job cannot succeed; fail it now, no retry

Any other exception from a handler counts as retryable: a transient fault (a timeout, a dropped
connection) is far more common than a deterministic one, and the job type's ``max_attempts`` bounds
the cost of retrying a real bug. Raise :class:`PermanentError` when you know better.
"""

from __future__ import annotations


class RetryableError(Exception):
    """Fail this attempt; retry with backoff, or no sooner than ``retry_after_s`` when given."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentError(Exception):
    """Fail the job now; retrying cannot help (bad input, a missing resource)."""
