"""The archive's tables, as SQLAlchemy Core objects the queries are written against.

The schema itself is made by the migrations (``migrations/versions``), which stay as they were
written; a test checks that a migrated database has exactly these tables and columns.

A job keeps its Redis hash as one JSON document (``record``): the archive never reinterprets it,
so an archived job reads back exactly as it was live. Beside it, the columns that queries filter
and order on. ``search`` is ``type + " " + params`` (the params' JSON as stored), searched for a
substring, case-insensitively: by a pg_trgm GIN index on PostgreSQL, by an FTS5 ``trigram`` table
(``archive_jobs_fts``, kept by triggers) on SQLite.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, Text

metadata = MetaData()

#: The integer key SQLite's FTS5 table refers to (a rowid alias, so VACUUM never renumbers it).
SURROGATE = BigInteger().with_variant(Integer(), "sqlite")

jobs = Table(
    "archive_jobs",
    metadata,
    Column("pk", SURROGATE, primary_key=True, autoincrement=True),
    Column("id", String(30), nullable=False, unique=True),
    Column("tenant", String(64), nullable=False),
    Column("type", String(200), nullable=False),
    Column("status", String(16), nullable=False),
    Column("version", Integer, nullable=False),
    Column("finished_ms", BigInteger, nullable=False),
    Column("search", Text, nullable=False),
    Column("record", Text, nullable=False),
)

events = Table(
    "archive_events",
    metadata,
    Column("job_id", String(30), primary_key=True),
    Column("ms", BigInteger, primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("event", String(64), nullable=False),
    Column("data", Text, nullable=False),
)

deliveries = Table(
    "archive_deliveries",
    metadata,
    Column("id", String(80), primary_key=True),
    Column("job_id", String(30), nullable=False, index=True),
    Column("position", Integer, nullable=False),
    Column("record", Text, nullable=False),
    Column("attempts", Text, nullable=False),
)

#: Alembic's bookkeeping table, named so it cannot collide with another application's.
VERSION_TABLE = "jobcast_archive_version"
