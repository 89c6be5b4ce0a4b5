"""The AsyncAPI 3.0 document of every channel: the two SSE streams, the WebSocket, the webhooks.

Served at ``GET /asyncapi.json`` and kept in ``docs/asyncapi.json`` (``python -m jobcast.asyncapi``
writes it; a test checks the two are the same). The payload schemas are the JSON Schemas of the
pydantic models the server parses with (the WebSocket frames, :mod:`jobcast.ws.frames`) or that the
tests check real payloads against (event data, webhook bodies, :mod:`jobcast.resources`), built the
way the OpenAPI document builds its own, so the documents cannot drift from the code.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from jobcast.worker.models import EventName

from .resources import EventData, Problem, WebhookBody
from .ws.frames import CLIENT_MODELS, SERVER_MODELS

REF = "#/components/schemas/{model}"

SSE_DESCRIPTION = (
    "Server-Sent Events (text/event-stream). Each message is one event: its `id:` line is the event's id in "
    "this stream's log, its `event:` line the event name, its `data:` line the payload below. Resume with the "
    "Last-Event-ID header or ?last_event_id=. See docs/API.md, Server-Sent Events."
)
WS_DESCRIPTION = (
    "One WebSocket for many channels ('job:<job id>' and 'tenant'). Every frame is one JSON text message. "
    "The client sends subscribe, unsubscribe, cancel and ping, each with a 'ref' echoed in the reply (ok, "
    "pong or error); the server sends event frames (id, event and data exactly as the channel's SSE stream) "
    "and an end frame after a job's terminal event. Close codes: 1012 server restart, 1013 too slow, "
    "store unavailable, or a channel's last event lost by a Redis failover; on either, reconnect and "
    "re-subscribe with the last id of each channel (a lost one is answered with a 410 error frame). "
    "See docs/API.md, WebSocket."
)


def _message_name(event: EventName) -> str:
    return event.value.replace(".", "_")


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def build_asyncapi() -> dict[str, Any]:
    models: list[type[BaseModel]] = [EventData, WebhookBody, Problem, *CLIENT_MODELS.values(), *SERVER_MODELS.values()]
    _, definitions = models_json_schema([(m, "serialization") for m in models], ref_template=REF)
    schemas: dict[str, Any] = definitions["$defs"]

    messages: dict[str, Any] = {}
    for event in EventName:
        messages[_message_name(event)] = {
            "name": event.value,
            "title": event.value,
            "summary": f"The SSE event '{event.value}' (event: {event.value}).",
            "contentType": "application/json",
            "payload": _ref("schemas", "EventData"),
        }
    for op, model in [*CLIENT_MODELS.items(), *SERVER_MODELS.items()]:
        messages[f"ws_{op}"] = {
            "name": op,
            "title": f"{op} frame",
            "summary": " ".join((model.__doc__ or op).split()),
            "contentType": "application/json",
            "payload": _ref("schemas", model.__name__),
        }
    messages["webhook"] = {
        "name": "webhook",
        "title": "Webhook delivery",
        "summary": "A signed POST (Standard Webhooks) for each event the job's webhook asks for.",
        "contentType": "application/json",
        "headers": {
            "type": "object",
            "required": ["webhook-id", "webhook-timestamp", "webhook-signature"],
            "properties": {
                "webhook-id": {"type": "string", "description": "Unique per event; the same on every retry."},
                "webhook-timestamp": {"type": "string", "description": "Unix seconds of this attempt."},
                "webhook-signature": {"type": "string", "description": "v1,<base64 HMAC-SHA256>, space separated."},
            },
        },
        "payload": _ref("schemas", "WebhookBody"),
    }

    sse_messages = {_message_name(e): _ref("messages", _message_name(e)) for e in EventName}
    client_ops = list(CLIENT_MODELS)
    ws_messages = {f"ws_{op}": _ref("messages", f"ws_{op}") for op in [*CLIENT_MODELS, *SERVER_MODELS]}
    channels = {
        "jobEvents": {
            "address": "/jobs/{job_id}/events",
            "title": "One job's events (SSE)",
            "description": SSE_DESCRIPTION + " The job's history is replayed first; the stream ends after the "
            "terminal event.",
            "servers": [{"$ref": "#/servers/http"}],
            "parameters": {"job_id": {"description": "The job's id."}},
            "messages": sse_messages,
        },
        "tenantEvents": {
            "address": "/events",
            "title": "The tenant's feed (SSE)",
            "description": SSE_DESCRIPTION + " Starts live; never ends by itself.",
            "servers": [{"$ref": "#/servers/http"}],
            "messages": sse_messages,
        },
        "socket": {
            "address": "/ws",
            "title": "Many channels over one WebSocket",
            "description": WS_DESCRIPTION,
            "servers": [{"$ref": "#/servers/ws"}],
            "messages": ws_messages,
            "bindings": {
                "ws": {
                    "method": "GET",
                    "query": {
                        "type": "object",
                        "properties": {"token": {"type": "string", "description": "A job or stream token."}},
                    },
                    "bindingVersion": "0.1.0",
                }
            },
        },
        "webhooks": {
            "address": None,
            "title": "Webhook deliveries",
            "description": "POSTed to the URL given in the submission's webhook (so the address is per job).",
            "messages": {"webhook": _ref("messages", "webhook")},
        },
    }

    def on(channel: str, names: list[str]) -> list[dict[str, str]]:
        return [{"$ref": f"#/channels/{channel}/messages/{name}"} for name in names]

    read_security = [_ref("securitySchemes", "bearer"), _ref("securitySchemes", "token")]

    def sse_operation(channel: str, summary: str) -> dict[str, Any]:
        return {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel}"},
            "summary": summary,
            "security": read_security,
            "bindings": {"http": {"method": "GET", "bindingVersion": "0.3.0"}},
            "messages": on(channel, list(sse_messages)),
        }

    operations = {
        "sendJobEvents": sse_operation("jobEvents", "GET /jobs/{job_id}/events"),
        "sendTenantEvents": sse_operation("tenantEvents", "GET /events"),
        "receiveSocketRequests": {
            "action": "receive",
            "channel": {"$ref": "#/channels/socket"},
            "summary": "Client requests over GET /ws, each answered by ok (pong for ping) or error.",
            "security": read_security,
            "messages": on("socket", [f"ws_{op}" for op in client_ops]),
            "reply": {
                "channel": {"$ref": "#/channels/socket"},
                "messages": on("socket", ["ws_ok", "ws_pong", "ws_error"]),
            },
        },
        "sendSocketEvents": {
            "action": "send",
            "channel": {"$ref": "#/channels/socket"},
            "summary": "Events of the subscribed channels, and the end of a job channel.",
            "messages": on("socket", ["ws_event", "ws_end"]),
        },
        "sendWebhooks": {
            "action": "send",
            "channel": {"$ref": "#/channels/webhooks"},
            "summary": "Webhook deliveries, retried with backoff, dead-lettered after the last try.",
            "bindings": {"http": {"method": "POST", "bindingVersion": "0.3.0"}},
            "messages": on("webhooks", ["webhook"]),
        },
    }
    host = {"host": {"default": "localhost:8000", "description": "The Jobcast server."}}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Jobcast events",
            "version": "1",
            "description": "Every channel Jobcast sends job events on. The HTTP API is in /openapi.json.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "http": {"host": "{host}", "protocol": "http", "variables": host},
            "ws": {"host": "{host}", "protocol": "ws", "variables": host},
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": messages,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "API key, or a job/stream token."},
                "token": {"type": "httpApiKey", "in": "query", "name": "token", "description": "Job or stream token."},
            },
        },
    }


def render() -> bytes:
    """The document as served and as kept in docs/asyncapi.json."""
    return orjson.dumps(build_asyncapi(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


if __name__ == "__main__":
    sys.stdout.buffer.write(render())
