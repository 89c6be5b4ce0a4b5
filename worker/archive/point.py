"""The archive's hot read: one job's record by id, for ``GET /jobs/{id}`` and ``/result``.

Every read of an archived job comes here after a Redis miss, so its cost is what an archived job
costs over a live one. Through SQLAlchemy Core it was 0.35 ms in-process on either database (pool
checkout, the greenlet hop, statement compilation lookup, result and row objects); the query itself,
on the driver, is 0.06 ms on PostgreSQL and 0.04 ms on SQLite (measured side by side:
BENCHMARKS.md section 6). So this one query runs on the driver:

- **PostgreSQL**: up to :data:`LANES` connections are checked out of the archive's SQLAlchemy pool
  (its public ``AsyncConnection.get_raw_connection().driver_connection``, in autocommit) and kept
  for these reads; a read takes a free one, or — all busy — a connection of the pool for itself.
  psycopg prepares the statement on the server after a few uses of a connection. A connection
  that fails is invalidated (the pool drops it) and the read says :class:`ArchiveUnavailable`;
  one older than the pool's recycle age goes back to the pool instead of being kept.
- **SQLite**: one connection owned by one thread (``sqlite3`` is blocking), reads queued to it:
  a point read by a unique index in a WAL file never waits for the writer, so one thread keeps up,
  and the event loop never blocks on the file.

Reads of events, deliveries and listings keep SQLAlchemy: they are rarer, and return many rows.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .engine import POOL_RECYCLE_S, SQLITE_BUSY_TIMEOUT_MS, ArchiveUnavailable

#: PostgreSQL connections kept for point reads (the pool holds 5, plus 10 overflow).
LANES = 2

_PG_QUERY = "SELECT record FROM archive_jobs WHERE id = %s"
_PG_QUERY_TENANT = "SELECT record FROM archive_jobs WHERE id = %s AND tenant = %s"
_SQLITE_QUERY = "SELECT record FROM archive_jobs WHERE id = ?"
_SQLITE_QUERY_TENANT = "SELECT record FROM archive_jobs WHERE id = ? AND tenant = ?"


class PointReads:
    """``record(job_id, tenant)``: the archived job's JSON record as stored, or None."""

    async def record(self, job_id: str, tenant: str | None) -> str | None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class _Lane:
    """A pooled connection kept for point reads, and when it was taken (to give it back in time)."""

    def __init__(self, conn: AsyncConnection, driver: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self.driver = driver
        self.since = time.monotonic()


class PostgresPointReads(PointReads):
    def __init__(self, reader: AsyncEngine, display_url: str) -> None:
        self._reader = reader  # the archive's engine in autocommit: no BEGIN, no ROLLBACK per read
        self._display_url = display_url
        self._free: list[_Lane] = []
        self._kept = 0

    async def _lane(self) -> tuple[_Lane, bool]:
        """A free kept lane, a new kept one, or (all kept ones busy) a temporary one."""
        if self._free:
            return self._free.pop(), True
        keep = self._kept < LANES
        if keep:
            self._kept += 1
        try:
            conn = await self._reader.connect()
            raw = await conn.get_raw_connection()
        except BaseException:
            self._kept -= keep
            raise
        driver = raw.driver_connection
        assert driver is not None and driver.autocommit, "point reads run on an autocommit connection"
        return _Lane(conn, driver), keep

    async def _release(self, lane: _Lane, kept: bool, *, failed: bool) -> None:
        if kept and not failed and time.monotonic() - lane.since < POOL_RECYCLE_S:
            self._free.append(lane)
            return
        self._kept -= kept
        if failed:
            await lane.conn.invalidate()
        await lane.conn.close()

    async def record(self, job_id: str, tenant: str | None) -> str | None:
        try:
            lane, kept = await self._lane()
        except (OperationalError, DBAPIError, OSError, psycopg.Error) as exc:
            raise ArchiveUnavailable(f"The archive at {self._display_url} cannot be read: {exc}") from None
        failed = True
        try:
            if tenant is None:
                cursor = await lane.driver.execute(_PG_QUERY, (job_id,))
            else:
                cursor = await lane.driver.execute(_PG_QUERY_TENANT, (job_id, tenant))
            row = await cursor.fetchone()
            failed = False
        except psycopg.Error as exc:
            raise ArchiveUnavailable(f"The archive at {self._display_url} cannot be read: {exc}") from None
        finally:
            await self._release(lane, kept, failed=failed)
        return None if row is None else str(row[0])

    async def close(self) -> None:
        lanes, self._free = self._free, []
        for lane in lanes:
            await lane.conn.close()
        self._kept = 0


class SqlitePointReads(PointReads):
    def __init__(self, path: Path, display_url: str) -> None:
        self._path = path
        self._display_url = display_url
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobcast-archive-read")
        self._db: sqlite3.Connection | None = None  # opened, used and closed in that thread only

    def _read(self, job_id: str, tenant: str | None) -> str | None:
        if self._db is None:
            self._db = sqlite3.connect(self._path)
            self._db.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA query_only=1")
        if tenant is None:
            row = self._db.execute(_SQLITE_QUERY, (job_id,)).fetchone()
        else:
            row = self._db.execute(_SQLITE_QUERY_TENANT, (job_id, tenant)).fetchone()
        return None if row is None else str(row[0])

    async def record(self, job_id: str, tenant: str | None) -> str | None:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._read, job_id, tenant)
        except sqlite3.Error as exc:
            raise ArchiveUnavailable(f"The archive at {self._display_url} cannot be read: {exc}") from None

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=False)
