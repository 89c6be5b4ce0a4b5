"""``GET /ws`` under faults: malformed frames, a socket that cannot keep up (1013), graceful
shutdown (1012) and a resume across a server restart."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from websockets.exceptions import ConnectionClosed, InvalidStatus

from jobcast.cli.embedded_redis import RedisProcess
from jobcast.worker import schema
from jobcast.worker.settings import Settings
from jobcast.worker.store import Store
from jobcast.ws.registry import Sockets

from .conftest import ACME, ServerHandle, make_settings, wait_until
from .test_sse import log_ids, new_running_job
from .wsclient import Frame, ws_connect

JOB = "job_01ARZ3NDEKTSV4RRFFQ69G5FAV"

#: (frame as sent, expected status, the ref the error frame echoes)
MALFORMED: list[tuple[str | bytes, int, str | None]] = [
    ("not json", 400, None),
    ("[1, 2]", 400, None),
    ('"ping"', 400, None),
    ("{}", 400, None),
    ('{"op": "ping"}', 400, None),  # no ref
    ('{"op": "ping", "ref": 7}', 400, None),  # a ref that is not a string cannot be echoed
    ('{"op": "publish", "ref": "a"}', 400, "a"),
    ('{"op": null, "ref": "b"}', 400, "b"),
    ('{"op": {"$ref": "#"}, "ref": "p"}', 400, "p"),
    ('{"op": "subscribe", "ref": "c"}', 400, "c"),
    ('{"op": "subscribe", "ref": "d", "channel": "jobs"}', 400, "d"),
    ('{"op": "subscribe", "ref": "e", "channel": "job:nope"}', 400, "e"),
    ('{"op": "subscribe", "ref": "f", "channel": "tenant", "last_event_id": "x"}', 400, "f"),
    ('{"op": "subscribe", "ref": "g", "channel": "tenant", "last_event_id": "99999999999999999999999-0"}', 400, "g"),
    (f'{{"op": "subscribe", "ref": "h", "channel": "job:{JOB}"}}', 404, "h"),
    ('{"op": "subscribe", "ref": "i", "channel": "tenant", "extra": 1}', 400, "i"),
    ('{"op": "cancel", "ref": "j"}', 400, "j"),
    ('{"op": "cancel", "ref": "k", "job_id": 5}', 400, "k"),
    ('{"op": "cancel", "ref": "l", "job_id": "job_x"}', 404, "l"),
    ('{"op": "unsubscribe", "ref": "m", "channel": ["tenant"]}', 400, "m"),
    ('{"op": "ping", "ref": ""}', 400, None),
    ('{"op": "ping", "ref": "' + "r" * 200 + '"}', 400, None),
    ('{"op": "ping", "ref": "n"' + " " * 20_000 + "}", 413, None),
    (b"\x00\x01binary", 400, None),
    ('{"op": "ping", "ref": "o"} trailing', 400, None),
    ('{"op": "ping", "ref": "\\ud800"}', 400, None),
]


async def _reply(ws: Any) -> Frame:
    frame: Frame = await ws.recv()
    return frame


async def test_malformed_frames_get_error_frames_and_the_socket_stays_open(
    server: ServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    async with ws_connect(server.url, ACME) as ws:
        for sent, status, ref in MALFORMED:
            await ws.conn.send(sent)
            reply = await _reply(ws)
            assert reply["op"] == "error" and reply["status"] == status and reply["ref"] == ref, (sent[:80], reply)
            assert reply["detail"] and len(orjson.dumps(reply)) < 4096
        assert (await ws.request({"op": "ping"}))["op"] == "pong"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _mutant(rng: random.Random) -> str:
    """A frame near a valid one: fields dropped, retyped or replaced, or the text cut."""
    base: dict[str, Any] = rng.choice(
        [
            {"op": "subscribe", "ref": "1", "channel": "tenant", "last_event_id": "1-0"},
            {"op": "unsubscribe", "ref": "2", "channel": f"job:{JOB}"},
            {"op": "cancel", "ref": "3", "job_id": JOB},
            {"op": "ping", "ref": "4"},
        ]
    )
    junk: list[Any] = [
        None,
        0,
        -1,
        2**70,
        1.5,
        "",
        "x" * 300,
        [],
        {},
        ["tenant"],
        {"$ref": "#"},
        True,
        "job:",
        "\u0000",
    ]
    for _ in range(rng.randint(1, 3)):
        key = rng.choice([*base, "op", "ref", "channel", "extra"])
        action = rng.random()
        if action < 0.3:
            base.pop(key, None)
        else:
            base[key] = rng.choice(junk)
    text = json.dumps(base)
    if rng.random() < 0.15:
        text = text[: rng.randint(0, len(text))]
    return text


async def test_a_fuzz_of_frames_never_crashes_the_socket(
    server: ServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    rng = random.Random(16)
    async with ws_connect(server.url, ACME) as ws:
        for _ in range(300):
            sent = _mutant(rng)
            await ws.conn.send(sent)
            reply = await _reply(ws)  # validated against the AsyncAPI document by the client
            assert reply["op"] in ("error", "ok", "pong"), reply
            if reply["op"] == "error":
                assert 400 <= reply["status"] < 500, reply
            if reply["op"] == "ok":  # a mutant that is a valid subscribe (only "tenant" exists): undo it
                await ws.conn.send('{"op":"unsubscribe","ref":"u","channel":"tenant"}')
                assert (await _reply(ws))["op"] == "ok"
        assert (await ws.request({"op": "ping"}))["op"] == "pong"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def _slow_consumers(client: httpx.AsyncClient) -> float:
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("jobcast_sse_slow_consumers_cut_total "):
            return float(line.split()[1])
    return 0.0


async def test_a_socket_that_cannot_keep_up_is_closed_1013_and_resumes_exactly(
    redis_server: RedisProcess, store: Store, redis: Redis
) -> None:
    settings = make_settings(redis_server.url)
    handle = ServerHandle(settings)
    await handle.start()
    job_id = await new_running_job(store)
    channel = f"job:{job_id}"
    blob = "x" * 8000
    try:
        async with httpx.AsyncClient(base_url=handle.url, headers=ACME) as http:
            # max_queue=1: the client stops reading from TCP as soon as one frame waits to be read.
            async with ws_connect(handle.url, ACME, max_queue=1) as ws:
                await ws.subscribe(channel)
                # ~16 MB while the client reads nothing: more than the socket buffers hold.
                for i in range(1, 2001):
                    await store.progress(job_id, 1, i / 20, blob, None)
                await wait_until(lambda: _slow_consumers(http), timeout=60, interval=0.05)
                seen: list[Frame] = list(ws.pending)
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        frame = await ws.recv(timeout=30)
                        seen.append(frame)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            assert 0 < len(seen) < 2002  # it did not get everything
            await store.complete(job_id, 1, "1")
            async with ws_connect(handle.url, ACME) as ws:
                await ws.subscribe(channel, last_event_id=seen[-1]["id"])
                rest = await ws.events_until_end(channel, timeout=60)
            assert [f["id"] for f in seen + rest] == log_ids(await redis.xrange(schema.job_log_key(job_id)))
    finally:
        await handle.stop()


async def _follow(
    urls: list[str],
    job_id: str,
    timeout: float = 30,
    close_codes: frozenset[int] = frozenset({1012}),
    restarted: asyncio.Event | None = None,
) -> list[Frame]:
    """A client that reconnects (to whichever server is listed first) and re-subscribes with its last id.
    Every close it saw must have had one of ``close_codes``, and there must have been one at least
    when 1012 is expected (the server restart test). With ``restarted``, a client closed 1012 (its
    server going away) reconnects once that is set (the next server listening, listed first), rather
    than racing the old server's shutdown with handshakes it may drop half-way."""
    seen: list[Frame] = []
    channel = f"job:{job_id}"
    codes: list[int] = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                async with ws_connect(urls[0], ACME) as ws:
                    await ws.subscribe(channel, last_event_id=seen[-1]["id"] if seen else None)
                    while True:
                        frame = await ws.recv(timeout=timeout)
                        if frame["op"] == "end":
                            assert set(codes) <= close_codes and (codes or 1012 not in close_codes), codes
                            return seen
                        seen.append(frame)
            except ConnectionClosed as closed:
                codes.append(closed.rcvd.code if closed.rcvd else 1006)
                if restarted is not None and codes[-1] == 1012:
                    await restarted.wait()
                    continue
            except InvalidStatus as refused:  # Redis away during the upgrade (or a draining server): 503
                assert refused.response.status_code == 503
            except OSError:  # refused: no server yet
                pass
            await asyncio.sleep(0.05)


