"""Real SQL databases for the archive's tests: a SQLite file in the test's tmp dir, or a PostgreSQL
database on 127.0.0.1:5432 (trust auth) that the test creates and drops itself, under a unique
name, so that two suite runs at once never share one."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

#: The server's maintenance database (to create and drop ours); JOBCAST_TEST_POSTGRES overrides it.
ADMIN_URL = os.environ.get("JOBCAST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty database; yields its URL as JOBCAST_ARCHIVE_URL takes it."""
    name = f"jobcast_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def archive_url(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'archive.sqlite3'}"
    else:
        with postgres_database() as url:
            yield url
