"""Event ids: the ids of Redis stream entries (``"<ms>-<seq>"``), as the event logs give them and as
clients send them back in ``Last-Event-ID``. This module is the one place that reads them.

An id orders as the pair of its two numbers; :func:`parse` gives that pair for a well-formed id
(or None), :func:`order` for an id that came from Redis itself.
"""

from __future__ import annotations

import re

ID_RE = re.compile(r"^([0-9]{1,20})-([0-9]{1,20})$")
MAX_PART = 2**64 - 1

#: The order of "no id yet": before every id.
BEFORE_ALL = (-1, -1)

Order = tuple[int, int]


def parse(value: str) -> Order | None:
    """The order of ``value`` if it is an event id this server could have sent, else None: of the form
    of a Redis stream id, within its range, and with room for an event after it."""
    match = ID_RE.fullmatch(value)
    if match is None:
        return None
    ms, seq = int(match[1]), int(match[2])
    if ms > MAX_PART or seq > MAX_PART or (ms, seq) == (MAX_PART, MAX_PART):
        return None
    return ms, seq


def valid(value: str) -> bool:
    return parse(value) is not None


def order(stream_id: str) -> Order:
    """The order of an id Redis produced (a partial id ``"<ms>"`` counts as ``"<ms>-0"``)."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def render(key: Order) -> str:
    return f"{key[0]}-{key[1]}"
