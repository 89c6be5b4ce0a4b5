"""Logging for every Jobcast process: level and format from the settings, the job id on every line
written while a job runs.

The runner sets :data:`current_job` around a job's execution; contextvars follow it into the
handler's tasks, so even a job type's own ``logger.info("...")`` lines carry the job id.
``JOBCAST_LOG_FORMAT=json`` writes one JSON object per line (``time``, ``level``, ``logger``,
``message``, ``job_id`` when there is one, ``exc`` with the traceback when there is one), for log
pipelines; ``text`` (the default) is for people. Either way credentials are redacted from every line
(:class:`RedactSecrets`).
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from datetime import UTC, datetime

import orjson

from .settings import Settings

current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("jobcast_job", default=None)


class JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            record.job_id = current_job.get()
        return True


#: Query parameters that carry a secret (``token`` is Jobcast's; the others are what clients send
#: by mistake): their values never reach a log line.
SECRET_PARAMS = ("token", "access_token", "api_key", "apikey", "key", "secret", "password")
_SECRET_PARAM = re.compile(r"([?&;](?:" + "|".join(SECRET_PARAMS) + r")=)[^&;#\s\"']*", re.IGNORECASE)
#: Credentials by their shape, wherever they stand: tokens (``jc1.<payload>.<signature>``), stored
#: API keys (``jck_<id>_<secret>``: the id is kept, it names the key) and webhook secrets.
_SECRET_SHAPES = (
    (re.compile(r"\bjc1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"), "jc1.[redacted]"),
    (re.compile(r"\b(jck_[a-z0-9]{12}_)[A-Za-z0-9_-]+"), r"\1[redacted]"),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]+"), "whsec_[redacted]"),
)


def redact(text: str) -> str:
    """``text`` without the credentials it may carry (see :data:`SECRET_PARAMS`)."""
    text = _SECRET_PARAM.sub(r"\1[redacted]", text)
    for pattern, replacement in _SECRET_SHAPES:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    """On the handler, so it covers every logger's lines: uvicorn's access lines carry the whole
    query string, and ``?token=`` is how EventSource clients authenticate. A line's traceback is
    redacted too (an exception's message may quote a URL or a header): it is formatted here, and
    the formatters write the redacted text (``exc_text``) instead of formatting it again."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_TRACEBACKS = logging.Formatter()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None)
        if job_id:
            line["job_id"] = job_id
        if record.exc_info or record.exc_text:
            line["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job_id = getattr(record, "job_id", None)
        if job_id and job_id not in record.getMessage():
            text += f" [job {job_id}]"
        return text


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.addFilter(JobIdFilter())
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
