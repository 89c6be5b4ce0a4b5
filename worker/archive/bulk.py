"""The PostgreSQL bulk copy: ``COPY`` into session temporary tables, then one
``INSERT ... SELECT ... ON CONFLICT`` per table.

Why not SQLAlchemy's ``executemany``: with psycopg 3 it sends one pipelined INSERT per row, each
row's parameters adapted one by one in Python — most of an archiver's time on PostgreSQL (0.5 ms a
job with its three events). ``COPY`` streams the rows in psycopg's C adaptation, and the upsert then
runs inside the server as one statement per table, in id order, so two archivers upserting the same
jobs lock them in the same order (no deadlock).

This is the one place that reaches below SQLAlchemy, through its public ``get_raw_connection()``
and ``driver_connection``: the COPY runs in the transaction the caller's connection opened.
tests/test_archive.py runs every archive test on PostgreSQL, so an upgrade that changes this
surface fails there.
"""

from __future__ import annotations

from typing import Any

import psycopg
from sqlalchemy.ext.asyncio import AsyncConnection

from .engine import ArchiveUnavailable

JOB_COLUMNS = ("id", "tenant", "type", "status", "version", "finished_ms", "search", "record")
EVENT_COLUMNS = ("job_id", "ms", "seq", "event", "data")

#: Per session (so per pooled connection), emptied at each commit.
_STAGING = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS archive_jobs_in (id text, tenant text, type text, status text, "
    "version integer, finished_ms bigint, search text, record text) ON COMMIT DELETE ROWS",
    "CREATE TEMPORARY TABLE IF NOT EXISTS archive_events_in (job_id text, ms bigint, seq bigint, event text, "
    "data text) ON COMMIT DELETE ROWS",
)
_UPSERT_JOBS = (
    f"INSERT INTO archive_jobs ({', '.join(JOB_COLUMNS)}) "
    f"SELECT {', '.join(JOB_COLUMNS)} FROM archive_jobs_in ORDER BY id "
    "ON CONFLICT (id) DO UPDATE SET status = excluded.status, version = excluded.version, "
    "finished_ms = excluded.finished_ms, search = excluded.search, record = excluded.record"
)
_UPSERT_EVENTS = (
    f"INSERT INTO archive_events ({', '.join(EVENT_COLUMNS)}) "
    f"SELECT {', '.join(EVENT_COLUMNS)} FROM archive_events_in ORDER BY job_id, ms, seq "
    "ON CONFLICT DO NOTHING"
)


async def copy_upsert(conn: AsyncConnection, job_rows: list[dict[str, Any]], event_rows: list[dict[str, Any]]) -> None:
    """Upsert the rows (dicts keyed by column) within ``conn``'s transaction. The driver's own
    errors (a lost connection, a deadlock) are :class:`ArchiveUnavailable`, as SQLAlchemy's are."""
    try:
        await _copy_upsert(conn, job_rows, event_rows)
    except psycopg.Error as exc:
        raise ArchiveUnavailable(f"The archive could not take the batch: {exc}") from None


async def _copy_upsert(conn: AsyncConnection, job_rows: list[dict[str, Any]], event_rows: list[dict[str, Any]]) -> None:
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    async with driver.cursor() as cur:
        for statement in _STAGING:
            await cur.execute(statement)
        async with cur.copy(f"COPY archive_jobs_in ({', '.join(JOB_COLUMNS)}) FROM STDIN") as copy:
            for row in job_rows:
                await copy.write_row([row[c] for c in JOB_COLUMNS])
        await cur.execute(_UPSERT_JOBS)
        if event_rows:
            async with cur.copy(f"COPY archive_events_in ({', '.join(EVENT_COLUMNS)}) FROM STDIN") as copy:
                for row in event_rows:
                    await copy.write_row([row[c] for c in EVENT_COLUMNS])
            await cur.execute(_UPSERT_EVENTS)
