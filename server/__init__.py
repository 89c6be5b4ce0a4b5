"""Jobcast: a self-hosted server for long-running jobs.

What a job module needs is importable from here::

    from jobcast import JobContext, PermanentError, RetryableError, job_type

Everything else is Jobcast's own machinery, in subpackages whose names say what they hold:
``jobcast.worker`` (the job domain: types, the store and state machine, the arq worker),
``jobcast.cli`` (the ``jobcast`` command), ``jobcast.static`` (the dashboard), and the HTTP edge at
this level (``jobcast.app:create_app`` is the ASGI application factory).

The public names are imported when first asked for (PEP 562): importing any ``jobcast.*`` module
imports this package first, and the job domain behind these names (the store, the archive's
SQLAlchemy and Alembic) took ~2 s of every ``jobcast`` command's start, ``--version`` included.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobcast.worker.context import JobContext
    from jobcast.worker.errors import PermanentError, RetryableError
    from jobcast.worker.models import Priority
    from jobcast.worker.types import JobType, job_type

__version__ = "0.2.0.dev0"

__all__ = ["JobContext", "JobType", "PermanentError", "Priority", "RetryableError", "__version__", "job_type"]

#: Where each public name lives.
_PUBLIC = {
    "JobContext": "jobcast.worker.context",
    "JobType": "jobcast.worker.types",
    "PermanentError": "jobcast.worker.errors",
    "Priority": "jobcast.worker.models",
    "RetryableError": "jobcast.worker.errors",
    "job_type": "jobcast.worker.types",
}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'jobcast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
