"""A job as stored, in either tier: :class:`JobRecord`, built from the Redis hash the archive
keeps verbatim."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .models import JobStatus, Priority


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
            history=json_or_none("history") or [],
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
