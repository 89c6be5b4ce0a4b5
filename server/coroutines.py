"""Running a coroutine by hand: how the hub writes to a stream without a task.

The hub starts uvicorn's ``send`` coroutine itself (``step.send(None)``); almost always it runs to
its end right there. When it suspends instead (the transport is paused), :func:`finish` lets a
task take it over exactly where it stopped — the one place Jobcast relies on the details of
asyncio's future protocol (``_asyncio_future_blocking``, as asyncio's own Task handles it).
``tests/test_sse.py::test_finish_completes_a_send_started_by_hand`` fails if that changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from types import CoroutineType
from typing import Any


def as_coroutine(awaitable: Awaitable[None]) -> Coroutine[Any, Any, None]:
    """uvicorn's ``send`` is a coroutine function; another server's might return another awaitable."""
    if type(awaitable) is CoroutineType or isinstance(awaitable, Coroutine):  # the first test is the fast one
        return awaitable

    async def wrapped() -> None:
        await awaitable

    return wrapped()


async def finish(step: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Run to its end a coroutine that was started by hand (``step.send(None)``) and suspended,
    yielding ``waiting`` (the future it waits for, or None for a bare yield)."""
    try:
        while True:
            if waiting is None:
                await asyncio.sleep(0)
            else:
                # What asyncio's Task does with a future its coroutine yields: take it over
                # (the flag says a Task has not yet taken it), then wait for it ourselves.
                waiting._asyncio_future_blocking = False
                await waiting
            waiting = step.send(None)
    except StopIteration:
        return
    finally:
        step.close()
