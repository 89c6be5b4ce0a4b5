"""A WebSocket test client of ``GET /ws`` (the ``websockets`` library), and the AsyncAPI check of
every frame it receives."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from functools import cache
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from websockets.asyncio.client import ClientConnection, connect

from jobcast.asyncapi import build_asyncapi
from jobcast.ws.frames import SERVER_MODELS

Frame = dict[str, Any]


@cache
def _validators() -> dict[str, Draft202012Validator]:
    document = build_asyncapi()
    components = {"components": document["components"]}
    return {
        op: Draft202012Validator({"$ref": f"#/components/schemas/{model.__name__}", **components})
        for op, model in SERVER_MODELS.items()
    }


def check_frame(frame: Frame) -> None:
    """Every frame the server sends is one of the documented ones, valid against its schema."""
    validator = _validators().get(frame.get("op", ""))
    assert validator is not None, f"undocumented frame {frame}"
    validator.validate(frame)


class WsClient:
    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self._refs = itertools.count(1)
        #: Frames read while waiting for a reply (events and ends), in order.
        self.pending: list[Frame] = []

    async def send(self, frame: Frame) -> str:
        ref = str(next(self._refs))
        await self.conn.send(orjson.dumps({"ref": ref, **frame}).decode())
        return ref

    async def recv(self, timeout: float = 10.0) -> Frame:
        if self.pending:
            return self.pending.pop(0)
        async with asyncio.timeout(timeout):
            raw = await self.conn.recv()
        assert isinstance(raw, str), "frames are text messages"
        frame: Frame = orjson.loads(raw)
        check_frame(frame)
        return frame

    async def request(self, frame: Frame, timeout: float = 10.0) -> Frame:
        """Send a frame and return its reply (ok, pong or error); events read meanwhile wait in ``pending``."""
        ref = await self.send(frame)
        read: list[Frame] = []
        try:
            while True:
                async with asyncio.timeout(timeout):
                    raw = await self.conn.recv()
                reply: Frame = orjson.loads(raw)
                check_frame(reply)
                if reply.get("ref") == ref:
                    return reply
                read.append(reply)
        finally:
            self.pending.extend(read)

    async def subscribe(self, channel: str, last_event_id: str | None = None) -> Frame:
        frame: Frame = {"op": "subscribe", "channel": channel}
        if last_event_id is not None:
            frame["last_event_id"] = last_event_id
        reply = await self.request(frame)
        assert reply["op"] == "ok", reply
        return reply

    async def events_until_end(self, channel: str, timeout: float = 15.0) -> list[Frame]:
        """The channel's event frames up to its end frame (other channels' frames are left pending)."""
        seen: list[Frame] = []
        others: list[Frame] = []
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv()
                if frame.get("channel") != channel:
                    others.append(frame)
                elif frame["op"] == "end":
                    break
                else:
                    assert frame["op"] == "event", frame
                    seen.append(frame)
        self.pending[:0] = others
        return seen

    async def events(self, channel: str, count: int, timeout: float = 15.0) -> list[Frame]:
        seen: list[Frame] = []
        async with asyncio.timeout(timeout):
            while len(seen) < count:
                frame = await self.recv()
                assert frame.get("channel") == channel and frame["op"] == "event", frame
                seen.append(frame)
        return seen


def ws_url(http_url: str, token: str | None = None) -> str:
    url = http_url.replace("http://", "ws://", 1) + "/ws"
    return url + (f"?token={token}" if token else "")


@contextlib.asynccontextmanager
async def ws_connect(
    http_url: str, headers: dict[str, str] | None = None, token: str | None = None, **options: Any
) -> AsyncIterator[WsClient]:
    async with connect(ws_url(http_url, token), additional_headers=headers, proxy=None, **options) as conn:
        yield WsClient(conn)


def triples(frames: list[Frame]) -> list[tuple[str, str, Any]]:
    """(id, event, data) of event frames: what an SSE stream of the channel gives as (id, event, data)."""
    return [(f["id"], f["event"], f["data"]) for f in frames]
