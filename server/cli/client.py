"""A client for the HTTP API of docs/API.md: what the ``jobcast`` client commands talk through.

    ClientError          a command cannot go on; the message says what is wrong and what to do
     ├── UsageError      bad configuration or arguments: no API key, a malformed key=value (exit 2)
     ├── RequestFailed   the server answered a problem (4xx/5xx); carries its status and body
     └── Unreachable     no answer: connection refused, timed out, or lost for too long

Following a job (:meth:`Client.follow`) reads its event stream with httpx-sse. When the
connection drops — a server restart, a proxy timeout, a network blip — it reconnects with
``Last-Event-ID``, so the server sends exactly the events after the last one seen. Events are
still checked against the last id (ids are ordered positions in the job's log), so even a replay
from the start (after a ``410 Gone``) yields each event once. It gives up after
``RECONNECT_GIVE_UP_S`` without a connection. A server that never answered at all is not a dropped
connection but a wrong URL or a server not started: that fails at once, as every other command does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import SSEError, connect_sse

from jobcast import streamids
from jobcast.worker.models import TERMINAL, TERMINAL_EVENTS

Job = dict[str, Any]

#: Seconds to wait for a byte on an event stream: the server pings idle streams every 15 s at
#: most, so silence this long means the connection is dead.
STREAM_READ_TIMEOUT_S = 45.0
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 5.0
RECONNECT_GIVE_UP_S = 300.0
#: How long one long-poll (GET /jobs/{id}?wait=) holds; the API allows up to 60.
WAIT_S = 30
TERMINAL_EVENT_NAMES = frozenset(TERMINAL_EVENTS)
TERMINAL_STATUSES = frozenset(status.value for status in TERMINAL)


class ClientError(Exception):
    """A command cannot go on; ``str()`` is a one-line message for the user."""


class UsageError(ClientError):
    """The command line or the environment is wrong (no API key, bad ``key=value``)."""


class RequestFailed(ClientError):
    """The server answered with a problem (RFC 9457) or another non-success status."""

    def __init__(self, status: int, problem: dict[str, Any], message: str) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem


class Unreachable(ClientError):
    """The server did not answer (or stopped answering for too long)."""


@dataclass(frozen=True)
class StreamEvent:
    """One event of a job's stream (docs/API.md, Server-Sent Events)."""

    id: str
    event: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENT_NAMES


@dataclass(frozen=True)
class Disconnected:
    """The stream broke off; :meth:`Client.follow` reconnects after ``delay_s``."""

    reason: str
    delay_s: float


def _id_order(event_id: str) -> streamids.Order:
    """A frame whose id is not an event id orders before every event (it is skipped)."""
    return streamids.parse(event_id) or streamids.BEFORE_ALL


def _unreachable(base_url: str, exc: httpx.TransportError) -> Unreachable:
    return Unreachable(f"cannot reach {base_url} ({_describe(exc)}); is the server running?")


