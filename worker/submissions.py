"""The rules a submission must pass before a job exists: the domain side of ``POST /jobs``.

:func:`accept_submission` takes the decoded JSON body and returns an :class:`AcceptedSubmission`
(validated params, effective priority, the webhook as stored, and the idempotency fingerprint), or
raises :class:`InvalidSubmission` naming every field that is wrong. It writes nothing, so the HTTP
layer can answer 422 knowing nothing changed.

The fingerprint is taken over the canonical validated submission, not the raw bytes: ``{"seconds":
0}`` and ``{"seconds": 0.0}``, or a priority left out and the type's default priority spelled out,
are the same submission and so replay the same job under one Idempotency-Key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from .models import Priority, Submission
from .settings import Settings
from .types import JobType, Registry
from .webhook_acceptance import WebhookRejected, accept_webhook

#: Integers beyond this lose precision in JavaScript clients; floats past it stay floats.
SAFE_INTEGER = 2**53
MAX_PARAMS_DEPTH = 64


#: At most this many errors are listed; the rest are counted (``omitted``). A hostile body can hold
#: a hundred thousand mistakes, and the answer must stay small.
MAX_ERRORS = 20
#: A name in an error's ``loc`` (a client's field name) is cut to this many characters.
MAX_LOC_NAME = 100


class InvalidSubmission(Exception):
    """The submission is well-formed JSON but wrong; ``errors`` has one entry per wrong field (the
    first :data:`MAX_ERRORS`, and ``omitted`` counts the others), each ``{"loc": [...], "msg": ...,
    "type": ...}`` with ``loc`` starting at ``"body"``."""

    def __init__(self, detail: str, errors: list[dict[str, Any]], omitted: int = 0) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.omitted = omitted

    @classmethod
    def from_pydantic(cls, exc: ValidationError, prefix: tuple[str | int, ...] = ("body",)) -> InvalidSubmission:
        found = exc.errors(include_url=False, include_context=False, include_input=False)
        errors = [
            {"loc": [*prefix, *(_short(part) for part in err["loc"])], "msg": err["msg"], "type": err["type"]}
            for err in found[:MAX_ERRORS]
        ]
        where = ", ".join(".".join(map(str, e["loc"])) + ": " + str(e["msg"]) for e in errors[:3])
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        detail = f"The request is invalid: {where}{more}. Fix the listed fields and send it again."
        return cls(detail, errors, omitted=len(found) - len(errors))


def _short(part: str | int) -> str | int:
    return part[:MAX_LOC_NAME] + "..." if isinstance(part, str) and len(part) > MAX_LOC_NAME else part


@dataclass(frozen=True, slots=True)
class AcceptedSubmission:
    job_type: JobType
    params: dict[str, Any]
    priority: Priority
    webhook: dict[str, Any] | None
    fingerprint: str


async def accept_submission(
    body: dict[str, Any], *, tenant: str, registry: Registry, settings: Settings
) -> AcceptedSubmission:
    try:
        submission = Submission.model_validate(body)
    except ValidationError as exc:
        raise InvalidSubmission.from_pydantic(exc) from None
    jt = registry.get(submission.type)
    if jt is None:
        known = ", ".join(t.name for t in registry)
        raise InvalidSubmission(
            f"Unknown job type {submission.type[:100]!r}. Registered types: {known} (GET /job-types describes them).",
            [{"loc": ["body", "type"], "msg": f"unknown job type; one of: {known}", "type": "job_type"}],
        )
    if nesting_depth(submission.params) > MAX_PARAMS_DEPTH:
        raise InvalidSubmission(
            f"params nest deeper than {MAX_PARAMS_DEPTH} levels; flatten them.",
            [{"loc": ["body", "params"], "msg": f"nested deeper than {MAX_PARAMS_DEPTH}", "type": "depth"}],
        )
    try:
        # Strict, as JSON: "5" is not a number (but an ISO string is a datetime). JSON Schema counts
        # 3.0 as an integer, so integral floats are passed as integers.
        params_json = orjson.dumps(integral_floats_as_ints(submission.params))
        params = jt.params.model_validate_json(params_json, strict=True).model_dump(mode="json")
    except ValidationError as exc:
        raise InvalidSubmission.from_pydantic(exc, prefix=("body", "params")) from None
    webhook = None
    if submission.webhook is not None:
        try:
            webhook = await accept_webhook(submission.webhook, tenant, settings)
        except WebhookRejected as exc:
            loc = ["body", "webhook", *([exc.field] if exc.field else [])]
            raise InvalidSubmission(str(exc), [{"loc": loc, "msg": str(exc), "type": "webhook"}]) from None
    priority = submission.priority or jt.priority
    canonical = {"type": jt.name, "params": params, "priority": priority.value, "webhook": webhook}
    fingerprint = hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return AcceptedSubmission(jt, params, priority, webhook, fingerprint)


def nesting_depth(value: Any, limit: int = MAX_PARAMS_DEPTH + 1) -> int:
    """How deep ``value`` nests, counting no further than ``limit`` (no recursion limit to hit)."""
    depth, level = 0, [value]
    while level and depth < limit:
        depth += 1
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item if isinstance(item, list) else ())
            if isinstance(child, dict | list)
        ]
    return depth


def integral_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= SAFE_INTEGER:
        return int(value)
    if isinstance(value, dict):
        return {k: integral_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral_floats_as_ints(v) for v in value]
    return value
