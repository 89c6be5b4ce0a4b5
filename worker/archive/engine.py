"""Connecting to the archive and migrating its schema.

``JOBCAST_ARCHIVE_URL`` is written as users know it (``sqlite:///path``, ``postgresql://...``);
here it becomes SQLAlchemy's async URL (aiosqlite, psycopg 3). The schema is Alembic's
(``migrations/``):

- PostgreSQL is migrated by the operator, with ``jobcast migrate`` (a deploy step, as a schema
  change of a shared production database should be). A process finding the schema behind says so:
  :class:`ArchiveUnavailable` ("run jobcast migrate"), which reads turn into a 503.
- SQLite is a file of this machine: every process migrates it on first use, under an exclusive
  lock on a sidecar file so that a server and a worker starting together never migrate at once.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .tables import VERSION_TABLE

POOL_RECYCLE_S = 600

#: How long a SQLite writer waits for another's lock before giving up (ms).
SQLITE_BUSY_TIMEOUT_MS = 10_000


class ArchiveUnavailable(Exception):
    """The archive cannot be used now (unreachable, or its schema is not this version's)."""


def async_url(url: str) -> str:
    """``sqlite:///x`` -> ``sqlite+aiosqlite:///x``; ``postgresql://`` -> ``postgresql+psycopg://``."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.removeprefix("sqlite:///")
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    raise ValueError(f"unsupported archive URL scheme: {url[:40]!r}")


def display_url(url: str) -> str:
    """The URL as logs may show it (password masked)."""
    return make_url(url).render_as_string(hide_password=True)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite archive URL, or None for another database."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def create_engine(url: str) -> AsyncEngine:
    # No pre-ping (a round trip on every checkout, a third of an archived read): a connection the
    # server dropped fails its query, SQLAlchemy discards the pool's connections, and the read
    # answers 503 once; connections are also renewed every POOL_RECYCLE_S.
    engine = create_async_engine(async_url(url), pool_recycle=POOL_RECYCLE_S)
    if sqlite_path(url) is not None:

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL: the server reads while the worker's archiver writes; writers queue on the lock.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files(__package__).joinpath("migrations")))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def _current_revision(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def _upgrade(connection: Connection) -> None:
    config = _alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.migrate-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


async def migrate(engine: AsyncEngine, url: str) -> tuple[str | None, str]:
    """Bring the schema to this version's head; returns (revision before, revision after)."""
    path = sqlite_path(url)
    if path is None:
        async with engine.begin() as conn:
            before = await conn.run_sync(_current_revision)
            await conn.run_sync(_upgrade)
        return before, head_revision()
    # The lock is a blocking flock: taken in a thread, so the event loop keeps running meanwhile.
    lock = _file_lock(path)
    await asyncio.to_thread(lock.__enter__)
    try:
        async with engine.begin() as conn:
            before = await conn.run_sync(_current_revision)
            if before != head_revision():
                await conn.run_sync(_upgrade)
        return before, head_revision()
    finally:
        lock.__exit__(None, None, None)


async def check_schema(engine: AsyncEngine) -> None:
    """Raise :class:`ArchiveUnavailable` unless the schema is at this version's head."""
    async with engine.connect() as conn:
        current = await conn.run_sync(_current_revision)
    if current != head_revision():
        raise ArchiveUnavailable(
            f"The archive's schema is at revision {current or 'none'}, this Jobcast needs {head_revision()}: "
            "run `jobcast migrate` (with the same JOBCAST_ARCHIVE_URL)."
        )
