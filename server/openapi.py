"""The OpenAPI 3.1 document of the HTTP API, built from the pydantic models.

Request and response bodies are pydantic models (the same ones the routes validate with, or, for
responses, models that describe what :mod:`server.resources` renders); the document is assembled
once per process from their JSON Schemas, with the registered job types as the ``type`` enum.
The test suite fuzzes a live server against it (schemathesis), so the document and the behaviour
cannot drift apart silently.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from worker.models import (
    DeliveryStatus,
    EventName,
    HistoryEntry,
    JobError,
    JobStatus,
    Priority,
    Progress,
    WebhookSpec,
)
from worker.types import Registry

from .problems import BadRequest

REF = "#/components/schemas/{model}"
#: Idempotency keys: printable ASCII (they travel in a header).
IDEMPOTENCY_KEY_PATTERN = r"^[ -~]{1,255}$"
#: Job ids (and so list cursors, which are the last id of a page).
JOB_ID_PATTERN = r"^job_[0-9A-HJKMNP-TV-Z]{26}$"


def Priority_schema() -> dict[str, Any]:
    return {"type": "string", "enum": [p.value for p in Priority], "title": "Priority"}


class Links(BaseModel):
    self: str
    events: str
    cancel: str
    result: str
    deliveries: str | None = Field(default=None, description="Present when the job has a webhook.")


class StoredWebhook(BaseModel):
    url: str
    events: list[EventName]


class DeliveryAttempt(BaseModel):
    at: str
    duration_ms: float
    status_code: int | None
    error: str | None


class DeliveryResource(BaseModel):
    id: str = Field(description="The webhook-id header of every attempt of this delivery.")
    event: EventName
    url: str
    status: DeliveryStatus
    created_at: str
    next_attempt_at: str | None
    finished_at: str | None
    replays: int
    attempts: list[DeliveryAttempt]


class DeliveryList(BaseModel):
    items: list[DeliveryResource]


class DeadLetter(BaseModel):
    id: str
    job_id: str
    event: EventName
    url: str
    attempts: int
    last_error: str | None
    dead_at: str | None
    links: dict[str, str]


class DeadLetterList(BaseModel):
    items: list[DeadLetter]


class Replayed(BaseModel):
    id: str
    job_id: str
    status: DeliveryStatus
    links: dict[str, str]


class JobResource(BaseModel):
    model_config = ConfigDict(title="Job")

    id: str
    type: str
    status: JobStatus
    progress: Progress
    params: dict[str, Any]
    priority: Priority
    attempt: int = Field(ge=1)
    max_attempts: int = Field(ge=1)
    created_at: str
    started_at: str | None
    finished_at: str | None
    updated_at: str
    history: list[HistoryEntry]
    result: Any = None
    error: JobError | None
    webhook: StoredWebhook | None
    links: Links
    cancel_requested: bool


class JobTicket(JobResource):
    model_config = ConfigDict(title="JobTicket")

    token: str = Field(description="Read-only token for this job (Bearer header or ?token=).")
    token_expires_at: str


class JobList(BaseModel):
    items: list[JobResource]
    next_cursor: str | None


class JobTypeInfo(BaseModel):
    name: str
    description: str
    params_schema: dict[str, Any]
    timeout_s: float
    max_attempts: int
    priority: Priority
    result_formats: list[Literal["json", "csv"]]


class JobTypeList(BaseModel):
    items: list[JobTypeInfo]


class StreamToken(BaseModel):
    token: str
    expires_at: str


class Health(BaseModel):
    status: str
    redis: str | None = None
    workers: int | None = Field(default=None, description="Workers with a heartbeat in the last 30 s.")


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str | None = None


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None


MODELS: list[type[BaseModel]] = [
    JobResource, JobTicket, JobList, JobTypeList, StreamToken, Health, Problem,
    DeliveryList, DeadLetterList, Replayed, WebhookSpec,
]  # fmt: skip

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
    "429": "The tenant's submission rate, or its number of open event streams, is used up.",
    "503": "At capacity, or Redis unreachable.",
}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=ref)}}}


def _problems(*codes: str) -> dict[str, Any]:
    problem = {"application/problem+json": {"schema": {"$ref": REF.format(model="Problem")}}}
    return {code: {"description": PROBLEM_DESCRIPTIONS[code], "content": problem} for code in codes}


def _param(name: str, where: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema, "description": description}


JOB_ID = _param("job_id", "path", {"type": "string"}, "The job's id.", required=True)
TOKEN = _param("token", "query", {"type": "string"}, "A job or stream token (reads only).")
LAST_EVENT_ID = _param(
    "last_event_id", "query", {"type": "string"}, "Resume after this event id (or the Last-Event-ID header)."
)
READ_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"token": []}]


def build_openapi(registry: Registry) -> dict[str, Any]:
    _, definitions = models_json_schema([(m, "serialization") for m in MODELS], ref_template=REF)
    schemas = definitions["$defs"]
    # One variant per job type, so that the document says exactly which params each type takes.
    variants = []
    for jt in registry:
        params = jt.params.model_json_schema(ref_template=REF)
        for name, schema in params.pop("$defs", {}).items():
            schemas.setdefault(name, schema)
        name = f"Submission_{jt.name}"
        schemas[name] = {
            "type": "object",
            "title": f"Submission of a {jt.name!r} job",
            "properties": {
                "type": {"const": jt.name},
                "params": params,
                "priority": {"anyOf": [{"$ref": REF.format(model="Priority")}, {"type": "null"}]},
                "webhook": {"anyOf": [{"$ref": REF.format(model="WebhookSpec")}, {"type": "null"}]},
            },
            # params may be left out when the type needs none of them.
            "required": ["type", "params"] if params.get("required") else ["type"],
            "additionalProperties": False,
        }
        variants.append({"$ref": REF.format(model=name)})
    schemas["Submission"] = {"oneOf": variants, "discriminator": {"propertyName": "type"}}
    schemas.setdefault("Priority", Priority_schema())

    sse = {"text/event-stream": {"schema": {"type": "string"}}}
    paths: dict[str, Any] = {
        "/jobs": {
            "post": {
                "summary": "Submit a job",
                "operationId": "submitJob",
                "parameters": [
                    _param(
                        "Idempotency-Key",
                        "header",
                        {"type": "string", "maxLength": 255},
                        "Same key and body within 24 h returns the original job.",
                    ),
                ],
                "requestBody": {"required": True, "content": _json("Submission")},
                "responses": {
                    "202": {"description": "Accepted: the job's ticket.", "content": _json("JobTicket")},
                    **_problems("400", "401", "403", "413", "415", "422", "429", "503"),
                },
            },
            "get": {
                "summary": "List the tenant's jobs, newest first",
                "operationId": "listJobs",
                "security": READ_SECURITY,
                "parameters": [
                    _param("status", "query", {"type": "string", "enum": [s.value for s in JobStatus]}, "Filter."),
                    _param("type", "query", {"type": "string", "enum": [jt.name for jt in registry]}, "Filter."),
                    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 200}, "Page size."),
                    _param(
                        "cursor",
                        "query",
                        {"type": "string", "pattern": JOB_ID_PATTERN},
                        "next_cursor of the previous page.",
                    ),
                    TOKEN,
                ],
                "responses": {
                    "200": {"description": "A page of jobs.", "content": _json("JobList")},
                    **_problems("400", "401", "403"),
                },
            },
        },
        "/jobs/{job_id}": {
            "get": {
                "summary": "A job's status, progress and history",
                "operationId": "getJob",
                "security": READ_SECURITY,
                "parameters": [
                    JOB_ID,
                    _param(
                        "wait",
                        "query",
                        {"type": "number", "minimum": 0, "maximum": 60},
                        "Hold the request until the job changes or this many seconds pass.",
                    ),
                    _param("If-None-Match", "header", {"type": "string"}, "ETag of a version you have."),
                    TOKEN,
                ],
                "responses": {
                    "200": {"description": "The job.", "content": _json("JobResource")},
                    "304": {"description": "Not modified since the given ETag."},
                    **_problems("400", "401", "403", "404"),
                },
            }
        },
        "/jobs/{job_id}/cancel": {
            "post": {
                "summary": "Cancel a job",
                "operationId": "cancelJob",
                "parameters": [JOB_ID],
                "responses": {
                    "200": {"description": "Was queued: now cancelled.", "content": _json("JobResource")},
                    "202": {"description": "Running: cancellation requested.", "content": _json("JobResource")},
                    **_problems("401", "403", "404", "409"),
                },
            }
        },
        "/jobs/{job_id}/result": {
            "get": {
                "summary": "A completed job's result (JSON, or CSV where the type has one)",
                "operationId": "getResult",
                "security": READ_SECURITY,
                "parameters": [JOB_ID, TOKEN],
                "responses": {
                    "200": {
                        "description": "The result.",
                        "content": {"application/json": {"schema": {}}, "text/csv": {"schema": {"type": "string"}}},
                    },
                    **_problems("401", "403", "404", "406", "409"),
                },
            }
        },
        "/jobs/{job_id}/events": {
            "get": {
                "summary": "Server-Sent Events of one job (history, then live; ends after the terminal event)",
                "operationId": "jobEvents",
                "security": READ_SECURITY,
                "parameters": [
                    JOB_ID,
                    _param("Last-Event-ID", "header", {"type": "string"}, "Resume after this event id."),
                    LAST_EVENT_ID,
                    TOKEN,
                ],
                "responses": {
                    "200": {"description": "The event stream.", "content": sse},
                    "204": {"description": "The stream already ended (terminal event seen)."},
                    **_problems("400", "401", "403", "404", "410", "429", "503"),
                },
            }
        },
        "/events": {
            "get": {
                "summary": "Server-Sent Events of all the tenant's jobs (live, resumable)",
                "operationId": "tenantEvents",
                "security": READ_SECURITY,
                "parameters": [
                    _param("Last-Event-ID", "header", {"type": "string"}, "Resume after this event id."),
                    LAST_EVENT_ID,
                    TOKEN,
                ],
                "responses": {
                    "200": {"description": "The event stream.", "content": sse},
                    **_problems("400", "401", "403", "410", "429", "503"),
                },
            }
        },
        "/jobs/{job_id}/deliveries": {
            "get": {
                "summary": "The webhook deliveries of a job, with every attempt",
                "operationId": "jobDeliveries",
                "security": READ_SECURITY,
                "parameters": [JOB_ID, TOKEN],
                "responses": {
                    "200": {"description": "Deliveries, newest first.", "content": _json("DeliveryList")},
                    **_problems("401", "403", "404"),
                },
            }
        },
        "/webhooks/dead-letters": {
            "get": {
                "summary": "The tenant's deliveries that exhausted their retries",
                "operationId": "listDeadLetters",
                "parameters": [
                    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500}, "At most this many."),
                ],
                "responses": {
                    "200": {"description": "Dead letters.", "content": _json("DeadLetterList")},
                    **_problems("400", "401", "403"),
                },
            }
        },
        "/webhooks/dead-letters/{webhook_id}/replay": {
            "post": {
                "summary": "Try a dead letter again (fresh schedule, same webhook-id)",
                "operationId": "replayDeadLetter",
                "parameters": [_param("webhook_id", "path", {"type": "string"}, "The delivery's id.", required=True)],
                "responses": {
                    "202": {"description": "Queued for delivery.", "content": _json("Replayed")},
                    **_problems("401", "403", "404"),
                },
            }
        },
        "/job-types": {
            "get": {
                "summary": "The registered job types and their parameter schemas",
                "operationId": "listJobTypes",
                "security": READ_SECURITY,
                "parameters": [TOKEN],
                "responses": {
                    "200": {"description": "Job types.", "content": _json("JobTypeList")},
                    **_problems("401", "403"),
                },
            }
        },
        "/tokens": {
            "post": {
                "summary": "A short-lived read-only stream token for the tenant",
                "operationId": "createToken",
                "responses": {
                    "201": {"description": "The token.", "content": _json("StreamToken")},
                    **_problems("401", "403"),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "operationId": "healthz",
                "security": [],
                "responses": {"200": {"description": "The process runs.", "content": _json("Health")}},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: Redis answers (and, if asked, a worker is alive)",
                "operationId": "readyz",
                "security": [],
                "parameters": [
                    _param(
                        "require_workers",
                        "query",
                        {"type": "string", "enum": ["true", "false"]},
                        "Also answer 503 when no worker sent a heartbeat in the last 30 s.",
                    ),
                ],
                "responses": {
                    "200": {"description": "Ready.", "content": _json("Health")},
                    **_problems("503"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "security": [],
                "responses": {
                    "200": {"description": "Prometheus text format.", "content": {"text/plain": {}}},
                    **_problems("401"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {}}}},
            }
        },
    }
    for operations in paths.values():
        for operation in operations.values():
            # Unknown query parameters are refused everywhere (enforce_documented_query).
            operation["responses"].setdefault("400", _problems("400")["400"])
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Jobcast",
            "version": "1",
            "description": "Long-running jobs: submit, follow (poll, long-poll, Server-Sent Events), cancel.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "API key, or a job/stream token."},
                "token": {"type": "apiKey", "in": "query", "name": "token", "description": "Job or stream token."},
            },
        },
        "security": [{"bearer": []}],
    }


def documented_query_params(document: dict[str, Any]) -> dict[tuple[str, str], frozenset[str]]:
    """(METHOD, path template) -> the query parameters the document declares for it."""
    allowed = {}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            names = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
            # ?token= is a credential (the "token" security scheme), taken anywhere: on an endpoint
            # it cannot open, the answer is the 401/403 of API.md, not a 400.
            allowed[(method.upper(), path)] = frozenset(names | {"token"})
    return allowed


def enforce_documented_query(routes: list[BaseRoute], document: dict[str, Any]) -> list[BaseRoute]:
    """The routes, each refusing query parameters its operation does not declare (400): a typo
    such as ``?limt=5`` is an error to report, not an option to ignore silently."""
    allowed = documented_query_params(document)
    checked: list[BaseRoute] = []
    for route in routes:
        if not isinstance(route, Route) or route.methods is None:
            checked.append(route)
            continue
        per_method = {m: allowed[(m, route.path)] for m in route.methods if (m, route.path) in allowed}
        if "GET" in per_method:
            per_method["HEAD"] = per_method["GET"]
        checked.append(
            Route(route.path, _checking(route.endpoint, per_method), methods=sorted(route.methods), name=route.name)
        )
    return checked


def _checking(endpoint: Callable[[Request], Awaitable[Any]], per_method: dict[str, frozenset[str]]) -> Any:
    @functools.wraps(endpoint)
    async def checked(request: Request) -> Any:
        names = per_method.get(request.method)
        if names is not None:
            unknown = sorted(set(request.query_params.keys()) - names)
            if unknown:
                takes = ", ".join(sorted(names - {"token"})) or "none"
                raise BadRequest(
                    f"Unknown query parameter(s): {', '.join(map(repr, unknown))}. This endpoint takes: {takes}."
                )
        return await endpoint(request)

    return checked
