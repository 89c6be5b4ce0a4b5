"""Moving a Redis written before cells into cell 0's layout (``jobcast migrate``), and refusing to run
on one that was not moved.

Before 0.3 keys carried no hash tag (``jobcast:job:<id>``), arq's queue was ``arq:queue`` and arq's
ids were bare (``<job id>.<run>``, ``<webhook-id>.<seq>``). Now every key of a cell carries the cell's
tag (:mod:`jobcast.worker.schema`). The move renames each old key into cell 0 (``jobcast:X`` ->
``jobcast:{c0}:X``, ``arq:job:<rid>`` -> ``arq:job:{c0}<rid>``) and rewrites the members that are arq
ids (the arq queues, the retry schedule, the tenants' waiting lines, the destinations' slots). It is
made with every Jobcast process stopped (they refuse to start on an old layout, see :func:`refuse_old_layout`),
and is idempotent: a key already moved is not found again; a key whose new name is taken is left
where it is and reported, never overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from redis.asyncio import Redis

from . import schema

OLD_PREFIX = "jobcast:"
OLD_ARQ_QUEUE = "arq:queue"
#: Keys any deployment that ran the old layout has (one EXISTS tells an old Redis from a new or empty one).
OLD_MARKERS = [OLD_ARQ_QUEUE] + [
    OLD_PREFIX + name for name in ("stats", "queued-count", "apikeys", "finished", "workers")
]
#: Old sorted sets whose members are arq ids (their names without ``jobcast:``; a trailing ``:``: a family).
ID_MEMBERS = ("scheduled", "webhooks", "tenant-waiting:", "destination-slots:")
ARQ_PREFIXES = (job_key_prefix, in_progress_key_prefix, retry_key_prefix, result_key_prefix)


class OldLayout(RuntimeError):
    """Raised at start on a Redis that still holds the old layout."""


@dataclass
class Moved:
    keys: int = 0
    conflicts: list[str] = field(default_factory=list)


#: Keys of the new layout that carry no cell tag on purpose (found whatever cell a process takes
#: the Redis for): never moved.
UNTAGGED = frozenset({schema.CELL_INDEX})


def new_name(key: str) -> str | None:
    """The cell-0 name of old key ``key``, or None when it is not an old Jobcast or arq key."""
    if key == OLD_ARQ_QUEUE:
        return schema.ARQ_QUEUE
    if key in UNTAGGED:
        return None
    if key.startswith(OLD_PREFIX) and not key.startswith(OLD_PREFIX + "{"):
        return schema.PREFIX + key.removeprefix(OLD_PREFIX)
    for prefix in ARQ_PREFIXES:
        if key.startswith(prefix) and not key.startswith(prefix + "{"):
            return prefix + schema.tag(0) + key.removeprefix(prefix)
    return None


def _holds_ids(key: str) -> bool:
    if key == OLD_ARQ_QUEUE:
        return True
    name = key.removeprefix(OLD_PREFIX)
    return any(name == family or (family.endswith(":") and name.startswith(family)) for family in ID_MEMBERS)


async def move_to_cells(redis: Redis) -> Moved:
    """Move every old key into cell 0's layout; see the module docstring."""
    moved = Moved()
    for pattern in (OLD_PREFIX + "*", "arq:*"):
        async for key in redis.scan_iter(match=pattern, count=1000):
            target = new_name(key)
            if target is None:
                continue
            if await redis.exists(target):
                moved.conflicts.append(f"{key} (its new name {target} is taken)")
                continue
            if _holds_ids(key):
                await _move_ids(redis, key, target)
            else:
                await redis.renamenx(key, target)
            moved.keys += 1
    return moved


async def _move_ids(redis: Redis, key: str, target: str) -> None:
    """Copy sorted set ``key`` to ``target`` with its members (arq ids) tagged, then delete it."""
    members = await redis.zrange(key, 0, -1, withscores=True)
    tag = schema.tag(0)
    async with redis.pipeline(transaction=True) as pipe:
        if members:
            pipe.zadd(target, {m if m.startswith("{") else tag + m: score for m, score in members})
            ttl = await redis.pttl(key)
            if ttl > 0:
                pipe.pexpire(target, ttl)
        pipe.delete(key)
        await pipe.execute()


async def refuse_old_layout(redis: Redis) -> None:
    """Raise :class:`OldLayout` when Redis holds keys of the old layout (what to do is in its message)."""
    if await redis.exists(*OLD_MARKERS):
        raise OldLayout(
            "this Redis holds Jobcast data in the layout before 0.3 (keys without a cell tag, e.g. "
            f"{OLD_PREFIX}stats): stop every Jobcast process and run `jobcast migrate --redis`, which moves it into "
            "cell 0's layout (jobcast:{c0}:...)"
        )
