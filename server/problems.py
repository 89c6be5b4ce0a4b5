"""Errors as RFC 9457 problem details: routes raise, the handlers here answer.

    Problem                    any 4xx/5xx answer, with title, detail (what is wrong and how to fix it)
     ├── BadRequest            400: malformed JSON, query parameter or header
     ├── Unauthorized          401: missing or wrong credentials (adds WWW-Authenticate: Bearer)
     ├── Forbidden             403: a token used beyond its scope
     ├── NotFound              404: unknown job, or another tenant's (never 403: that would leak ids)
     ├── Conflict              409: the job's status does not allow this (yet)
     ├── GoneProblem           410: a Last-Event-ID older than the (capped) event log
     ├── PayloadTooLarge       413
     ├── ValidationFailed      422: the body is well-formed but wrong; ``errors`` lists each field
     ├── UpgradeRequired       426: a plain HTTP request to the WebSocket endpoint
     ├── TooManyRequests       429: the tenant's submission rate is used up (Retry-After, RateLimit)
     ├── HeaderTooLarge        431: a request head over the limit (answered by jobcast.http_guard)
     └── Unavailable           503: at capacity or Redis away; with Retry-After

A client that hangs up mid-upload (Starlette's ``ClientDisconnect``) is one INFO line, not an error.
Anything else that escapes a route is logged with its traceback and answered as a bare 500
problem: no stack trace ever reaches a client.

A problem's ``type`` is the relative URI ``/problems/<slug>``: this server answers ``GET`` on it
with the type's status, title and description (:data:`PROBLEM_TYPES`), and docs/API.md lists them.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from jobcast.worker.archive import ArchiveUnavailable

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "/problems/"


class Problem(Exception):
    """An unexpected error on the server's side; it is logged with its traceback."""

    status = 500
    title = "Internal Server Error"
    slug = "internal"

    def __init__(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.errors = errors
        self.extra = extra

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": TYPE_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        body.update(self.extra)
        return body


class BadRequest(Problem):
    """The request is malformed: a query parameter, header, cursor or body that cannot be read. The detail names it."""

    status, title, slug = 400, "Bad Request", "bad-request"


class Unauthorized(Problem):
    """No credentials, or credentials that are not valid: send 'Authorization: Bearer <API key>' (or a job or stream
    token where reads allow one).
    """

    status, title, slug = 401, "Unauthorized", "unauthorized"

    def __init__(self, detail: str, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.headers.setdefault("WWW-Authenticate", 'Bearer realm="jobcast"')


class Forbidden(Problem):
    """The credentials are valid but do not reach this: a read-only token used to write, or a job token used beyond its
    job.
    """

    status, title, slug = 403, "Forbidden", "forbidden"


class NotFound(Problem):
    """No such resource for this tenant: an unknown job (or another tenant's: ids are never confirmed across tenants),
    or an unknown path.
    """

    status, title, slug = 404, "Not Found", "not-found"


class NotAcceptable(Problem):
    """The resource has no representation of the media type the Accept header asks for."""

    status, title, slug = 406, "Not Acceptable", "not-acceptable"


class Conflict(Problem):
    """The job's status does not allow this (yet): a result before completion, or cancelling a finished job.
    'job_status' says where it is.
    """

    status, title, slug = 409, "Conflict", "conflict"


class GoneProblem(Problem):
    """The Last-Event-ID is older than the event log keeps: reload the state and reconnect without it."""

    status, title, slug = 410, "Gone", "gone"


class PayloadTooLarge(Problem):
    """The request body is larger than 1 MiB."""

    status, title, slug = 413, "Content Too Large", "payload-too-large"


class UnsupportedMediaType(Problem):
    """The body is not sent as JSON ('Content-Type: application/json')."""

    status, title, slug = 415, "Unsupported Media Type", "unsupported-media-type"


class UpgradeRequired(Problem):
    """GET /ws is a WebSocket: open it with a WebSocket client (the Upgrade: websocket handshake), not a plain HTTP
    request.
    """

    status, title, slug = 426, "Upgrade Required", "upgrade-required"

    def __init__(self, detail: str, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.headers.setdefault("Upgrade", "websocket")
        self.headers.setdefault("Connection", "Upgrade")


class ValidationFailed(Problem):
    """The body is well-formed JSON but wrong: 'errors' lists each field (loc, msg, type), the first 20 of them;
    'errors_omitted' counts the others.
    """

    status, title, slug = 422, "Unprocessable Content", "validation"
    max_errors = 20

    def __init__(self, detail: str, *, errors: list[dict[str, Any]], omitted: int = 0, **kwargs: Any) -> None:
        omitted += max(0, len(errors) - self.max_errors)
        if omitted:
            kwargs["errors_omitted"] = omitted
        super().__init__(detail, errors=errors[: self.max_errors], **kwargs)


class TooManyRequests(Problem):
    """The tenant's submission rate, or its number of open event streams, is used up; Retry-After says when to try
    again.
    """

    status, title, slug = 429, "Too Many Requests", "rate-limited"


class HeaderTooLarge(Problem):
    """The request head (request line and headers) is larger than this server accepts (64 KiB unless configured);
    the connection is closed. Send fewer or shorter headers.
    """

    status, title, slug = 431, "Request Header Fields Too Large", "header-too-large"


class Unavailable(Problem):
    """At capacity, or the job store (Redis) or the archive (SQL) does not answer; Retry-After says
    when to try again."""

    status, title, slug = 503, "Service Unavailable", "unavailable"

    def __init__(self, detail: str, *, retry_after: int = 5, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.headers.setdefault("Retry-After", str(retry_after))


#: The answer to a request the server's shutdown cut short.
SHUT_DOWN = Unavailable(
    "This server process stopped before it could answer. Send the request again (another process answers).",
    retry_after=1,
)


def cut_short(method: str, path: str) -> Problem:
    """The answer to a request the server's shutdown cancelled (its graceful-shutdown timeout
    passed), after one WARNING line: nothing failed but the wait."""
    logger.warning("%s %s: cut short by the server's shutdown (its graceful-shutdown timeout passed)", method, path)
    return SHUT_DOWN


def problem_response(problem: Problem) -> Response:
    return Response(
        orjson.dumps(problem.body()),
        status_code=problem.status,
        headers=problem.headers,
        media_type=PROBLEM_JSON,
    )


async def handle_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(exc)


class MethodNotAllowed(Problem):
    """This method is not allowed on this path; the Allow header lists the ones that are."""

    status, title, slug = 405, "Method Not Allowed", "method-not-allowed"


HTTP_PROBLEMS: dict[int, tuple[type[Problem], str]] = {
    404: (NotFound, "No such resource. The endpoints are listed at /openapi.json (e.g. POST /jobs, GET /jobs/{id})."),
    405: (MethodNotAllowed, "This method is not allowed on this path; see the Allow header for the ones that are."),
}


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    known = HTTP_PROBLEMS.get(exc.status_code)
    if known is not None:
        cls, detail = known
        return problem_response(cls(detail, headers=dict(exc.headers or {})))
    # Starlette raises nothing else today; should it, the problem type of that status answers, or
    # the generic one (a documented type either way), with Starlette's own words as the detail.
    cls = next((c for c in _with_subclasses(Problem) if c.status == exc.status_code), BadRequest)
    problem = cls(str(exc.detail), headers=dict(exc.headers or {}))
    problem.status = exc.status_code
    return problem_response(problem)


async def handle_redis_error(request: Request, exc: Exception) -> Response:
    logger.warning("Redis unavailable during %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        Unavailable("The job store (Redis) is not reachable right now. Retry after the indicated delay.")
    )


async def handle_client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up while sending its body: nothing went wrong here, and nobody will read the answer."""
    logger.info(
        "client closed the connection during %s %s before its body was complete", request.method, request.url.path
    )
    return problem_response(BadRequest("The connection was closed before the request body was complete."))


async def handle_archive_unavailable(request: Request, exc: Exception) -> Response:
    # The message names the archive's URL (password masked) and the fix; it stays in the log.
    logger.warning("archive unavailable during %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        Unavailable("The job archive (SQL) is not reachable right now. Retry after the indicated delay.")
    )


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return problem_response(Problem("An unexpected error occurred; it has been logged. Try again later."))


def _with_subclasses(cls: type[Problem]) -> list[type[Problem]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _with_subclasses(child))]


def _problem_types() -> dict[str, dict[str, object]]:
    classes = _with_subclasses(Problem)
    return {
        cls.slug: {
            "type": TYPE_BASE + cls.slug,
            "status": cls.status,
            "title": cls.title,
            "description": " ".join((cls.__doc__ or cls.title).split()),
        }
        for cls in sorted(classes, key=lambda c: c.status)
    }


#: What ``GET /problems/<slug>`` answers, for every problem type this server raises.
PROBLEM_TYPES = _problem_types()


EXCEPTION_HANDLERS = {
    Problem: handle_problem,
    HTTPException: handle_http_exception,
    ClientDisconnect: handle_client_gone,
    RedisError: handle_redis_error,
    ArchiveUnavailable: handle_archive_unavailable,
    OSError: handle_redis_error,
    Exception: handle_unexpected,
}
