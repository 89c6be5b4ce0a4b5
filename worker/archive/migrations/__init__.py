"""Alembic migrations of the archive (``jobcast migrate``; automatic for SQLite)."""
