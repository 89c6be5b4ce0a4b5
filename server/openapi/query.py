"""Query parameters an operation does not declare are refused (400), not ignored."""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from ..problems import BadRequest

CONVERTOR_RE = re.compile(r":[a-z]+}")


def documented_query_params(document: dict[str, Any]) -> dict[tuple[str, str], frozenset[str]]:
    """(METHOD, path template) -> the query parameters the document declares for it."""
    allowed = {}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            names = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
            # ?token= is a credential (the "token" security scheme), taken anywhere: on an endpoint
            # it cannot open, the answer is the 401/403 of docs/API.md, not a 400.
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
        template = CONVERTOR_RE.sub("}", route.path)  # "{destination:path}" is "{destination}" in the document
        per_method = {m: allowed[(m, template)] for m in route.methods if (m, template) in allowed}
        if "GET" in per_method:
            per_method["HEAD"] = per_method["GET"]
        checked.append(
            Route(route.path, _checking(route.endpoint, per_method), methods=sorted(route.methods), name=route.name)
        )
    return checked


def refuse_undocumented(request: Request, names: frozenset[str]) -> None:
    """Raise the 400 for query parameters not in ``names``."""
    if not request.scope.get("query_string"):
        return  # nothing to parse
    unknown = sorted(set(request.query_params.keys()) - names)
    if unknown:
        takes = ", ".join(sorted(names - {"token"})) or "none"
        raise BadRequest(f"Unknown query parameter(s): {', '.join(map(repr, unknown))}. This endpoint takes: {takes}.")


def _checking(endpoint: Callable[[Request], Awaitable[Any]], per_method: dict[str, frozenset[str]]) -> Any:
    @functools.wraps(endpoint)
    async def checked(request: Request) -> Any:
        names = per_method.get(request.method)
        if names is not None:
            refuse_undocumented(request, names)
        return await endpoint(request)

    return checked
