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
     ├── TooManyRequests       429: the tenant's submission rate is used up (Retry-After, RateLimit)
     └── Unavailable           503: at capacity or Redis away; with Retry-After

Anything else that escapes a route is logged with its traceback and answered as a bare 500
problem: no stack trace ever reaches a client.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://jobcast.dev/problems/"


class Problem(Exception):
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
    status, title, slug = 400, "Bad Request", "bad-request"


class Unauthorized(Problem):
    status, title, slug = 401, "Unauthorized", "unauthorized"

    def __init__(self, detail: str, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.headers.setdefault("WWW-Authenticate", 'Bearer realm="jobcast"')


class Forbidden(Problem):
    status, title, slug = 403, "Forbidden", "forbidden"


class NotFound(Problem):
    status, title, slug = 404, "Not Found", "not-found"


class NotAcceptable(Problem):
    status, title, slug = 406, "Not Acceptable", "not-acceptable"


class Conflict(Problem):
    status, title, slug = 409, "Conflict", "conflict"


class GoneProblem(Problem):
    status, title, slug = 410, "Gone", "gone"


class PayloadTooLarge(Problem):
    status, title, slug = 413, "Content Too Large", "payload-too-large"


class UnsupportedMediaType(Problem):
    status, title, slug = 415, "Unsupported Media Type", "unsupported-media-type"


class ValidationFailed(Problem):
    status, title, slug = 422, "Unprocessable Content", "validation"

    @classmethod
    def from_pydantic(cls, exc: ValidationError, *, prefix: tuple[str | int, ...] = ("body",)) -> ValidationFailed:
        errors = [{"loc": [*prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]} for err in exc.errors()]
        where = ", ".join(".".join(map(str, e["loc"])) + ": " + str(e["msg"]) for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        return cls(f"The request is invalid: {where}{more}. Fix the listed fields and send it again.", errors=errors)


class TooManyRequests(Problem):
    status, title, slug = 429, "Too Many Requests", "rate-limited"


class Unavailable(Problem):
    status, title, slug = 503, "Service Unavailable", "unavailable"

    def __init__(self, detail: str, *, retry_after: int = 5, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.headers.setdefault("Retry-After", str(retry_after))


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


HTTP_DETAILS = {
    404: "No such resource. The endpoints are listed in API.md (e.g. POST /jobs, GET /jobs/{id}).",
    405: "This method is not allowed on this path; see the Allow header for the ones that are.",
}


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    problem = Problem(HTTP_DETAILS.get(exc.status_code, str(exc.detail)), headers=dict(exc.headers or {}))
    problem.status = exc.status_code
    problem.title = str(exc.detail) if exc.status_code not in HTTP_DETAILS else _reason(exc.status_code)
    problem.slug = "http-" + str(exc.status_code)
    return problem_response(problem)


def _reason(status: int) -> str:
    from http import HTTPStatus

    return HTTPStatus(status).phrase


async def handle_redis_error(request: Request, exc: Exception) -> Response:
    logger.warning("Redis unavailable during %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        Unavailable("The job store (Redis) is not reachable right now. Retry after the indicated delay.")
    )


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return problem_response(Problem("An unexpected error occurred; it has been logged. Try again later."))


EXCEPTION_HANDLERS = {
    Problem: handle_problem,
    HTTPException: handle_http_exception,
    RedisError: handle_redis_error,
    OSError: handle_redis_error,
    Exception: handle_unexpected,
}
