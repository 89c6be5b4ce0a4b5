"""One open WebSocket: the client's requests, its subscriptions, and the frames sent back.

Tasks: a reader (the client's frames, answered in order, one at a time), a writer (the send
buffer to the socket), and a pump per subscribed channel (its :class:`~jobcast.ws.source.Feed`).
A frame is written at once by the task that has it when nothing is queued and no write is under way
(the common case: one wake-up per event, as for an SSE stream); otherwise it joins the send buffer,
which the writer drains in order. The send buffer is bounded (``SEND_BUFFER`` frames): a pump waits
for room, so a socket that cannot keep up first stalls its pumps, then its hub buffers overflow —
and the socket is closed with 1013 (try again later). A write blocked for ``send_timeout_s`` closes
it too; that is watched by one task for all sockets (:meth:`Sockets.watch_writes`), not by a timer
per write, which would cost more than the write itself in a fan-out.
The client re-subscribes with the last id of each channel and loses nothing.

Ordering: the ``ok`` of a subscribe is queued before the channel's pump starts, so it precedes the
channel's first event; an unsubscribe cancels the pump before its ``ok`` is queued, so no event of
the channel follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from redis.exceptions import RedisError
from starlette.types import Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from jobcast.worker.records import JobRecord

from .. import resumes
from ..auth import Principal
from ..problems import BadRequest, Conflict, Forbidden, Problem, TooManyRequests, Unavailable
from ..services import Cell, Services, job_not_found
from . import frames
from .frames import Cancel, Ping, Subscribe, Unsubscribe
from .source import Closed, Feed, FellBehind, Lost

logger = logging.getLogger(__name__)

#: Frames queued for one socket at most (events and replies).
SEND_BUFFER = 512
#: Close codes (RFC 6455 and the IANA registry).
CLOSE_RESTART = 1012
CLOSE_TRY_AGAIN = 1013
CLOSE_INTERNAL = 1011


@dataclass(frozen=True)
class SessionConfig:
    max_subscriptions: int = 1_000
    send_timeout_s: float = 10.0


class Session:
    def __init__(
        self, websocket: WebSocket, send: Send, svc: Services, principal: Principal, config: SessionConfig
    ) -> None:
        self.ws = websocket
        self._asgi_send = send  # the server's own: Starlette's state checks cost per event and add nothing here
        self.svc = svc
        self.principal = principal
        self.config = config
        #: When the write under way started (loop time), for the watchdog; None when none is.
        self.writing_since: float | None = None
        self._loop = asyncio.get_running_loop()
        self._writing = asyncio.Lock()
        self._outbox: asyncio.Queue[str] = asyncio.Queue(SEND_BUFFER)
        self._writer: asyncio.Task[None] | None = None
        self._channels: dict[str, tuple[Feed, asyncio.Task[None] | None]] = {}
        self._done: asyncio.Future[tuple[int, str] | None] = asyncio.get_running_loop().create_future()

    @property
    def subscriptions(self) -> int:
        return len(self._channels)

    def close(self, code: int, reason: str) -> None:
        """End the session, closing the socket with ``code`` (from any task)."""
        if not self._done.done():
            self._done.set_result((code, reason))

    def _client_left(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    async def run(self) -> None:
        reader = asyncio.create_task(self._read(), name="jobcast-ws-reader")
        reader.add_done_callback(self._watch)
        tasks = [reader]
        try:
            ending = await self._done
        finally:
            if self._writer is not None:
                tasks.append(self._writer)
            for feed, pump in self._channels.values():
                feed.close()
                if pump is not None:
                    tasks.append(pump)
            self._channels.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if ending is not None:
            code, reason = ending
            with contextlib.suppress(TimeoutError, OSError, WebSocketDisconnect, RuntimeError):
                async with asyncio.timeout(self.config.send_timeout_s):
                    await self.ws.close(code, reason)

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self._client_left()
                return
            text = message.get("text")
            if text is None:
                await self._send(frames.error(None, BadRequest("Frames are JSON text messages, not binary ones.")))
                continue
            frame, ref, problem = frames.parse(text)
            if frame is not None:
                problem = await self._answer(frame)
            if problem is not None:
                await self._send(frames.error(ref, problem))

    def _watch(self, task: asyncio.Task[None]) -> None:
        """A task of this session that fails ends the session (1011), logged: never a silent hang."""
        if not task.cancelled() and task.exception() is not None:
            logger.error("ws %s: %s failed", self.principal.tenant, task.get_name(), exc_info=task.exception())
            self.close(CLOSE_INTERNAL, "internal error: reconnect and re-subscribe with your last ids")

    async def _send(self, text: str) -> None:
        # In order: straight out only when nothing waits before it (acquiring a free lock does not yield).
        if self._outbox.empty() and not self._writing.locked():
            async with self._writing:
                await self._transmit(text)
        else:
            if self._writer is None:  # started on first need: an idle socket holds one task less
                self._writer = asyncio.create_task(self._write(), name="jobcast-ws-writer")
                self._writer.add_done_callback(self._watch)
            await self._outbox.put(text)

    async def _write(self) -> None:
        outbox = self._outbox
        while True:
            text = await outbox.get()
            async with self._writing:
                await self._transmit(text)

    async def _transmit(self, text: str) -> None:
        self.writing_since = self._loop.time()
        try:
            await self._asgi_send({"type": "websocket.send", "text": text})
        except OSError:  # the client is gone (uvicorn's ClientDisconnected)
            self._client_left()
        finally:
            self.writing_since = None

    def too_slow(self) -> None:
        """A write has been blocked for ``send_timeout_s`` (the watchdog says so)."""
        if self._done.done():
            return
        self._count_slow()
        logger.info("ws %s: client too slow to take a write; closing", self.principal.tenant)
        self.close(CLOSE_TRY_AGAIN, "too slow: re-subscribe with your last ids")

    def _count_slow(self) -> None:
        """For /metrics (summed over the cells' hubs): counted on the hub of the socket's tenant."""
        self.svc.tenant_cell(self.principal.tenant).hub.slow_consumers += 1

    async def _answer(self, frame: Subscribe | Unsubscribe | Cancel | Ping) -> Problem | None:
        """Carry out one request and queue its reply; a problem to answer with instead."""
        try:
            if isinstance(frame, Ping):
                await self._send(frames.pong(frame.ref))
            elif isinstance(frame, Subscribe):
                await self._subscribe(frame)
            elif isinstance(frame, Unsubscribe):
                await self._unsubscribe(frame.channel)
                await self._send(frames.ok(frame.ref))
            else:
                await self._cancel(frame)
        except Problem as problem:
            return problem
        except (RedisError, OSError) as exc:
            logger.warning("ws %s: Redis unavailable for %s (%s)", self.principal.tenant, frame.op, exc)
            return Unavailable("The job store (Redis) is not reachable right now; send the frame again shortly.")
        return None

    async def _subscribe(self, frame: Subscribe) -> None:
        channel, tenant, last_id = frame.channel, self.principal.tenant, frame.last_event_id
        if channel in self._channels:
            raise Conflict(f"Already subscribed to {channel}; unsubscribe first to subscribe again from another id.")
        if len(self._channels) >= self.config.max_subscriptions:
            raise TooManyRequests(
                f"This socket follows {len(self._channels)} channels, its limit (JOBCAST_WS_MAX_SUBSCRIPTIONS); "
                "unsubscribe from some, or follow them all on the tenant channel."
            )
        if channel == frames.TENANT:
            if self.principal.kind == "job":
                raise Forbidden(
                    "A job token follows only its own job; use a stream token or the API key for the tenant channel."
                )
            cell = self.svc.tenant_cell(tenant)
            feed = Feed(cell.hub, cell.store, "tenant", tenant, tenant, channel, last_id)
            record = None
        else:
            job_id = channel.removeprefix(frames.JOB_PREFIX)
            if self.principal.kind == "job" and self.principal.job_id != job_id:
                raise Forbidden(f"This job token follows only its own job ({self.principal.job_id}).")
            record = await self.svc.load_job(job_id, tenant)
            cell = self.svc.job_cell(job_id)
            feed = Feed(cell.hub, cell.store, "job", job_id, tenant, channel, last_id)
        if last_id is not None and await self._resumes_over(cell, feed, last_id, record):
            # Over already (SSE answers 204 here): nothing follows, so no subscription.
            await self._send(frames.ok(frame.ref))
            await self._send(frames.end(channel))
            return
        await feed.open()  # confirmed before the log is read (below and by the pump): nothing is missed
        extra: dict[str, str] = {}
        if last_id is None and feed.audience == "tenant":
            try:
                tip = await feed.start_live()
            except BaseException:
                feed.close()
                raise
            if tip is not None:
                extra["last_event_id"] = tip
        self._channels[channel] = (feed, None)
        await self._send(frames.ok(frame.ref, **extra))
        if channel in self._channels:  # (the session may have ended meanwhile)
            pump = asyncio.create_task(self._pump(feed), name=f"jobcast-ws-pump {channel}")
            pump.add_done_callback(self._watch)
            self._channels[channel] = (feed, pump)

    async def _resumes_over(self, cell: Cell, feed: Feed, last_id: str, record: JobRecord | None) -> bool:
        """Check ``last_id`` against the channel's log as an SSE stream's opening does
        (:mod:`jobcast.resumes`): a resume that cannot be made raises its problem (410 trimmed or
        lost, 400 ahead). True: the job is over and nothing follows ``last_id``."""
        outcome, tip, _ = await cell.stream_slots.open_log(feed.audience, feed.key, feed.tenant, last_id, page=1)
        problem = resumes.refusal(outcome, last_id, tip, resumes.WS)
        if problem is not None:
            raise problem
        if outcome == "missing" and record is not None:  # archived: its log is kept whole there
            return record.terminal and not await cell.store.log_events("job", feed.key, after=last_id, count=1)
        return outcome == "over"

    async def _unsubscribe(self, channel: str) -> None:
        entry = self._channels.pop(channel, None)
        if entry is None:
            return
        feed, pump = entry
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        feed.close()

    async def _pump(self, feed: Feed) -> None:
        try:
            async for text, terminal in feed.frames():
                await self._send(text)
                if terminal:
                    await self._send(frames.end(feed.channel))
                    # Unsubscribed by its end (not through _unsubscribe: that would cancel this task).
                    if self._channels.get(feed.channel, (None, None))[0] is feed:
                        del self._channels[feed.channel]
                    feed.close()
                    return
        except FellBehind:
            self._count_slow()
            logger.info("ws %s: fell behind on %s; closing", self.principal.tenant, feed.channel)
            self.close(CLOSE_TRY_AGAIN, "too slow: re-subscribe with your last ids")
        except Closed:
            self.close(CLOSE_RESTART, "server restart: re-subscribe with your last ids")
        except Lost:
            logger.warning(
                "ws %s: the last event sent on %s is no longer in the log; closing", self.principal.tenant, feed.channel
            )
            self.close(CLOSE_TRY_AGAIN, "events lost: re-subscribe with your last ids (a lost one is refused: resync)")
        except (RedisError, OSError) as exc:
            logger.warning("ws %s: Redis unavailable on %s (%s); closing", self.principal.tenant, feed.channel, exc)
            self.close(CLOSE_TRY_AGAIN, "store unavailable: re-subscribe with your last ids")

    async def _cancel(self, frame: Cancel) -> None:
        if self.principal.kind != "key":
            raise Forbidden("Cancelling needs the API key ('Authorization: Bearer <api key>'); tokens are read-only.")
        job_id, tenant = frame.job_id, self.principal.tenant
        outcome, status = await self.svc.job_cell(job_id).store.cancel(job_id, tenant)
        if outcome == "missing":
            raise job_not_found(job_id)
        if outcome == "terminal":
            raise Conflict(f"Job {job_id} is already {status}; a finished job cannot be cancelled.", job_status=status)
        record = await self.svc.load_job(job_id, tenant)
        await self._send(frames.ok(frame.ref, status=record.status.value))