def _describe(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return "connection lost"


class Client:
    """Synchronous: a command does one thing at a time, and a blocking read is what it wants."""

    def __init__(self, base_url: str, api_key: str, *, transport: httpx.BaseTransport | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise UsageError(f"the server URL {base_url!r} must start with http:// or https:// (JOBCAST_URL, --url)")
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "jobcast-cli"},
            timeout=httpx.Timeout(30.0, connect=10.0),
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._http.close()

    # --- requests -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from None
        if response.status_code >= 400:
            raise self._failure(response)
        return response

    def _failure(self, response: httpx.Response) -> RequestFailed:
        try:
            problem = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            problem = {}
        if not isinstance(problem, dict):
            problem = {}
        detail = problem.get("detail") or response.reason_phrase or "no details"
        return RequestFailed(
            response.status_code, problem, f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} {problem.get('title') or response.reason_phrase}: {detail}"
        )  # fmt: skip

    def submit(
        self,
        job_type: str,
        params: dict[str, Any],
        *,
        priority: str | None = None,
        webhook: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        body: dict[str, Any] = {"type": job_type, "params": params}
        if priority is not None:
            body["priority"] = priority
        if webhook is not None:
            body["webhook"] = {"url": webhook}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        job: Job = self._request("POST", "/jobs", json=body, headers=headers).json()
        return job

    def job(self, job_id: str, *, wait: float = 0) -> Job:
        params = {"wait": str(wait)} if wait else {}
        timeout = httpx.Timeout(wait + 30.0, connect=10.0)
        job: Job = self._request("GET", f"/jobs/{job_id}", params=params, timeout=timeout).json()
        return job

    def jobs(
        self,
        *,
        status: str | None = None,
        job_type: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        created_after: str | None = None,
        created_before: str | None = None,
        search: str | None = None,
    ) -> dict[str, Any]:
        query = {
            "status": status,
            "type": job_type,
            "limit": limit,
            "cursor": cursor,
            "created_after": created_after,
            "created_before": created_before,
            "q": search,
        }
        page: dict[str, Any] = self._request(
            "GET", "/jobs", params={k: v for k, v in query.items() if v is not None}
        ).json()
        return page

    def cancel(self, job_id: str) -> tuple[int, Job]:
        """``(200, job)`` when it is cancelled now, ``(202, job)`` when a running job was asked to stop."""
        response = self._request("POST", f"/jobs/{job_id}/cancel")
        return response.status_code, response.json()

    def job_types(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._request("GET", "/job-types").json()["items"]
        return items

    def destinations(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._request("GET", "/webhooks/destinations").json()["items"]
        return items

    def enable_destination(self, destination: str) -> dict[str, Any]:
        path = f"/webhooks/destinations/{quote(destination, safe='')}/enable"
        enabled: dict[str, Any] = self._request("POST", path).json()
        return enabled

    def wait(self, job_id: str) -> Job:
        """Long-poll the job until it is finished, riding out dropped connections like :meth:`follow`."""
        down_since: float | None = None
        delay = RECONNECT_FIRST_S
        answered = False
        while True:
            try:
                job = self.job(job_id, wait=WAIT_S)
            except Unreachable:
                if not answered:
                    raise
                down_since = self._check_give_up(down_since)
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            down_since, delay, answered = None, RECONNECT_FIRST_S, True
            if job["status"] in TERMINAL_STATUSES:
                return job

    # --- the event stream -------------------------------------------------------------------------

    def follow(self, job_id: str) -> Iterator[StreamEvent | Disconnected]:
        """Yield the job's events from the first, each once, until its terminal event.

        Ends without a terminal event only when the server says the stream is over (204: the job
        ended before this connection); the caller then reads the job. Between connections it
        yields :class:`Disconnected`.
        """
        last_id: str | None = None
        last_key = streamids.BEFORE_ALL
        down_since: float | None = None
        delay = RECONNECT_FIRST_S
        answered = False
        timeout = httpx.Timeout(30.0, connect=10.0, read=STREAM_READ_TIMEOUT_S)
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            reason = "the server closed the stream"
            try:
                with connect_sse(
                    self._http, "GET", f"/jobs/{job_id}/events", headers=headers, timeout=timeout
                ) as source:
                    response = source.response
                    answered = True
                    if response.status_code == 204:
                        return
                    if response.status_code == 410:  # our last id was trimmed: replay, skip what we saw
                        last_id = None
                        continue
                    if response.status_code >= 400:
                        response.read()
                        failure = self._failure(response)
                        if response.status_code < 500:
                            raise failure
                        reason = str(failure)
                    else:
                        down_since, delay = None, RECONNECT_FIRST_S
                        for sse in source.iter_sse():
                            if not sse.data or _id_order(sse.id) <= last_key:
                                continue
                            last_id, last_key = sse.id, _id_order(sse.id)
                            event = StreamEvent(sse.id, sse.event, json.loads(sse.data))
                            yield event
                            if event.terminal:
                                return
            except httpx.TransportError as exc:
                if not answered:
                    raise _unreachable(self.base_url, exc) from None
                reason = _describe(exc)
            except SSEError as exc:
                raise ClientError(f"{self.base_url} did not answer with an event stream ({exc})") from None
            down_since = self._check_give_up(down_since)
            yield Disconnected(reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _check_give_up(self, down_since: float | None) -> float:
        now = time.monotonic()
        if down_since is None:
            return now
        if now - down_since > RECONNECT_GIVE_UP_S:
            raise Unreachable(
                f"lost the connection to {self.base_url} and could not reconnect for "
                f"{RECONNECT_GIVE_UP_S:.0f} s; run the command again once the server is back"
            )
        return down_since
