"""The job domain's vocabulary: statuses, priorities, event names and the wire models.

Status values and event names are those of docs/API.md; they are spelled here once and nowhere else.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, UrlConstraints, field_validator


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


#: The statuses a job never leaves. Every other terminal set (events, the Lua prelude, the client,
#: the dashboard's) is derived from this one.
TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class EventName(StrEnum):
    QUEUED = "job.queued"
    PROCESSING = "job.processing"
    PROGRESS = "job.progress"
    RETRYING = "job.retrying"
    COMPLETED = "job.completed"
    FAILED = "job.failed"
    CANCELLED = "job.cancelled"

    @classmethod
    def entering(cls, status: JobStatus) -> EventName:
        """The event a job's entering ``status`` emits (``job.<status>``)."""
        return cls(f"job.{status.value}")


#: The events that end a job, one per terminal status (as strings they compare equal to the wire names).
TERMINAL_EVENTS = tuple(EventName.entering(status) for status in JobStatus if status.terminal)


class DeliveryStatus(StrEnum):
    """Where a webhook delivery is: waiting for its next attempt, or one of its three ends."""

    PENDING = "pending"
    DELIVERED = "delivered"
    #: Exhausted its schedule, or its destination was refused: in the dead-letter list, replayable.
    DEAD = "dead"
    #: The receiver answered 410 Gone: not retried, and nothing more is sent for the job.
    GONE = "gone"


def job_links(job_id: str) -> dict[str, str]:
    """A job's links, as the job resource and webhook bodies give them."""
    base = f"/jobs/{job_id}"
    return {"self": base, "events": base + "/events", "cancel": base + "/cancel", "result": base + "/result"}


class WebhookSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Annotated[
        AnyHttpUrl,
        UrlConstraints(max_length=2048),
        # No user:password@ (refused at submission, see worker.webhooks): said in the schema too.
        Field(json_schema_extra={"pattern": r"^https?://[^/?#@\s]+([/?#]\S*)?$"}),
    ]
    # At most one entry per event name: the length is checked before any entry, so a body of a
    # hundred thousand names costs nothing to refuse.
    events: list[EventName] = Field(
        default_factory=lambda: list(TERMINAL_EVENTS), min_length=1, max_length=len(EventName)
    )


class Submission(BaseModel):
    """The body of ``POST /jobs``."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=100)
    params: dict[str, Any] = Field(default_factory=dict)
    priority: Priority | None = None
    webhook: WebhookSpec | None = None

    @field_validator("type")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()


class JobError(BaseModel):
    """What went wrong in an attempt, kept on the job."""

    type: str
    message: str
    retryable: bool
    attempt: int


#: Decimals of a progress percent on the wire: 4.166666666666667 travels as 4.17.
PERCENT_DECIMALS = 2


def transport_percent(percent: float) -> float:
    """A progress percent as it is stored and sent: rounded, and never 100 before the work is."""
    rounded = round(float(percent), PERCENT_DECIMALS)
    return 100 - 10**-PERCENT_DECIMALS if rounded >= 100 > percent else rounded


class Progress(BaseModel):
    percent: float = Field(default=0.0, ge=0, le=100, description="0 to 100, rounded to two decimals.")
    eta: str | None = Field(
        default=None,
        description=(
            "When the job is expected to finish (RFC 3339), estimated by the worker from the progress "
            "rate so far; null until there is enough signal, and once the job is no longer running."
        ),
    )
    # Left out of the JSON until the job reports them (never sent as null).
    step: str | None = Field(default=None, exclude_if=lambda value: value is None)
    message: str | None = Field(default=None, exclude_if=lambda value: value is None)


class HistoryEntry(BaseModel):
    status: JobStatus
    at: str
    attempt: int


ResultFormat = Literal["json", "csv"]

#: Whose events: one job's (its log, its stream) or a whole tenant's (the feed).
Audience = Literal["job", "tenant"]
#: What a submission came to (Store.create).
CreateOutcome = Literal["created", "existing", "conflict", "full", "tenant_full"]
#: What a cancel request came to (Store.cancel): was queued and is now cancelled; running, asked to
#: stop; already finished; no such job for the tenant.
CancelOutcome = Literal["cancelled", "requested", "terminal", "missing"]
#: Why a delivery is a dead letter: its attempts failed (or were refused), or it was not sent
#: because its destination is disabled for the tenant.
DeadLetterReason = Literal["failed", "disabled"]
#: A webhook destination's state for one tenant.
DestinationState = Literal["enabled", "disabled"]
#: Why a pending delivery's next attempt is later than planned.
#: (``rate_home_unreachable``: with several cells, the cell that keeps its destination's rate did not
#: answer; it asks again shortly.)
WaitReason = Literal["rate_limit", "retry_after", "destination_busy", "rate_home_unreachable"]