async def test_sockets_close_1012_on_shutdown_and_resume_across_a_server_restart(
    settings: Settings, store: Store, redis: Redis
) -> None:
    first = ServerHandle(settings)
    await first.start()
    job_id = await new_running_job(store)
    urls = [first.url]
    restarted = asyncio.Event()
    followers = [asyncio.create_task(_follow(urls, job_id, restarted=restarted)) for _ in range(10)]
    async with ws_connect(first.url, ACME) as idle:  # no subscription: closed by the drain too
        for percent in range(1, 21):
            await store.progress(job_id, 1, percent, None, None)
        await wait_until(lambda: _subscribers(first), timeout=10)
        await first.stop()
        with pytest.raises(ConnectionClosed) as closed:
            await idle.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    for percent in range(21, 41):  # while no server runs
        await store.progress(job_id, 1, percent, None, None)
    second = ServerHandle(settings)
    await second.start()
    urls[0] = second.url
    restarted.set()
    await store.complete(job_id, 1, "1")
    results = await asyncio.gather(*followers)
    await second.stop()
    expected = log_ids(await redis.xrange(schema.job_log_key(job_id)))
    for seen in results:
        assert [f["id"] for f in seen] == expected


async def test_sockets_resume_exactly_across_a_redis_restart(
    server: ServerHandle, store: Store, redis: Redis, redis_server: RedisProcess
) -> None:
    job_id = await new_running_job(store)
    # Redis away: the hub resyncs from the log, or a socket is closed 1013 and re-subscribes.
    followers = [
        asyncio.create_task(_follow([server.url], job_id, timeout=40, close_codes=frozenset({1013}))) for _ in range(10)
    ]
    async with ws_connect(server.url, ACME) as ws:
        for percent in range(1, 11):
            await store.progress(job_id, 1, percent, None, None)
        await wait_until(lambda: _subscribers(server, 11), timeout=10)
        redis_server.stop()  # graceful: the append-only file is flushed
        unavailable = await ws.request({"op": "subscribe", "channel": f"job:{job_id}"})
        assert unavailable["op"] == "error" and unavailable["status"] == 503, unavailable
        redis_server.start()

        async def progressed() -> bool:
            try:
                await store.progress(job_id, 1, 11, None, None)
            except (RedisError, OSError):
                return False
            return True

        await wait_until(progressed, timeout=10, interval=0.1)
        assert (await ws.subscribe(f"job:{job_id}"))["op"] == "ok"  # the same socket works again
    for percent in range(12, 31):
        await store.progress(job_id, 1, percent, None, None)
    await store.complete(job_id, 1, "1")
    results = await asyncio.gather(*followers)
    expected = log_ids(await redis.xrange(schema.job_log_key(job_id)))
    assert len(expected) == 2 + 30 + 1
    for seen in results:
        assert [f["id"] for f in seen] == expected


