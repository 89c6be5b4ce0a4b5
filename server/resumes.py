"""Where a stream resumes: what a client is told when the id it resumes from cannot be resumed.

The check itself is one round trip, :meth:`jobcast.limits.StreamSlots.open_log`
(``worker/lua/streams.lua``), made the same way by the SSE streams (``Last-Event-ID``, answered
with HTTP problem details) and by WebSocket subscriptions (``last_event_id``, answered with an
error frame of the same problem). Its outcomes mean:

- ``gone`` (410): events after the id were trimmed from the (capped) log;
- ``lost`` (410): the id is not in the log and may have been lost when the cell's primary changed
  (its epoch, see docs/design/sentinel.md): events the client received may have been undone;
- ``ahead`` (400): the id is past the log's newest event, so not one this stream sent;
- ``missing`` (404, job streams): no such job for the tenant in Redis (it may be archived);
- ``over`` (job streams): the job ended and nothing follows the id;
- ``full`` (429, SSE only): the tenant's stream cap.
"""

from __future__ import annotations

from dataclasses import dataclass

from .problems import BadRequest, GoneProblem, Problem


@dataclass(frozen=True)
class Wording:
    """How a client names the id it resumes from, and how it starts over."""

    last_id: str
    start_over: str


SSE = Wording(last_id="Last-Event-ID", start_over="reconnect without Last-Event-ID")
WS = Wording(last_id="last_event_id", start_over="subscribe without last_event_id")


def refusal(outcome: str, last_id: str, tip: str, how: Wording) -> Problem | None:
    """The problem of a resume that cannot be made (``gone``, ``lost``, ``ahead``); None otherwise."""
    if outcome == "gone":
        return GoneProblem(
            f"Events after {last_id} are no longer in the log (it is capped). Reload the current state "
            f"with GET /jobs, then {how.start_over}."
        )
    if outcome == "lost":
        return GoneProblem(
            f"Event {last_id} is not in the log: Redis lost it when its primary changed (failover, or a "
            "restart that lost its last writes), so events you received may have been undone. Reload the "
            f"current state with GET /jobs (or GET /jobs/{{id}}), then {how.start_over}."
        )
    if outcome == "ahead":
        newest = f"its newest event is {tip}" if tip else "it has no events yet"
        return BadRequest(
            f"{how.last_id} {last_id} is ahead of this stream ({newest}): it is not an id this stream sent. "
            f"Resume from the id of the last event you received, or {how.start_over}."
        )
    return None
