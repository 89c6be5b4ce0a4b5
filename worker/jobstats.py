"""The job metrics as ``lua/jobs.lua`` keeps them, and the series ``GET /metrics`` derives from them.

The script counts each event with one ``HINCRBY`` (instead of one per series it feeds): the field
``t|<from>|<event>|<type>|<priority>[|b<i>]`` says which status the job left (``-``: a new job), the
event it announced (``queued``, ``processing``, ``retrying``, ``completed`` ...), and for a
transition a histogram observes, the bucket (pickup: queued -> processing; duration: processing ->
terminal); progress events count in ``progress``; a histogram's sum is kept in integer milliseconds,
``<name>|<type>|ms`` (one ``HINCRBY``: float work in the script cost more than the rest of the count).

:func:`series` turns that into the fields the metrics were read from before (``submitted|<type>``,
``queued|<priority>``, ``pickup|<type>|b<i>`` ...), added to any such fields a Redis written by an
older version still holds, so counters carry on across the upgrade and the queue depth stays exact.
A sum comes back as seconds in ``<name>|<type>|sum``, added to the seconds an older version kept there
(with ``HINCRBYFLOAT``): that field is only ever read, never rewritten.
"""

from __future__ import annotations

from collections import Counter

#: Events that end a job, and so count as a job of that outcome.
TERMINAL_EVENTS = ("completed", "failed", "cancelled")


def series(stats: dict[str, str]) -> dict[str, str]:
    """The stored stats hash as the per-series fields /metrics reads (see the module docstring)."""
    derived: Counter[str] = Counter()
    out: dict[str, str] = {}
    sums_ms: Counter[str] = Counter()
    for field, value in stats.items():
        parts = field.split("|")
        if len(parts) == 3 and parts[2] == "ms":  # a histogram's sum, in milliseconds
            sums_ms[f"{parts[0]}|{parts[1]}|sum"] += int(value)
            continue
        n = int(float(value))
        if field == "progress":
            derived["events"] += n
        elif parts[0] == "t" and len(parts) in (5, 6):
            _, left, event, job_type, priority = parts[:5]
            derived["events"] += n
            _count(derived, n, left, event, job_type, priority)
            if len(parts) == 6:  # a histogram's bucket
                histogram = "pickup" if event == "processing" else "duration"
                derived[f"{histogram}|{job_type}|{parts[5]}"] += n
                derived[f"{histogram}|{job_type}|count"] += n
        else:  # a histogram's sum in seconds (an older version's), or a field an older version wrote
            out[field] = value
    for field, ms in sums_ms.items():
        old = out.get(field)
        out[field] = repr(ms / 1000 + (float(old) if old is not None else 0.0))
    for field, n in derived.items():
        old = out.get(field)
        out[field] = str(n + (int(float(old)) if old is not None else 0))
    return out


def _count(derived: Counter[str], n: int, left: str, event: str, job_type: str, priority: str) -> None:
    if left == "-":
        derived[f"submitted|{job_type}"] += n
    if event == "processing":
        derived[f"started|{job_type}"] += n
    elif event == "retrying":
        derived[f"retried|{job_type}"] += n
    elif event in TERMINAL_EVENTS:
        derived[f"{event}|{job_type}"] += n
    if event in ("queued", "retrying"):
        derived[f"queued|{priority}"] += n
    if left == "queued":
        derived[f"queued|{priority}"] -= n