async def _subscribers(handle: ServerHandle, count: int = 11) -> bool:
    async with httpx.AsyncClient(base_url=handle.url) as c:
        text = (await c.get("/metrics")).text
    return f"jobcast_sse_streams_open {count}.0" in text


class _Writing:
    """A socket as the registry sees it, with a write under way since ``since``."""

    def __init__(self, since: float | None) -> None:
        self.writing_since = since
        self.slow = asyncio.Event()
        self.closed: list[int] = []

    def close(self, code: int, reason: str) -> None:
        self.closed.append(code)

    def too_slow(self) -> None:
        self.slow.set()


async def test_the_watchdog_cuts_only_a_write_blocked_past_the_send_timeout() -> None:
    sockets = Sockets()
    now = asyncio.get_running_loop().time()
    blocked, fresh, idle = _Writing(now - 5.0), _Writing(now + 3600), _Writing(None)
    for socket in (blocked, fresh, idle):
        sockets.add(socket)
    watchdog = asyncio.create_task(sockets.watch_writes(0.2))
    try:
        await asyncio.wait_for(blocked.slow.wait(), 10)
    finally:
        watchdog.cancel()
    assert not fresh.slow.is_set() and not idle.slow.is_set()
    sockets.drain()
    assert blocked.closed == fresh.closed == idle.closed == [1012] and sockets.draining
