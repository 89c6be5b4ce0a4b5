"""The Starlette application: ``create_app()`` is the uvicorn factory (see the Procfile).

The lifespan owns every resource (the Redis pool, the event hub) and hands them to the routes as one
:class:`jobcast.services.Services` in Starlette's lifespan state; nothing connects at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import orjson
import uvicorn
from starlette.applications import Starlette

from jobcast.worker.settings import Settings
from jobcast.worker.store import Store, redis_client
from jobcast.worker.supervision import supervise
from jobcast.worker.types import load_registry
from jobcast.worker.webhooks import WebhookStore

from . import dashboard
from .auth import Authenticator
from .hub import Hub
from .keys import ApiKeys
from .limits import RateLimiter, StreamSlots, parse_rate
from .openapi import build_openapi, enforce_documented_query
from .problems import EXCEPTION_HANDLERS
from .routes import routes
from .services import STATE_KEY, Services
from .tokens import TokenSigner

logger = logging.getLogger(__name__)

def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings if settings is not None else Settings()
    settings.check_production()
    registry = load_registry(settings)
    rate = parse_rate(settings.submit_rate)
    document = build_openapi(registry)
    openapi = orjson.dumps(document)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Services]]:
        redis = redis_client(settings)
        hub = Hub(redis)
        await hub.start()
        app.state.drain = hub.drain
        slots = StreamSlots(redis, per_process=settings.sse_max_streams, per_tenant=settings.sse_max_streams_per_tenant)
        refresher = supervise("jobcast-stream-slots", slots.refresh_forever)
        try:
            yield {
                STATE_KEY: Services(
                    settings=settings,
                    redis=redis,
                    store=Store(redis, settings),
                    hub=hub,
                    registry=registry,
                    auth=Authenticator(settings.tenant_keys, TokenSigner(settings.secret_key), ApiKeys(redis)),
                    rate_limiter=RateLimiter(redis, rate) if rate else None,
                    openapi=openapi,
                    stream_slots=slots,
                    webhooks=WebhookStore(redis, settings),
                )
            }
        finally:
            try:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
                await hub.stop()
            finally:
                await redis.aclose()  # whatever happened above: no connection left to the collector

    app = Starlette(
        routes=[
            *enforce_documented_query(routes(), document),
            *dashboard.routes(),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    return app


GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc_for_streaming() -> None:
    """Fewer, not longer, garbage-collection pauses in a server holding thousands of streams.

    Each open stream is ~100 long-lived objects the cyclic collector tracks, and every full
    collection walks them all with the process stopped: 0.7 s at 10k streams (BENCHMARKS.md). So:
    freeze what start-up made, and run the young generation rarely enough that full collections
    become rare too. Pauses, not a few MB, are what a streaming server cannot afford.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class JobcastServer(uvicorn.Server):
    """uvicorn's server, plus: on SIGTERM/SIGINT the app's event streams end at once.

    uvicorn waits for open connections before it shuts the app down, and an event stream never
    finishes by itself, so without this a stopping server would sit out its whole graceful-shutdown
    timeout. Drained clients reconnect (to another process) with Last-Event-ID and lose nothing.
    """

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        drain = getattr(self._app.state, "drain", None)
        if drain is not None:
            # We are inside a signal handler: hand the work to the event loop.
            asyncio.get_event_loop().call_soon_threadsafe(drain)
        super().handle_exit(sig, frame)
