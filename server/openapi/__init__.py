"""The OpenAPI 3.1 document of the HTTP API, built from the pydantic models.

Request and response bodies are pydantic models (the same ones the routes validate and render
with, :mod:`jobcast.resources`); the document is assembled once per process from their JSON
Schemas, with the registered job types as the ``type`` enum. The operations are written next to
each other per resource, mirroring :mod:`jobcast.routes`. The test suite fuzzes a live server
against the document (schemathesis), so the document and the behaviour cannot drift apart silently.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from jobcast.worker.models import Priority
from jobcast.worker.types import Registry

from ..resources import MODELS
from . import events, jobs, service, webhooks
from .common import REF, problems
from .query import documented_query_params, enforce_documented_query, refuse_undocumented

__all__ = ["build_openapi", "documented_query_params", "enforce_documented_query", "refuse_undocumented"]


def build_openapi(registry: Registry) -> dict[str, Any]:
    _, definitions = models_json_schema([(m, "serialization") for m in MODELS], ref_template=REF)
    schemas = definitions["$defs"]
    # One variant per job type, so that the document says exactly which params each type takes.
    variants = []
    for jt in registry:
        params = jt.params.model_json_schema(ref_template=REF)
        for name, schema in params.pop("$defs", {}).items():
            schemas.setdefault(name, schema)
        name = f"Submission_{jt.name}"
        schemas[name] = {
            "type": "object",
            "title": f"Submission of a {jt.name!r} job",
            "properties": {
                "type": {"const": jt.name},
                "params": params,
                "priority": {"anyOf": [{"$ref": REF.format(model="Priority")}, {"type": "null"}]},
                "webhook": {"anyOf": [{"$ref": REF.format(model="WebhookSpec")}, {"type": "null"}]},
            },
            # params may be left out when the type needs none of them.
            "required": ["type", "params"] if params.get("required") else ["type"],
            "additionalProperties": False,
        }
        variants.append({"$ref": REF.format(model=name)})
    schemas["Submission"] = {"oneOf": variants, "discriminator": {"propertyName": "type"}}
    schemas.setdefault("Priority", {"type": "string", "enum": [p.value for p in Priority], "title": "Priority"})

    paths: dict[str, Any] = {**jobs.paths(registry), **events.paths(), **webhooks.paths(), **service.paths()}
    for operations in paths.values():
        for operation in operations.values():
            # Unknown query parameters are refused everywhere (enforce_documented_query).
            operation["responses"].setdefault("400", problems("400")["400"])
            # Any request head can be too large (jobcast.http_guard answers before routing).
            operation["responses"].setdefault("431", problems("431")["431"])
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Jobcast",
            "version": "1",
            "description": "Long-running jobs: submit, follow (poll, long-poll, Server-Sent Events), cancel.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "API key, or a job/stream token."},
                "token": {"type": "apiKey", "in": "query", "name": "token", "description": "Job or stream token."},
            },
        },
        "security": [{"bearer": []}],
    }
