"""The Starlette application: ``create_app()`` is the uvicorn factory (see the Procfile).

The lifespan owns every resource (per cell: the Redis pool, the event hub; the archive) and hands
them to the routes as one :class:`jobcast.services.Services` in Starlette's lifespan state; nothing
connects at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import orjson
import uvicorn
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from jobcast.worker import schema
from jobcast.worker.alerts import Alerter
from jobcast.worker.archive import Archive
from jobcast.worker.connections import follow_primary
from jobcast.worker.destinations import DestinationStore
from jobcast.worker.relayout import refuse_old_layout
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store, redis_client
from jobcast.worker.supervision import supervise
from jobcast.worker.types import load_registry
from jobcast.worker.webhooks import WebhookStore

from . import dashboard
from .acceptor import StandbyAcceptor
from .asyncapi import render as render_asyncapi
from .auth import Authenticator
from .http_guard import guarded_protocol
from .hub import Hub, StreamConfig
from .keys import ApiKeys
from .limits import ProcessStreams, RateLimiter, StreamSlots
from .openapi import build_openapi, documented_query_params, enforce_documented_query
from .overview import OverviewFeed
from .problems import EXCEPTION_HANDLERS, cut_short, problem_response
from .routes import events, routes
from .services import STATE_KEY, Cell, Services
from .takeover import answer_at_once, front_protocol
from .tokens import TokenSigner
from .ws import UVICORN_WS_OPTIONS
from .ws.registry import Sockets

logger = logging.getLogger(__name__)

#: At shutdown, how long the requests still running get to end once cancelled, and the removal of
#: the ended streams' slots from Redis to finish.
REQUESTS_END_S = 5.0


def create_app(settings: Settings | None = None, *, bind_host: str | None = None) -> JobcastApp:
    """The application; ``bind_host`` is the address the server listens on (``jobcast web --host``),
    which decides whether ``GET /metrics`` may answer without a token in production."""
    if settings is None:
        settings = Settings.from_env()
    else:
        settings.check_production()
    registry = load_registry(settings)
    document = build_openapi(registry)
    openapi = orjson.dumps(document)
    asyncapi = render_asyncapi()

    @asynccontextmanager
    async def lifespan(app: JobcastApp) -> AsyncIterator[dict[str, Services]]:
        archive = Archive(settings.archive_url)  # connects on first use; one for all cells
        process = ProcessStreams(settings.sse_max_streams)
        cells = tuple(build_cell(settings, index, archive, process) for index in range(len(settings.cell_urls)))
        sockets = Sockets()
        background: list[asyncio.Task[None]] = []
        try:
            for cell in cells:
                # A Redis written before 0.3 refuses the start (OldLayout says what to run); a Redis
                # away now is checked by the worker when it reaches it.
                with contextlib.suppress(RedisError, OSError):
                    await refuse_old_layout(cell.redis)
                await cell.hub.start()

            def drain() -> None:
                for cell in cells:
                    cell.hub.drain()
                sockets.drain()

            app.state.drain = drain
            for cell in cells:
                background += [
                    supervise(f"jobcast-stream-slots-{cell.index}", cell.stream_slots.refresh_forever),
                    supervise(f"jobcast-overviews-{cell.index}", cell.overview.run_forever),
                ]
                # A Sentinel-managed cell: its pool and its hub's connection move to a new primary at once.
                follow = functools.partial(follow_primary, settings.cell_urls[cell.index], [cell.redis])
                background.append(supervise(f"jobcast-primary-{cell.index}", follow))
                if settings.alert_webhook_url:  # per cell: its lock, its state, its conditions
                    alerter = Alerter(cell.redis, settings, cell.index if len(cells) > 1 else None)
                    background.append(supervise(f"jobcast-alerts-{cell.index}", alerter.run_forever))
            background.append(
                supervise("jobcast-ws-watchdog", lambda: sockets.watch_writes(settings.sse_send_timeout_s))
            )
            yield {
                STATE_KEY: Services(
                    settings=settings,
                    cells=cells,
                    registry=registry,
                    auth=Authenticator(settings.tenant_keys, TokenSigner(settings.secret_key), ApiKeys(cells[0].redis)),
                    openapi=openapi,
                    metrics_open=settings.env == "development" or is_private_bind(bind_host),
                    asyncapi=asyncapi,
                    sockets=sockets,
                )
            }
        finally:
            try:
                for task in background:
                    task.cancel()
                for task in background:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                # Requests uvicorn cancelled when its graceful shutdown timed out (streams still
                # opening, mid Redis call) end before their connections are closed under them: a
                # connection a cancelled command holds would otherwise be left to the collector.
                await app.requests_ended(REQUESTS_END_S)
                # The stream opens batched for those requests (not request tasks) finish before the
                # Redis clients are closed under them.
                await schema.settle_batches(REQUESTS_END_S)
                for cell in cells:
                    await cell.hub.stop()
                for cell in cells:  # the slots of the streams that just ended, removed from Redis
                    await cell.stream_slots.settle(REQUESTS_END_S)
            finally:
                for cell in cells:  # whatever happened above: no connection left to the collector
                    await cell.redis.aclose()
                await archive.close()

    app = JobcastApp(
        routes=[
            *enforce_documented_query(routes(), document),
            *dashboard.routes(),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.stream_query = documented_query_params(document)
    return app


def build_cell(settings: Settings, index: int, archive: Archive, process: ProcessStreams) -> Cell:
    """Cell ``index`` as a server process uses it (nothing connects yet)."""
    redis = redis_client(settings, index)
    slots = StreamSlots(
        redis,
        process=process,
        per_tenant=settings.sse_max_streams_per_tenant,
        cell=index,
        log_max={"job": settings.job_log_max, "tenant": settings.tenant_log_max},
    )
    config = StreamConfig(ping_s=settings.sse_ping_s, send_timeout_s=settings.sse_send_timeout_s)
    rate = settings.submit_rate_limit
    return Cell(
        index=index,
        redis=redis,
        store=Store(redis, settings, archive, cell=index),
        hub=Hub(redis, config, cell=index, on_connect=slots.open_script.load),
        stream_slots=slots,
        webhooks=WebhookStore(redis, settings, archive, cell=index),
        destinations=DestinationStore(redis, settings, cell=index),
        overview=OverviewFeed(redis, cell=index),
        rate_limiter=RateLimiter(redis, rate, cell=index) if rate else None,
    )


def server_config(app: Starlette, settings: Settings, *, host: str, port: int, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for a Jobcast server: request heads bounded in time and size
    (:mod:`jobcast.http_guard`), the WebSocket options of ``/ws`` (:data:`jobcast.ws.UVICORN_WS_OPTIONS`);
    ``options`` are further ``uvicorn.Config`` arguments."""
    timeout, size = settings.http_head_timeout_s, settings.http_max_head_bytes
    protocol: type[asyncio.Protocol] = guarded_protocol(head_timeout_s=timeout, max_head_bytes=size)
    if isinstance(app, JobcastApp):  # stream opens served before uvicorn's protocol (jobcast.takeover)
        protocol = front_protocol(
            events.FrontStreams(app),
            protocol,  # type: ignore[arg-type]
            head_timeout_s=timeout,
            max_head_bytes=size,
        )
    options = {"backlog": LISTEN_BACKLOG, **UVICORN_WS_OPTIONS, **options}
    return uvicorn.Config(app, host=host, port=port, http=protocol, **options)


