"""The archive's reads and writes: :class:`Archive`.

It stores what Redis held, as Redis held it (the job's hash, its event log's entries, its
deliveries' hashes and attempts) and gives the same shapes back, so the tiered store above it
(:class:`jobcast.worker.store.Store`) builds the same objects from either tier.

Writes are idempotent upserts keyed by the job id, stream ids and webhook-ids: copying a job twice
(a crash between the copy and the eviction, two archivers at once) leaves one copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Integer, Select, column, delete, func, select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import engine as engines
from .bulk import copy_upsert
from .engine import ArchiveUnavailable
from .point import PointReads, PostgresPointReads, SqlitePointReads
from .tables import deliveries, events, jobs

logger = logging.getLogger(__name__)

#: A stream id as two integers, for ordering in SQL.
StreamId = tuple[int, int]


def parse_stream_id(sid: str) -> StreamId:
    ms, _, seq = sid.partition("-")
    return int(ms), int(seq or 0)


def epoch_ms(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339).timestamp() * 1000)


def search_text(job_type: str, params_json: str) -> str:
    """What ``q`` is matched against: the type, a space, the params' JSON as stored."""
    return f"{job_type} {params_json}"


@dataclass(frozen=True)
class ArchivedJob:
    """One job as it is copied: its Redis hash, its event log, its deliveries (hash, attempts)."""

    record: dict[str, str]
    events: list[tuple[str, str, str]]  # (stream id, event, data)
    deliveries: list[tuple[dict[str, str], list[str]]]

    @property
    def id(self) -> str:
        return self.record["id"]


