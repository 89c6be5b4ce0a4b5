"""Background tasks that must not die quietly: the hub, the doorbell listener, the heartbeat, ...

Each of these loops already survives what it expects (Redis going away: it logs, backs off and
reconnects). What it does not expect (a bug, a library raising something new) used to end the task
in silence: asyncio reports a failed task only when the task is garbage collected, so a dead hub
meant every event stream of the process went quiet with nothing in the log.

:func:`supervise` runs such a loop as a task. When the loop raises, the error is logged with its
traceback and then either

- the loop runs again after a backoff (``rerun``, when given, is what runs then: the hub's rerun makes
  every stream re-read its log, since events may have been published while nobody listened), or
- ``on_death`` is called instead, for a loop that cannot simply be run again; its owner stops (the
  worker stops as on SIGTERM and exits with status 1, so a process manager restarts it).

Cancellation is how owners stop their tasks: it passes through untouched. A loop that returns has
finished its work; it is not run again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

logger = logging.getLogger(__name__)

RESTART_MIN_S = 0.1
RESTART_MAX_S = 5.0
#: A loop that ran this long before it failed starts again after the shortest backoff.
HEALTHY_S = 60.0

Loop = Callable[[], Coroutine[Any, Any, None]]


def supervise(
    name: str,
    run: Loop,
    *,
    rerun: Loop | None = None,
    on_death: Callable[[BaseException], None] | None = None,
) -> asyncio.Task[None]:
    """Run ``run()`` as the task ``name``, logging and restarting it (or calling ``on_death``) when
    it raises anything but a cancellation."""
    return asyncio.create_task(_supervised(name, run, rerun or run, on_death), name=name)


async def _supervised(name: str, run: Loop, rerun: Loop, on_death: Callable[[BaseException], None] | None) -> None:
    loop = asyncio.get_running_loop()
    delay = RESTART_MIN_S
    current = run
    while True:
        started = loop.time()
        try:
            await current()
            return
        except Exception as exc:  # what the loop did not expect: exactly what supervision is for
            if on_death is not None:
                logger.critical("background task %s died: %r; stopping", name, exc, exc_info=exc)
                on_death(exc)
                return
            if loop.time() - started >= HEALTHY_S:
                delay = RESTART_MIN_S
            logger.error("background task %s died: %r; restarting it in %.1fs", name, exc, delay, exc_info=exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RESTART_MAX_S)
        current = rerun
