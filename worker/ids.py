"""Job ids: ``job_`` + a ULID (48-bit millisecond time, 80 more bits, Crockford base32).

They sort by creation time as strings, which is what lets the per-tenant index be a plain
lexicographic sorted set (newest first = reverse order) with the last id seen as the cursor.

An id also names its cell (:mod:`jobcast.worker.cells`): the first two characters after the time
are the cell index (0..1023), the other 70 bits random. So a job is found, and its stream opened,
with no lookup of where its tenant lives (or lived: a tenant that moved keeps its old jobs where
they were made). With one cell every id is in cell 0, whatever those two characters say: ids made
before cells existed have random characters there.
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


#: Cells an id can name: two Crockford characters.
MAX_CELLS = 1024
_RANDOM_BITS = 70

_last: dict[int, tuple[int, int]] = {}
_lock = threading.Lock()


def new_job_id(millis: int | None = None, cell: int = 0) -> str:
    """A new id of cell ``cell``, greater than every id this process made before in that cell
    (monotonic ULID: within one millisecond the random part is incremented). Across processes, ids
    of the same millisecond order arbitrarily, which is as precise as "newest first" needs to be.

    ``millis`` is the creation time the caller already read (the job's ``created_at``), so that
    the id's time and ``created_at`` agree to the millisecond (``created_after`` and
    ``created_before`` compare ids)."""
    if not 0 <= cell < MAX_CELLS:
        raise ValueError(f"cell {cell} is not in 0..{MAX_CELLS - 1}")
    with _lock:
        millis = time.time_ns() // 1_000_000 if millis is None else millis
        last_millis, last_random = _last.get(cell, (0, 0))
        if millis <= last_millis:
            millis, randomness = last_millis, last_random + 1
        else:
            randomness = int.from_bytes(os.urandom(9), "big") >> (72 - _RANDOM_BITS + 1)  # headroom for increments
        _last[cell] = (millis, randomness)
    return "job_" + _encode(millis, 10) + _encode(cell << _RANDOM_BITS | randomness, 16)


def cell_of(job_id: str, cells: int) -> int:
    """The cell index job ``job_id`` names (with one cell: 0). It may be ``>= cells`` for an id
    that was not made here (the caller answers 404); ``job_id`` must be a valid id (:func:`is_job_id`)."""
    if cells == 1:
        return 0
    return _ALPHABET.index(job_id[14]) * 32 + _ALPHABET.index(job_id[15])


def is_job_id(value: str) -> bool:
    return bool(JOB_ID_RE.fullmatch(value))


def id_floor(millis: int) -> str:
    """The smallest job id of millisecond ``millis``: ids ``>=`` it were made at or after it,
    ids ``<`` it before (what ``created_after`` and ``created_before`` compare with)."""
    return "job_" + _encode(max(0, min(millis, 2**48 - 1)), 10) + "0" * 16
