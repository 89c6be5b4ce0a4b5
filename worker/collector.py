"""The garbage collector's settings for Jobcast's long-running processes (``jobcast web`` and
``jobcast worker``): fewer collections, and start-up's objects out of them.

CPython's cyclic collector runs a young collection every 700 container allocations and, every so
often, a full one that walks every tracked object with the process stopped. Both processes hold
many long-lived objects per unit of work in flight: a web server ~100 per open stream (a full
collection at 10k streams took 0.7 s, BENCHMARKS.md §1), a worker a task, its coroutine frames, its
context and timers per running job (thousands of jobs sleep at once under load). With the defaults
they keep walking those objects again: the worker spent ~a fifth of its CPU per job in the
collector at 1,000 jobs in flight (BENCHMARKS.md §8, "The worker's collector"). So:

- ``gc.freeze()`` moves everything start-up made (modules, the app, the registry) out of the
  collector's sight for good;
- the young generation is collected every 50,000 allocations rather than 700, and the older ones
  rarely, so that full collections become rare too.

Cyclic garbage lives longer in exchange (a few MB at most); reference counting still frees
everything without cycles at once. Pauses and CPU, not a few MB, are what these processes cannot
spare.
"""

from __future__ import annotations

import gc

#: (young, middle, old) as ``gc.set_threshold`` takes them.
THRESHOLDS = (50_000, 20, 100)


def tune() -> None:
    """Freeze what exists now and collect rarely (see the module docstring). Call once, when start-up
    is done."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
