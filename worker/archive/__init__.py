"""The archive: finished jobs in SQL (SQLite by default, PostgreSQL in production).

:mod:`.tables` (the schema), :mod:`.engine` (connecting, migrations), :mod:`.store` (reads and
writes). The mover is :mod:`jobcast.worker.archiver`; the tiered reads are
:class:`jobcast.worker.store.Store`'s.
"""

from .engine import ArchiveUnavailable, display_url
from .store import Archive, ArchivedJob, migrate_now

__all__ = ["Archive", "ArchiveUnavailable", "ArchivedJob", "display_url", "migrate_now"]
