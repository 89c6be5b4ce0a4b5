"""The frames of ``GET /ws``: one JSON text message each, as pydantic models.

The client's frames are parsed with these models (a discriminated union on ``op``); the server's
are written as plain dicts of the same shape (the event frame by :mod:`jobcast.ws.source`, which
splices the stored event data in as it is). Both sets of models are what the AsyncAPI document
publishes (:mod:`jobcast.asyncapi`), and the tests validate every frame they receive against it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from jobcast.worker.models import EventName, JobStatus

from ..problems import BadRequest, PayloadTooLarge, Problem
from ..resources import JOB_ID_PATTERN, EventData
from ..streamids import ID_RE as STREAM_ID_RE
from ..streamids import valid as valid_stream_id

#: A client frame larger than this is answered with a 413 error frame (the socket stays open).
MAX_FRAME_CHARS = 16 * 1024
CHANNEL_PATTERN = r"^(tenant|job:" + JOB_ID_PATTERN.removeprefix("^")[:-1] + r")$"
TENANT = "tenant"
JOB_PREFIX = "job:"

Ref = Annotated[
    str, Field(min_length=1, max_length=128, description="Chosen by the client; echoed in the reply to this frame.")
]
Channel = Annotated[
    str, Field(pattern=CHANNEL_PATTERN, description='"tenant" (the tenant\'s feed) or "job:<job id>" (one job).')
]


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Subscribe(_Frame):
    """Follow a channel: a job's events (its history first, without ``last_event_id``), or the tenant's
    feed (live, without ``last_event_id``)."""

    op: Literal["subscribe"]
    ref: Ref
    channel: Channel
    last_event_id: str | None = Field(
        default=None,
        pattern=STREAM_ID_RE.pattern,
        description="Resume after this event id of this channel (the id of the last event frame received on it).",
    )


class Unsubscribe(_Frame):
    """Stop following a channel (answered ok even if it was not followed)."""

    op: Literal["unsubscribe"]
    ref: Ref
    channel: Channel


class Cancel(_Frame):
    """Cancel a job, as ``POST /jobs/{id}/cancel``; needs the API key."""

    op: Literal["cancel"]
    ref: Ref
    job_id: str = Field(max_length=64)


class Ping(_Frame):
    """Answered with a pong."""

    op: Literal["ping"]
    ref: Ref


ClientFrame = Annotated[Subscribe | Unsubscribe | Cancel | Ping, Field(discriminator="op")]
CLIENT_FRAME: TypeAdapter[Subscribe | Unsubscribe | Cancel | Ping] = TypeAdapter(ClientFrame)


class Ok(_Frame):
    """The request of the frame with this ``ref`` was done."""

    op: Literal["ok"]
    ref: str
    status: JobStatus | None = Field(
        default=None,
        description="cancel only: the job's status after the request (processing: cancellation requested).",
    )
    last_event_id: str | None = Field(
        default=None,
        description="subscribe to the tenant feed without last_event_id only: the feed's position when the "
        "subscription started (absent while the tenant has no events). Resume from it if no event came since.",
    )


class Pong(_Frame):
    """The answer to a ping."""

    op: Literal["pong"]
    ref: str


class ErrorFrame(_Frame):
    """The request of the frame with this ``ref`` failed (``ref`` is null when the frame could not be read).
    The other fields are those of the problem details an HTTP request would get; the socket stays open."""

    op: Literal["error"]
    ref: str | None
    type: str = Field(description="/problems/<slug>, as in HTTP answers.")
    title: str
    status: int = Field(
        description=(
            "As over HTTP. For a subscribe with last_event_id, as the channel's SSE stream answers its "
            "Last-Event-ID: 400 when the id is ahead of the channel's newest event (not an id it sent); 410 "
            "when events after it were trimmed from the log, or when a Redis failover lost it (the detail "
            "says which): reload the state with GET /jobs and subscribe without last_event_id."
        )
    )
    detail: str
    errors: list[dict[str, Any]] | None = None
    job_status: JobStatus | None = Field(default=None, description="On a 409 for cancel: the job's status.")


class EventFrame(_Frame):
    """One event of a subscribed channel: ``id``, ``event`` and ``data`` exactly as the SSE stream of
    that channel sends them, in the same order."""

    op: Literal["event"]
    channel: Channel
    id: str = Field(pattern=STREAM_ID_RE.pattern, description="The event's id in this channel's log.")
    event: EventName
    data: EventData


class End(_Frame):
    """A job channel after its terminal event: nothing more will come; the channel is unsubscribed."""

    op: Literal["end"]
    channel: Channel


#: The models the AsyncAPI document publishes, by op.
CLIENT_MODELS: dict[str, type[BaseModel]] = {
    "subscribe": Subscribe,
    "unsubscribe": Unsubscribe,
    "cancel": Cancel,
    "ping": Ping,
}
SERVER_MODELS: dict[str, type[BaseModel]] = {
    "ok": Ok,
    "pong": Pong,
    "error": ErrorFrame,
    "event": EventFrame,
    "end": End,
}


def _ref_of(value: Any) -> str | None:
    if isinstance(value, dict):
        ref = value.get("ref")
        if isinstance(ref, str) and 0 < len(ref) <= 128:
            return ref
    return None


def parse(text: str) -> tuple[Subscribe | Unsubscribe | Cancel | Ping | None, str | None, Problem | None]:
    """One client frame: (the frame, its ref, None), or (None, the ref if readable, the problem)."""
    if len(text) > MAX_FRAME_CHARS:
        return (
            None,
            None,
            PayloadTooLarge(f"A frame may be at most {MAX_FRAME_CHARS} characters; this one is {len(text)}."),
        )
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None, None, BadRequest('A frame must be one JSON object, such as {"op":"ping","ref":"1"}.')
    ref = _ref_of(raw)
    if not isinstance(raw, dict):
        return None, None, BadRequest('A frame must be one JSON object, such as {"op":"ping","ref":"1"}.')
    op = raw.get("op")
    if not isinstance(op, str) or op not in CLIENT_MODELS:
        shown = repr(op)[:40] if op is not None else "missing"
        return None, ref, BadRequest(f"Unknown op ({shown}); the ops are: {', '.join(CLIENT_MODELS)}.")
    try:
        frame = CLIENT_FRAME.validate_python(raw)
    except ValidationError as exc:
        errors = [
            {"loc": [str(p) for p in e["loc"][1:]], "msg": e["msg"][:200], "type": e["type"]} for e in exc.errors()[:10]
        ]
        where = ", ".join(".".join(e["loc"]) or "frame" for e in errors)
        return (
            None,
            ref,
            BadRequest(f"The {op} frame is not valid ({where}); 'errors' lists each field.", errors=errors),
        )
    if isinstance(frame, Subscribe) and frame.last_event_id is not None and not valid_stream_id(frame.last_event_id):
        return (
            None,
            ref,
            BadRequest(f"last_event_id {frame.last_event_id!r} is not an event id (ids look like '1732896301123-0')."),
        )
    return frame, ref, None


def ok(ref: str, **extra: str) -> str:
    return orjson.dumps({"op": "ok", "ref": ref, **extra}).decode()


def pong(ref: str) -> str:
    return orjson.dumps({"op": "pong", "ref": ref}).decode()


def error(ref: str | None, problem: Problem) -> str:
    return orjson.dumps({"op": "error", "ref": ref, **problem.body()}).decode()


def end(channel: str) -> str:
    return orjson.dumps({"op": "end", "channel": channel}).decode()
