"""Reading what a request carries: its body, query parameters, path parameters and resume id.

Each reader either returns a value of the right type and range or raises the 4xx problem that
says what was wrong and how to send it instead; nothing is read twice or written on the way.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from starlette.requests import Request

from jobcast.worker.ids import is_job_id

from . import streamids
from .problems import BadRequest, PayloadTooLarge, UnsupportedMediaType, ValidationFailed

MAX_BODY = 1024 * 1024
MAX_WAIT_S = 60


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    too_large = PayloadTooLarge(f"The request body is larger than {limit} bytes (1 MiB); send less data.")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("The Content-Length header is not a number.")
        if int(declared) > limit:
            raise too_large
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"The body must be JSON, sent with 'Content-Type: application/json' (got {content_type[:60]!r})."
        )
    raw = await read_body(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The body is not valid JSON ({exc}). Send a JSON object.") from None
    if not isinstance(body, dict):
        raise ValidationFailed(
            'The body must be a JSON object, e.g. {"type": "sleep", "params": {}}.',
            errors=[{"loc": ["body"], "msg": "must be a JSON object", "type": "object_type"}],
        )
    return body


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"Query parameter '{name}' must be an integer from {low} to {high}.") from None
    if not low <= value <= high:
        raise BadRequest(f"Query parameter '{name}' must be from {low} to {high} (got {value}).")
    return value


def query_wait(request: Request) -> float:
    raw = request.query_params.get("wait")
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_WAIT_S:  # also false for NaN
        raise BadRequest(f"Query parameter 'wait' must be a number of seconds from 0 to {MAX_WAIT_S}.")
    return value


def query_bool(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "false") if request.scope.get("query_string") else "false"
    if raw not in ("true", "false"):
        raise BadRequest(f"Query parameter '{name}' must be true or false.")
    return raw == "true"


MIN_SEARCH, MAX_SEARCH = 3, 200
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def query_time(request: Request, name: str) -> int | None:
    """An RFC 3339 date-time with its offset (``2026-12-02T10:00:00Z``) as epoch milliseconds."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise BadRequest(
            f"Query parameter '{name}' must be an RFC 3339 date-time with its offset, "
            "e.g. 2026-12-02T10:00:00Z or 2026-12-02T12:00:00+02:00."
        )
    return max(0, (value - EPOCH) // timedelta(milliseconds=1))  # exact: no float rounding


def query_search(request: Request) -> str | None:
    raw = request.query_params.get("q")
    if raw is None:
        return None
    if not MIN_SEARCH <= len(raw) <= MAX_SEARCH or "\x00" in raw:
        raise BadRequest(
            f"Query parameter 'q' must be {MIN_SEARCH} to {MAX_SEARCH} characters (NUL excluded): "
            "a piece of text to find in the job's type or params."
        )
    return raw


def query_cursor(request: Request) -> str | None:
    cursor = request.query_params.get("cursor")
    return None if cursor is None else decode_cursor(cursor)


def decode_cursor(cursor: str) -> str:
    """A cursor is the id of the last job of the previous page: the next page starts below it."""
    if not is_job_id(cursor):
        raise BadRequest(
            "Query parameter 'cursor' is malformed; pass the 'next_cursor' of the previous page unchanged."
        )
    return cursor


def job_id_param(request: Request) -> str:
    return str(request.path_params["job_id"])


def last_event_id(request: Request) -> str | None:
    value = request.headers.get("last-event-id")
    if not value and request.scope.get("query_string"):
        value = request.query_params.get("last_event_id")
    if value is None or value == "":
        return None
    if not streamids.valid(value):
        raise BadRequest(
            f"Last-Event-ID {value[:60]!r} is not an event id of this stream (ids look like "
            "'1732896301123-0'). Reconnect without it to start over."
        )
    return value