class Archive:
    """The archive at one URL. Nothing connects until the first call; see :mod:`.engine` for
    migrations. For SQLite, reads of an archive whose file does not exist yet find nothing (and
    create nothing): only the archiver, the writer, creates it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.display_url = engines.display_url(url)
        self._path: Path | None = engines.sqlite_path(url)
        self._engine: AsyncEngine | None = None
        self._read_engine: AsyncEngine | None = None
        self._point: PointReads | None = None
        self._ready = False

    @property
    def dialect(self) -> str:
        return "sqlite" if self._path is not None else "postgresql"

    async def _connectable(self, *, write: bool) -> AsyncEngine | None:
        """The engine once the schema is usable; None when a read finds no SQLite file yet."""
        if self._ready and self._engine is not None:
            return self._engine
        if self._path is not None and not write and not self._path.exists():
            return None
        if self._engine is None:
            self._engine = engines.create_engine(self.url)
        try:
            if self._path is not None:
                await engines.migrate(self._engine, self.url)
            else:
                await engines.check_schema(self._engine)
        except (OperationalError, DBAPIError, OSError) as exc:
            raise ArchiveUnavailable(f"The archive at {self.display_url} cannot be reached: {exc}") from None
        self._ready = True
        return self._engine

    async def migrate(self) -> tuple[str | None, str]:
        """``jobcast migrate``: bring the schema to this version's head."""
        if self._engine is None:
            self._engine = engines.create_engine(self.url)
        return await engines.migrate(self._engine, self.url)

    async def close(self) -> None:
        if self._point is not None:  # first: its kept connections go back to the pool disposed below
            await self._point.close()
            self._point = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
            self._ready = False

    # --- writes (the archiver) ---------------------------------------------------------------

    async def put(self, batch: list[ArchivedJob]) -> None:
        """Copy ``batch`` in one transaction; a job already there is overwritten with this copy."""
        if not batch:
            return
        engine = await self._connectable(write=True)
        assert engine is not None
        job_rows, event_rows, delivery_rows = [], [], []
        for job in batch:
            r = job.record
            job_rows.append(
                {
                    "id": r["id"],
                    "tenant": r["tenant"],
                    "type": r["type"],
                    "status": r["status"],
                    "version": int(r["version"]),
                    "finished_ms": epoch_ms(r.get("finished_at") or r["updated_at"]),
                    "search": search_text(r["type"], r.get("params", "{}")),
                    "record": orjson.dumps(r).decode(),
                }
            )
            for sid, name, data in job.events:
                ms, seq = parse_stream_id(sid)
                event_rows.append({"job_id": job.id, "ms": ms, "seq": seq, "event": name, "data": data})
            for position, (d, attempts) in enumerate(job.deliveries):
                delivery_rows.append(
                    {
                        "id": d["id"],
                        "job_id": job.id,
                        "position": position,
                        "record": orjson.dumps(d).decode(),
                        "attempts": orjson.dumps(attempts).decode(),
                    }
                )
        try:
            async with engine.begin() as conn:
                await self._upsert(conn, job_rows, event_rows, delivery_rows)
        except (OperationalError, DBAPIError, OSError) as exc:
            raise ArchiveUnavailable(f"The archive at {self.display_url} cannot be written: {exc}") from None

    async def _upsert(
        self,
        conn: AsyncConnection,
        job_rows: list[dict[str, Any]],
        event_rows: list[dict[str, Any]],
        delivery_rows: list[dict[str, Any]],
    ) -> None:
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        if self.dialect == "postgresql":
            await copy_upsert(conn, job_rows, event_rows)
        else:
            stmt = insert(jobs)
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[jobs.c.id],
                    set_={c: stmt.excluded[c] for c in ("status", "version", "finished_ms", "search", "record")},
                ),
                job_rows,
            )
            if event_rows:
                await conn.execute(insert(events).on_conflict_do_nothing(), event_rows)
        if delivery_rows:
            dstmt = insert(deliveries)
            await conn.execute(
                dstmt.on_conflict_do_update(
                    index_elements=[deliveries.c.id],
                    set_={"record": dstmt.excluded.record, "attempts": dstmt.excluded.attempts},
                ),
                delivery_rows,
            )

    async def expire(self, cutoff_ms: int, batch: int = 1000) -> int:
        """Delete up to ``batch`` jobs (with their events and deliveries) finished before ``cutoff_ms``."""
        engine = await self._connectable(write=False)
        if engine is None:
            return 0
        async with engine.begin() as conn:
            rows = (
                await conn.execute(
                    select(jobs.c.pk, jobs.c.id)
                    .where(jobs.c.finished_ms < cutoff_ms)
                    .order_by(jobs.c.finished_ms)
                    .limit(batch)
                )
            ).all()
            if not rows:
                return 0
            ids = [row.id for row in rows]
            await conn.execute(delete(events).where(events.c.job_id.in_(ids)))
            await conn.execute(delete(deliveries).where(deliveries.c.job_id.in_(ids)))
            await conn.execute(delete(jobs).where(jobs.c.pk.in_([row.pk for row in rows])))
        return len(rows)

    # --- reads ---------------------------------------------------------------------------------

    def _reader(self, engine: AsyncEngine) -> AsyncEngine:
        """The engine in autocommit mode, for reads: a read is one statement, so it needs no BEGIN
        before it and no ROLLBACK when its connection goes back to the pool (two round trips that
        more than doubled an archived read's time on PostgreSQL). It shares the engine's pool.
        SQLite's driver sends no BEGIN before a SELECT: its engine is used as it is."""
        if self.dialect == "sqlite":
            return engine
        if self._read_engine is None or self._read_engine.sync_engine.pool is not engine.sync_engine.pool:
            self._read_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        return self._read_engine

    async def _rows(self, query: Select[Any]) -> Sequence[Row[Any]]:
        """Run a read; no rows when a SQLite archive does not exist yet."""
        engine = await self._connectable(write=False)
        if engine is None:
            return []
        try:
            async with self._reader(engine).connect() as conn:
                rows: Sequence[Row[Any]] = (await conn.execute(query)).all()
                return rows
        except (OperationalError, DBAPIError, OSError) as exc:
            raise ArchiveUnavailable(f"The archive at {self.display_url} cannot be read: {exc}") from None

    async def get(self, job_id: str, tenant: str | None = None) -> dict[str, str] | None:
        """The archived job's hash, if it is archived (and the tenant's, when given): the hot read,
        on the driver (:mod:`.point`)."""
        engine = await self._connectable(write=False)
        if engine is None:
            return None
        if self._point is None:
            if self._path is not None:
                self._point = SqlitePointReads(self._path, self.display_url)
            else:
                self._point = PostgresPointReads(self._reader(engine), self.display_url)
        raw = await self._point.record(job_id, tenant)
        return None if raw is None else dict(orjson.loads(raw))

    async def page(
        self,
        tenant: str,
        *,
        status: str | None,
        job_type: str | None,
        before: str | None,
        lowest: str | None,
        search: str | None,
        limit: int,
    ) -> tuple[list[dict[str, str]], str | None]:
        """Archived jobs of ``tenant``, newest first, ids in ``[lowest, before)``; returns the hashes
        and, when more may match below the last one, its id (else None)."""
        query: Select[Any] = select(jobs.c.record).where(jobs.c.tenant == tenant)
        if status is not None:
            query = query.where(jobs.c.status == status)
        if job_type is not None:
            query = query.where(jobs.c.type == job_type)
        if before is not None:
            query = query.where(jobs.c.id < before)
        if lowest is not None:
            query = query.where(jobs.c.id >= lowest)
        if search is not None:
            query = query.where(self._matches(search))
        query = query.order_by(jobs.c.id.desc()).limit(limit + 1)
        raws = [row.record for row in await self._rows(query)]
        records = [dict(orjson.loads(raw)) for raw in raws[:limit]]
        return records, (records[-1]["id"] if len(raws) > limit else None)

    def _matches(self, search: str) -> Any:
        if self.dialect == "postgresql":
            escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            return jobs.c.search.ilike(f"%{escaped}%")
        # FTS5 trigram: a phrase of the whole string matches it as a substring (3+ characters).
        phrase = '"' + search.replace('"', '""') + '"'
        fts = text("SELECT rowid FROM archive_jobs_fts WHERE archive_jobs_fts MATCH :phrase").bindparams(phrase=phrase)
        return jobs.c.pk.in_(fts.columns(column("rowid", Integer)).subquery().select())

    async def events(self, job_id: str, after: str, count: int) -> list[tuple[str, str, str]]:
        """The archived log of a job, strictly after stream id ``after`` (``-``: from the start)."""
        query = select(events.c.ms, events.c.seq, events.c.event, events.c.data).where(events.c.job_id == job_id)
        if after != "-":
            query = query.where(tuple_(events.c.ms, events.c.seq) > tuple_(*parse_stream_id(after)))
        query = query.order_by(events.c.ms, events.c.seq).limit(count)
        rows = await self._rows(query)
        return [(f"{row.ms}-{row.seq}", row.event, row.data) for row in rows]

    async def deliveries(self, job_id: str, limit: int) -> list[tuple[dict[str, str], list[str]]]:
        """The archived job's deliveries (the latest ``limit``), oldest first."""
        query = (
            select(deliveries.c.record, deliveries.c.attempts)
            .where(deliveries.c.job_id == job_id)
            .order_by(deliveries.c.position.desc())
            .limit(limit)
        )
        rows = await self._rows(query)
        return [(dict(orjson.loads(row.record)), list(orjson.loads(row.attempts))) for row in reversed(rows)]

    async def count(self) -> int:
        """Archived jobs, all tenants (for benchmarks and operators)."""
        rows = await self._rows(select(func.count().label("n")).select_from(jobs))
        return int(rows[0].n) if rows else 0


def migrate_now(url: str) -> tuple[str | None, str]:
    """Migrate the archive at ``url`` from a command (its own event loop): ``jobcast migrate``,
    ``jobcast dev``. Returns (revision before, revision after)."""

    async def run() -> tuple[str | None, str]:
        archive = Archive(url)
        try:
            return await archive.migrate()
        finally:
            await archive.close()

    return asyncio.run(run())
