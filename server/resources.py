"""The resources the API answers with: one pydantic model per wire shape.

Each model here is both what a route renders (a stored record is validated into it and serialized
by pydantic-core) and what the OpenAPI document publishes (:mod:`jobcast.openapi` builds its
schemas from these classes), so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from jobcast.worker.models import (
    DeadLetterReason,
    DeliveryStatus,
    DestinationState,
    EventName,
    HistoryEntry,
    JobError,
    JobStatus,
    Priority,
    Progress,
    ResultFormat,
    WaitReason,
    WebhookSpec,
    job_links,
)
from jobcast.worker.records import JobRecord

#: Idempotency keys: printable ASCII (they travel in a header).
IDEMPOTENCY_KEY_PATTERN = r"^[ -~]{1,255}$"
#: Job ids (and so list cursors, which are the last id of a page).
JOB_ID_PATTERN = r"^job_[0-9A-HJKMNP-TV-Z]{26}$"
#: Seconds a client polling an unfinished job is asked to wait (Retry-After).
POLL_HINT_S = "1"


class Links(BaseModel):
    self: str
    events: str
    cancel: str
    result: str
    deliveries: str | None = Field(
        default=None, description="Present when the job has a webhook.", exclude_if=lambda value: value is None
    )


class StoredWebhook(BaseModel):
    url: str
    events: list[EventName]


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
    destination: str | None = Field(description="The URL's scheme://host:port, whose rate and health apply.")
    wait_reason: WaitReason | None = Field(
        description="While pending: why next_attempt_at is later than planned (the destination's rate, "
        "a receiver's Retry-After, all its slots busy, or the cell keeping the destination's rate not "
        "answering); null otherwise."
    )
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
    reason: DeadLetterReason = Field(
        description="failed: its attempts failed; disabled: not sent, its destination was disabled."
    )
    dead_at: str | None
    links: dict[str, str]


class DeadLetterList(BaseModel):
    items: list[DeadLetter]


class Destination(BaseModel):
    destination: str = Field(description="scheme://host:port")
    state: DestinationState
    consecutive_failures: int
    failing_since: str | None = Field(description="Start of the current streak of failures.")
    last_success_at: str | None
    last_failure_at: str | None
    last_error: str | None
    disabled_at: str | None
    delivered: int = Field(description="Successful attempts (2xx, or 410) for this tenant.")
    failed: int = Field(description="Failed attempts for this tenant.")
    rate: str = Field(description="N/S: at most N deliveries per S seconds (all tenants together).")
    paused_until: str | None = Field(description="Set by a receiver's Retry-After: nothing is sent before.")
    links: dict[str, str]


class DestinationList(BaseModel):
    items: list[Destination]


class Replayed(BaseModel):
    id: str
    job_id: str
    status: DeliveryStatus
    links: dict[str, str]


class JobTypeInfo(BaseModel):
    name: str
    description: str
    params_schema: dict[str, Any]
    timeout_s: float
    max_attempts: int
    priority: Priority
    result_formats: list[ResultFormat]


class JobTypeList(BaseModel):
    items: list[JobTypeInfo]


class StreamToken(BaseModel):
    token: str
    expires_at: str


class Health(BaseModel):
    status: str
    redis: str | None = None
    workers: int | None = Field(default=None, description="Workers with a heartbeat in the last 30 s.")


class OverviewEvent(BaseModel):
    """The data of an ``overview`` event of ``GET /events``: the dashboard's live header."""

    model_config = ConfigDict(title="Overview")

    counts: dict[JobStatus, int] = Field(description="The tenant's jobs by status (finished ones while kept).")
    workers: int = Field(description="Workers with a heartbeat in the last 30 s.")
    queue_depth: int = Field(description="Jobs waiting for a worker, across the service (a number only).")
    at: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str | None = None


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field(description="A relative URI, /problems/<slug>, that this server documents (GET it).")
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = Field(default=None, description="422: the first 20 wrong fields.")
    errors_omitted: int | None = Field(default=None, description="422: how many more were wrong than listed.")


class ProblemType(BaseModel):
    """What ``GET /problems/<slug>`` answers: one problem type."""

    type: str
    status: int
    title: str
    description: str


