"""Jobcast: a self-hosted server for long-running jobs.

What a job module needs is importable from here::

    from jobcast import JobContext, PermanentError, RetryableError, job_type

Everything else is Jobcast's own machinery, in subpackages whose names say what they hold:
``jobcast.worker`` (the job domain: types, the store and state machine, the arq worker),
``jobcast.cli`` (the ``jobcast`` command), ``jobcast.static`` (the dashboard), and the HTTP edge at
this level (``jobcast.app:create_app`` is the ASGI application factory).
"""

from jobcast.worker.context import JobContext
from jobcast.worker.errors import PermanentError, RetryableError
from jobcast.worker.models import Priority
from jobcast.worker.types import JobType, job_type

__version__ = "0.2.0.dev0"

__all__ = ["JobContext", "JobType", "PermanentError", "Priority", "RetryableError", "__version__", "job_type"]
