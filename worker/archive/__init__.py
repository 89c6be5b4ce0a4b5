"""The archive: finished jobs in SQL (SQLite by default, PostgreSQL in production).

:mod:`.tables` (the schema), :mod:`.engine` (connecting, migrations), :mod:`.store` (reads and
writes). The mover is :mod:`jobcast.worker.archiver`; the tiered reads are
:class:`jobcast.worker.store.Store`'s.
"""

from .engine import ArchiveUnavailable
from .store import Archive, ArchivedJob

__all__ = ["Archive", "ArchiveUnavailable", "ArchivedJob"]