class EventData(BaseModel):
    """The ``data`` of one job event (SSE ``data:`` line, WebSocket event frame). Written by the
    state-machine script, not rendered from this model: the tests check real events against it."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    type: str = Field(description="The job's type (not the event name).")
    status: JobStatus = Field(description="The job's status after the event.")
    attempt: int = Field(ge=1)
    progress: Progress
    at: str = Field(description="When it happened (RFC 3339).")
    result: Any = Field(default=None, description="job.completed: the result, when its JSON is at most 4,096 bytes.")
    result_url: str | None = Field(default=None, description="job.completed: instead of result when that is larger.")
    error: JobError | None = Field(default=None, description="job.failed and job.retrying: the failed attempt's error.")
    retry_in_s: float | None = Field(
        default=None, description="job.retrying: seconds until the next attempt may start."
    )


class WebhookData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    status: JobStatus
    links: dict[str, str] = Field(
        description="The job's self, events, cancel and result links (absolute with JOBCAST_PUBLIC_URL)."
    )
    progress: Progress | None = Field(default=None, description="job.progress deliveries: the job's progress.")


class WebhookBody(BaseModel):
    """The body of a webhook delivery (Standard Webhooks), the same bytes on every attempt."""

    model_config = ConfigDict(extra="forbid")

    type: EventName
    timestamp: str = Field(description="When the event happened (RFC 3339), not when it was sent.")
    data: WebhookData


#: Every model the OpenAPI document publishes as a component schema.
MODELS: list[type[BaseModel]] = [
    JobResource, JobTicket, JobList, JobTypeList, StreamToken, Health, Problem,
    DeliveryList, DeadLetterList, Replayed, WebhookSpec, ProblemType, OverviewEvent, Destination,
    DestinationList,
]  # fmt: skip


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = data.model_dump_json().encode() if isinstance(data, BaseModel) else orjson.dumps(data)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def redact_url(url: str) -> str:
    """A webhook URL as token readers see it: its origin only. Paths and queries of webhook URLs
    often carry a credential (``/services/T0/B0/secret``, ``?sig=``); the origin says where
    deliveries go."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/[redacted]"


def job_resource(record: JobRecord, *, redact_webhook: bool = False, **extra: Any) -> JobResource:
    """The job resource of a stored record (a :class:`JobTicket` when ``extra`` holds its token);
    with ``redact_webhook``, as a token reader sees it (:func:`redact_url`)."""
    links = job_links(record.id)
    webhook = record.webhook
    if webhook is not None and redact_webhook:
        webhook = {**webhook, "url": redact_url(webhook["url"])}
    if record.webhook is not None:
        links["deliveries"] = f"/jobs/{record.id}/deliveries"
    model = JobTicket if "token" in extra else JobResource
    return model.model_validate(
        {
            "id": record.id,
            "type": record.type,
            "status": record.status,
            "progress": record.progress,
            "params": record.params,
            "priority": record.priority,
            "attempt": record.attempt,
            "max_attempts": record.max_attempts,
            "created_at": record.created_at,
            "started_at": record.started_at,
            "finished_at": record.finished_at,
            "updated_at": record.updated_at,
            "history": record.history,
            "result": record.result,
            "error": record.error,
            "webhook": webhook,
            "links": links,
            "cancel_requested": record.cancel_requested,
            **extra,
        }
    )


def etag(record: JobRecord) -> str:
    return f'"{record.id}-{record.version}"'


def matching_etags(request: Request) -> set[str]:
    """The entity tags of If-None-Match (weak ones compared as strong: a job version is exact)."""
    header = request.headers.get("if-none-match")
    if not header:
        return set()
    return {part.strip().removeprefix("W/") for part in header.split(",")}


def render_job(
    record: JobRecord,
    request: Request,
    status: int = 200,
    extra: dict[str, Any] | None = None,
    *,
    redact_webhook: bool = False,
) -> Response:
    """One job as a response: ETag and no-cache, a poll hint while it runs, 304 for a version the
    client already has (plain reads only)."""
    tag = etag(record)
    headers = {"ETag": tag, "Cache-Control": "no-cache"}
    if not record.terminal:
        headers["Retry-After"] = POLL_HINT_S
    if status == 200 and extra is None and tag in matching_etags(request):
        return Response(status_code=304, headers=headers)
    return json_response(job_resource(record, redact_webhook=redact_webhook, **(extra or {})), status, headers)
