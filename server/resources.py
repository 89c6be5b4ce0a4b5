"""The job resource of API.md, built from a stored record."""

from __future__ import annotations

from typing import Any

from worker.models import job_links
from worker.store import JobRecord


def links(record: JobRecord) -> dict[str, str]:
    result = job_links(record.id)
    if record.webhook is not None:
        result["deliveries"] = f"/jobs/{record.id}/deliveries"
    return result


def job_resource(record: JobRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "type": record.type,
        "status": record.status.value,
        "progress": record.progress,
        "params": record.params,
        "priority": record.priority.value,
        "attempt": record.attempt,
        "max_attempts": record.max_attempts,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "updated_at": record.updated_at,
        "history": record.history,
        "result": record.result,
        "error": record.error,
        "webhook": record.webhook,
        "links": links(record),
        "cancel_requested": record.cancel_requested,
    }


def etag(record: JobRecord) -> str:
    return f'"{record.id}-{record.version}"'
