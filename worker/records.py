"""A job as stored, in either tier: :class:`JobRecord`, built from the Redis hash the archive
keeps verbatim.

The history is stored one entry per field, ``h<version>`` (the record's version when the entry was
written), so that a transition appends its entry without reading or rewriting the others; records
written before that keep theirs as a JSON array in ``history``, and later entries follow it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from .models import JobStatus, Priority

HISTORY_FIELD = re.compile(r"h(\d+)")


def history_of(h: dict[str, str]) -> list[dict[str, Any]]:
    """The history entries of a stored record, oldest first."""
    entries: list[dict[str, Any]] = orjson.loads(h["history"]) if h.get("history") else []
    numbered = sorted((int(m[1]), value) for name, value in h.items() if (m := HISTORY_FIELD.fullmatch(name)))
    entries.extend(orjson.loads(value) for _, value in numbered)
    return entries


@dataclass(frozen=True)
class JobRecord:
    """A job as stored; the server turns it into the API's job resource."""

    id: str
    tenant: str
    type: str
    status: JobStatus
    priority: Priority
    attempt: int
    max_attempts: int
    run: int
    version: int
    params: Any
    progress: dict[str, Any]
    history: list[dict[str, Any]]
    result: Any
    error: dict[str, Any] | None
    webhook: dict[str, Any] | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    updated_at: str
    cancel_requested: bool

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> JobRecord:
        def json_or_none(field: str) -> Any:
            raw = h.get(field)
            return orjson.loads(raw) if raw else None

        return cls(
            id=h["id"],
            tenant=h["tenant"],
            type=h["type"],
            status=JobStatus(h["status"]),
            priority=Priority(h["priority"]),
            attempt=int(h["attempt"]),
            max_attempts=int(h["max_attempts"]),
            run=int(h["run"]),
            version=int(h["version"]),
            params=json_or_none("params") or {},
            progress=json_or_none("progress") or {"percent": 0.0, "eta": None},
            history=history_of(h),
            result=json_or_none("result"),
            error=json_or_none("error"),
            webhook=json_or_none("webhook"),
            created_at=h["created_at"],
            started_at=h.get("started_at"),
            finished_at=h.get("finished_at"),
            updated_at=h["updated_at"],
            cancel_requested=bool(h.get("cancel")),
        )

    @property
    def terminal(self) -> bool:
        return self.status.terminal
