"""The archive: jobs, their event logs and their webhook deliveries.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SURROGATE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "archive_jobs",
        sa.Column("pk", SURROGATE, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(30), nullable=False, unique=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("type", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("finished_ms", sa.BigInteger, nullable=False),
        sa.Column("search", sa.Text, nullable=False),
        sa.Column("record", sa.Text, nullable=False),
    )
    # Keyset pages: newest first within a tenant, alone or with one filter.
    op.create_index("archive_jobs_tenant_id", "archive_jobs", ["tenant", "id"])
    op.create_index("archive_jobs_tenant_status_id", "archive_jobs", ["tenant", "status", "id"])
    op.create_index("archive_jobs_tenant_type_id", "archive_jobs", ["tenant", "type", "id"])
    op.create_index("archive_jobs_finished_ms", "archive_jobs", ["finished_ms"])
    op.create_table(
        "archive_events",
        sa.Column("job_id", sa.String(30), primary_key=True),
        sa.Column("ms", sa.BigInteger, primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
    )
    op.create_table(
        "archive_deliveries",
        sa.Column("id", sa.String(80), primary_key=True),
        sa.Column("job_id", sa.String(30), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("record", sa.Text, nullable=False),
        sa.Column("attempts", sa.Text, nullable=False),
    )
    op.create_index("ix_archive_deliveries_job_id", "archive_deliveries", ["job_id"])

    if op.get_bind().dialect.name == "postgresql":
        # Substring search (ILIKE '%q%') through trigrams; pg_trgm is a trusted extension (PG 13+),
        # so the database's owner may create it.
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        op.execute("CREATE INDEX archive_jobs_search ON archive_jobs USING gin (search gin_trgm_ops)")
    else:
        # SQLite: an external-content FTS5 table over archive_jobs.search, trigram-tokenised (the
        # same substring semantics), kept in step by triggers.
        op.execute(
            "CREATE VIRTUAL TABLE archive_jobs_fts USING fts5("
            "search, content='archive_jobs', content_rowid='pk', tokenize='trigram')"
        )
        op.execute(
            "CREATE TRIGGER archive_jobs_fts_insert AFTER INSERT ON archive_jobs BEGIN "
            "INSERT INTO archive_jobs_fts(rowid, search) VALUES (new.pk, new.search); END"
        )
        op.execute(
            "CREATE TRIGGER archive_jobs_fts_delete AFTER DELETE ON archive_jobs BEGIN "
            "INSERT INTO archive_jobs_fts(archive_jobs_fts, rowid, search) VALUES ('delete', old.pk, old.search); END"
        )
        op.execute(
            "CREATE TRIGGER archive_jobs_fts_update AFTER UPDATE ON archive_jobs BEGIN "
            "INSERT INTO archive_jobs_fts(archive_jobs_fts, rowid, search) VALUES ('delete', old.pk, old.search); "
            "INSERT INTO archive_jobs_fts(rowid, search) VALUES (new.pk, new.search); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.execute("DROP TABLE archive_jobs_fts")
    op.drop_table("archive_deliveries")
    op.drop_table("archive_events")
    op.drop_table("archive_jobs")