#: The listen queue (uvicorn's default is 2048; the kernel caps it at ``net.core.somaxconn``, 4096 on
#: current Linux). A reconnect storm or a burst of stream opens that outruns the process fills it;
#: past it the kernel drops connection attempts, and a request sent on one the server has not yet
#: accepted may be retransmitted only seconds later (past the head timeout: closed unanswered).
LISTEN_BACKLOG = 4096


def is_private_bind(host: str | None) -> bool:
    """Whether a server bound to ``host`` is reachable from a private network only: a loopback or
    private address (``localhost`` included). A wildcard (0.0.0.0, ::), a public address, a host
    name or an unknown bind is not."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return not address.is_unspecified and (address.is_loopback or address.is_private)


class JobcastApp(Starlette):
    """Starlette, with the two event-stream routes served before its middleware stack (see
    :mod:`jobcast.routes.events`): the hub writes to a stream through uvicorn's own ``send``."""

    #: The query parameters each operation declares (set by create_app).
    stream_query: dict[tuple[str, str], frozenset[str]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The tasks of the requests (and WebSockets) being served.
        self.requests: set[asyncio.Task[Any]] = set()

    async def requests_ended(self, timeout: float) -> None:
        """Return once every request's task has ended, cancelling those still running (uvicorn
        cancelled them already if its graceful shutdown timed out); at most ``timeout`` seconds."""
        running = [task for task in self.requests if task is not asyncio.current_task()]
        for task in running:
            task.cancel()
        if running:
            _, pending = await asyncio.wait(running, timeout=timeout)
            if pending:
                logger.error("%d requests did not end within %.0f s of being cancelled", len(pending), timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await super().__call__(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        self.requests.add(task)
        try:
            await self._serve(scope, receive, send)
        except asyncio.CancelledError:
            # Nothing but the server's shutdown cancels a request's own task (uvicorn once its
            # graceful-shutdown timeout passed, then requests_ended): not an error of the request,
            # but one line in the log and a 503 for the client (another process will answer),
            # instead of uvicorn's error with a traceback and a bare 500.
            answerable = answer_at_once(send) if scope["type"] == "http" and task.cancelling() else None
            if answerable is None:  # a WebSocket, or not uvicorn's httptools (a test client): as before
                raise
            task.uncancel()
            answer = cut_short(scope["method"], scope["path"])
            if answerable:
                await problem_response(answer)(scope, receive, send)  # written at once: see answer_at_once
        finally:
            self.requests.discard(task)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            matched = events.match(scope["path"])
            if matched is not None:
                endpoint, params = matched
                scope["app"] = self
                scope["path_params"] = params
                template = "/events" if not params else "/jobs/{job_id}/events"
                await events.serve(endpoint, self.stream_query[("GET", template)], scope, receive, send)
                return
        await super().__call__(scope, receive, send)


class CancelsAreWarnings(logging.Filter):
    """uvicorn's line on the requests its graceful-shutdown timeout cancels, as a WARNING: nothing
    failed (each request is answered 503 and logged once by JobcastApp), the wait was just longer."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).startswith("Cancel %s running task(s)"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class JobcastServer(uvicorn.Server):
    """uvicorn's server, plus: on SIGTERM/SIGINT the app's event streams end at once.

    uvicorn waits for open connections before it shuts the app down, and an event stream never
    finishes by itself, so without this a stopping server would sit out its whole graceful-shutdown
    timeout. Drained clients reconnect (to another process) with Last-Event-ID and lose nothing.
    """

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self._app = app
        self.acceptors: list[StandbyAcceptor] = []
        uvicorn_log = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, CancelsAreWarnings) for f in uvicorn_log.filters):
            uvicorn_log.addFilter(CancelsAreWarnings())

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started or self.config.ssl is not None or self.config.uds is not None:
            return
        # A thread per listening socket that accepts for the loop when it falls behind
        # (jobcast.acceptor), making each connection's protocol as uvicorn's startup() does.
        factory = functools.partial(  # (uvicorn's protocols' signature, which its type does not say)
            self.config.http_protocol_class,  # type: ignore[call-arg]
            config=self.config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        loop = asyncio.get_running_loop()
        for server in self.servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    acceptor = StandbyAcceptor(loop, sock.fileno(), factory)
                    acceptor.start()
                    self.acceptors.append(acceptor)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for acceptor in self.acceptors:  # first: the listening sockets close with uvicorn's servers
            acceptor.stop()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        drain = getattr(self._app.state, "drain", None)
        if drain is not None:
            # We are inside a signal handler: hand the work to the event loop.
            asyncio.get_event_loop().call_soon_threadsafe(drain)
        super().handle_exit(sig, frame)
