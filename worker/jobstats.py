"""The job metrics as ``lua/jobs.lua`` keeps them, and the series ``GET /metrics`` derives from them.

The script counts each event with one ``HINCRBY`` (instead of one per series it feeds): the field
``t|<from>|<event>|<type>|<priority>[|b<i>]`` says which status the job left (``-``: a new job), the
event it announced (``queued``, ``processing``, ``retrying``, ``completed`` ...), and for a
transition a histogram observes, the bucket (pickup: queued -> processing; duration: processing ->
terminal); progress events count in ``progress``; histogram sums are kept as ``<name>|<type>|sum``.

:func:`series` turns that into the fields the metrics were read from before (``submitted|<type>``,
``queued|<priority>``, ``pickup|<type>|b<i>`` ...), added to any such fields a Redis written by an
older version still holds, so counters carry on across the upgrade and the queue depth stays exact.
"""

from __future__ import annotations

from collections import Counter

#: Events that end a job, and so count as a job of that outcome.
TERMINAL_EVENTS = ("completed", "failed", "cancelled")


def series(stats: dict[str, str]) -> dict[str, str]:
    """The stored stats hash as the per-series fields /metrics reads (see the module docstring)."""
    derived: Counter[str] = Counter()
    out: dict[str, str] = {}
    for field, value in stats.items():
        n = int(float(value))
        parts = field.split("|")
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
        else:  # a histogram's sum, or a field an older version wrote
            out[field] = value
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
