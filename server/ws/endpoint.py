"""The ``/ws`` route: everything that can refuse a socket is checked before the upgrade.

Credentials (as for the event streams: ``Authorization: Bearer`` or ``?token=``), unknown query
parameters, and the stream caps (a socket takes one stream slot, per process and per tenant) are
answered as plain HTTP problem details through the ASGI WebSocket Denial Response extension
(``send_denial_response``): a client sees 400/401/403/429/503 and never gets a socket.
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from ..limits import StreamsFull, streams_full_problem
from ..problems import BadRequest, Problem, Unavailable, UpgradeRequired, problem_response
from ..services import services
from .session import Session, SessionConfig

logger = logging.getLogger(__name__)

QUERY_PARAMS = frozenset({"token"})


def sockets_full(full: StreamsFull) -> Problem:
    return streams_full_problem(
        full, what="event streams and sockets", tenant_hint="Close some; one socket can follow many jobs."
    )


async def upgrade_required(request: Request) -> Response:
    """A plain HTTP ``GET /ws`` (no WebSocket handshake): say how to open it."""
    raise UpgradeRequired(
        "GET /ws is a WebSocket: connect with a WebSocket client (ws:// or wss://), with "
        "'Authorization: Bearer <api key>' or ?token=<token>. See /asyncapi.json for its frames."
    )


class WebSocketEndpoint:
    """The ASGI app of ``/ws`` (an app rather than a Starlette endpoint function, so that the session
    writes frames with the server's own ``send``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        svc = services(websocket)
        try:
            unknown = sorted(set(websocket.query_params.keys()) - QUERY_PARAMS)
            if unknown:
                raise BadRequest(f"Unknown query parameter(s): {', '.join(map(repr, unknown))}. /ws takes: token.")
            principal = await svc.auth.authenticate(websocket)
            if svc.sockets.draining:
                raise Unavailable("This server is shutting down; connect again (to another server process).")
            try:
                slot = await svc.tenant_cell(principal.tenant).stream_slots.acquire(principal.tenant)
            except StreamsFull as full:
                raise sockets_full(full) from None
        except Problem as problem:
            await websocket.send_denial_response(problem_response(problem))
            return
        except (RedisError, OSError) as exc:
            logger.warning("ws: Redis unavailable during the upgrade: %s", exc)
            unavailable = Unavailable(
                "The job store (Redis) is not reachable right now. Retry after the indicated delay."
            )
            await websocket.send_denial_response(problem_response(unavailable))
            return
        try:
            await websocket.accept()
            config = SessionConfig(
                max_subscriptions=svc.settings.ws_max_subscriptions, send_timeout_s=svc.settings.sse_send_timeout_s
            )
            session = Session(websocket, send, svc, principal, config)
            svc.sockets.add(session)
            if svc.sockets.draining:  # drained between the check above and now
                session.close(1012, "server restart: connect again")
            try:
                await session.run()
            finally:
                svc.sockets.discard(session)
        finally:
            await svc.tenant_cell(principal.tenant).stream_slots.release(principal.tenant, slot)


websocket_endpoint = WebSocketEndpoint()
