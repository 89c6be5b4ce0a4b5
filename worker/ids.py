"""Job ids: ``job_`` + a ULID (48-bit millisecond time, 80 random bits, Crockford base32).

They sort by creation time as strings, which is what lets the per-tenant index be a plain
lexicographic sorted set (newest first = reverse order) with the last id seen as the cursor.
"""

from __future__ import annotations

import os
import re
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
JOB_ID_RE = re.compile(r"^job_[0-9A-HJKMNP-TV-Z]{26}$")


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


_last = (0, 0)
_lock = threading.Lock()


def new_job_id(millis: int | None = None) -> str:
    """A new id, greater than every id this process made before (monotonic ULID: within one
    millisecond the random part is incremented). Across processes, ids of the same millisecond
    order arbitrarily, which is as precise as "newest first" needs to be.

    ``millis`` is the creation time the caller already read (the job's ``created_at``), so that
    the id's time and ``created_at`` agree to the millisecond (``created_after`` and
    ``created_before`` compare ids)."""
    global _last
    with _lock:
        millis = time.time_ns() // 1_000_000 if millis is None else millis
        last_millis, last_random = _last
        if millis <= last_millis:
            millis, randomness = last_millis, last_random + 1
        else:
            randomness = int.from_bytes(os.urandom(10), "big") >> 1  # headroom for increments
        _last = (millis, randomness)
    return "job_" + _encode(millis, 10) + _encode(randomness, 16)


def is_job_id(value: str) -> bool:
    return bool(JOB_ID_RE.fullmatch(value))


def id_floor(millis: int) -> str:
    """The smallest job id of millisecond ``millis``: ids ``>=`` it were made at or after it,
    ids ``<`` it before (what ``created_after`` and ``created_before`` compare with)."""
    return "job_" + _encode(max(0, min(millis, 2**48 - 1)), 10) + "0" * 16
