"""The pieces every part of the OpenAPI document is written with."""

from __future__ import annotations

from typing import Any

REF = "#/components/schemas/{model}"

PROBLEM_DESCRIPTIONS = {
    "400": "Malformed request: bad JSON, query parameter or header.",
    "401": "Missing or invalid credentials.",
    "403": "A token used beyond its scope.",
    "404": "No such job for this tenant.",
    "406": "The result has no such representation.",
    "409": "The job's status does not allow this.",
    "410": "The Last-Event-ID is older than the capped event log.",
    "413": "The body is larger than 1 MiB.",
    "415": "The body is not JSON.",
    "422": "The body is well-formed but invalid; errors lists each field.",
    "426": "A plain HTTP request to the WebSocket endpoint (no Upgrade: websocket handshake).",
    "429": "The tenant's submission rate, queue share, or open event streams and long-polls are used up.",
    "431": "The request head is larger than JOBCAST_HTTP_MAX_HEAD_BYTES; the connection is closed.",
    "503": "At capacity, or Redis (or the archive of finished jobs) unreachable.",
}
SSE = {"text/event-stream": {"schema": {"type": "string"}}}
READ_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"token": []}]


def json_content(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=ref)}}}


def problems(*codes: str) -> dict[str, Any]:
    problem = {"application/problem+json": {"schema": {"$ref": REF.format(model="Problem")}}}
    return {code: {"description": PROBLEM_DESCRIPTIONS[code], "content": problem} for code in codes}


def param(name: str, where: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema, "description": description}


JOB_ID = param("job_id", "path", {"type": "string"}, "The job's id.", required=True)
TOKEN = param("token", "query", {"type": "string"}, "A job or stream token (reads only).")
LAST_EVENT_ID = param(
    "last_event_id", "query", {"type": "string"}, "Resume after this event id (or the Last-Event-ID header)."
)
