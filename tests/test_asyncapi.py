"""The AsyncAPI document: valid AsyncAPI 3.0 (the official JSON Schema), kept in docs/, and true of
the payloads the server really sends (every WebSocket frame the tests receive is checked too, see
tests/wsclient.py)."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
from jsonschema import Draft7Validator, Draft202012Validator

from jobcast.asyncapi import build_asyncapi, render
from jobcast.worker.models import DeliveryStatus, JobError
from jobcast.worker.store import Store
from jobcast.worker.webhooks import Delivery

from .conftest import ROOT
from .test_sse import new_running_job

SPEC_SCHEMA = json.loads((ROOT / "tests" / "data" / "asyncapi-3.0.0.schema.json").read_text())


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _validator(document: dict[str, Any], schema: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{schema}", "components": document["components"]})


def test_the_document_is_valid_asyncapi_3() -> None:
    document = build_asyncapi()
    validator = Draft7Validator(SPEC_SCHEMA)
    assert list(validator.iter_errors(document)) == []
    # The schema does bite: an AsyncAPI 2 verb, or an operation without a channel, is refused.
    broken = copy.deepcopy(document)
    broken["operations"]["sendJobEvents"]["action"] = "publish"
    del broken["operations"]["sendWebhooks"]["channel"]
    assert len(list(validator.iter_errors(broken))) >= 2


def test_every_reference_resolves() -> None:
    document = build_asyncapi()
    refs = _refs(document)
    assert len(refs) > 40
    for ref in refs:
        _resolve(document, ref)
    # Operations reference messages of their own channel.
    for operation in document["operations"].values():
        channel = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel + "/messages/")


def test_docs_asyncapi_json_is_the_served_document() -> None:
    kept = (ROOT / "docs" / "asyncapi.json").read_bytes()
    assert kept == render(), "docs/asyncapi.json is stale: python -m jobcast.asyncapi > docs/asyncapi.json"


async def test_real_event_data_of_every_kind_matches_the_schema(store: Store) -> None:
    validator = _validator(build_asyncapi(), "EventData")
    error = JobError(type="ValueError", message="bad", retryable=True, attempt=1)
    retried = await new_running_job(store)
    await store.progress(retried, 1, 10, "step", "message")
    await store.retry(retried, 1, error, 0.5)
    failed = await new_running_job(store)
    await store.fail(failed, 1, error)
    completed = await new_running_job(store)
    await store.complete(completed, 1, orjson.dumps({"blob": "x" * 5000}).decode())  # large: result_url
    cancelled = await new_running_job(store)
    await store.cancel(cancelled, "acme")
    await store.mark_cancelled(cancelled, 1)
    seen = set()
    for job_id in (retried, failed, completed, cancelled):
        for event in await store.log_events("job", job_id):
            validator.validate(orjson.loads(event.data))
            seen.add(event.event)
    assert seen == {"job.queued", "job.processing", "job.progress", "job.retrying", "job.failed",
                    "job.completed", "job.cancelled"}  # fmt: skip


def test_webhook_bodies_match_the_schema() -> None:
    validator = _validator(build_asyncapi(), "WebhookBody")
    common: dict[str, Any] = dict(
        id="msg_x", tenant="acme", job_id="job_01ARZ3NDEKTSV4RRFFQ69G5FAV", url="https://example.com/hook",
        timestamp="2026-12-02T12:00:00.000000Z", created_at="", updated_at="", status=DeliveryStatus.PENDING,
        seq=1, tries=0, attempts=0, replays=0, deferrals=0, next_attempt_at=None, finished_at=None,
        last_error=None,
    )  # fmt: skip
    completed = Delivery(event="job.completed", job_status="completed", **common)
    progress = Delivery(
        event="job.progress", job_status="processing", progress='{"percent":50.0,"step":"half"}', **common
    )
    for delivery in (completed, progress):
        validator.validate(orjson.loads(delivery.body()))
    validator.validate(orjson.loads(completed.body(public_url="https://jobs.example.com")))


def test_the_resume_refusals_of_a_subscription_are_documented() -> None:
    """The error frames of a subscribe whose last_event_id cannot be resumed (400 ahead, 410 trimmed
    or lost) and the close of a channel whose last event a failover lost (1013)."""
    document = build_asyncapi()
    status = document["components"]["schemas"]["ErrorFrame"]["properties"]["status"]["description"]
    assert "400" in status and "ahead" in status and "410" in status and "failover" in status
    socket = next(channel for channel in document["channels"].values() if "1013" in channel.get("description", ""))
    assert "lost by a Redis failover" in socket["description"] and "410 error frame" in socket["description"]
