"""Alembic's environment: always run by :func:`jobcast.worker.archive.engine.migrate`, which hands
over an open connection (``config.attributes["connection"]``); there is no offline mode."""

from __future__ import annotations

from alembic import context

from jobcast.worker.archive.tables import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table=VERSION_TABLE, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
