"""Job ids: ``job_`` + a ULID (48-bit millisecond time, 80 random bits, Crockford base32).

They sort by creation time as strings, which is what lets the per-tenant index be a plain
lexicographic sorted set (newest first = reverse order) with the last id seen as the cursor.
"""

from __future__ import annotations

import os
import re
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
JOB_ID_RE = re.compile(r"^job_[0-9A-HJKMNP-TV-Z]{26}$")


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_job_id() -> str:
    millis = time.time_ns() // 1_000_000
    randomness = int.from_bytes(os.urandom(10), "big")
    return "job_" + _encode(millis, 10) + _encode(randomness, 16)


def is_job_id(value: str) -> bool:
    return bool(JOB_ID_RE.match(value))
