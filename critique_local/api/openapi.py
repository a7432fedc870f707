"""OpenAPI 3.1, generated from the route list the application serves (``api/routes.py``) and
the pydantic models (pydantic writes every schema; this module only lays out paths and
components)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from critique_local import __version__
from critique_local.api.registry import Route
from critique_local.api.schemas import ErrorEnvelope
from critique_local.runs.states import LIFECYCLE_DOC, NEXT_ACTIONS_DOC

REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _parameters(route: Route) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", route.path)
    ]
    if route.query is not None:
        schema = route.query.model_json_schema(by_alias=True, ref_template=REF)
        for name, prop in schema.get("properties", {}).items():
            params.append({"name": name, "in": "query", "required": name in schema.get("required", []),
                           "schema": prop, "description": prop.get("description", "")})
    if route.method == "POST" and route.path == "/api/v1/coding-agent/runs":
        params.append({"name": "Idempotency-Key", "in": "header", "required": False,
                       "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                       "description": "Same key + same body within 24 h returns the original run."})
    if route.sse:
        params.append({"name": "Last-Event-ID", "in": "header", "required": False,
                       "schema": {"type": "string", "pattern": "^[0-9]+$"}})
    return params


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": route.summary, "tags": [route.tag],
                          "operationId": route.handler.__name__, "parameters": _parameters(route)}
    if route.scope is not None or route.tag == "inference":
        op["security"] = [{"bearer": []}]
        if route.scope:
            op["description"] = f"Requires scope `{route.scope}`."
    if route.request is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(route.request)}}}
    responses: dict[str, Any] = {}
    if route.sse:
        responses["200"] = {"description": "Server-Sent Events (builder.event, run.status)",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    elif route.raw is not None:
        responses[str(route.status)] = {"description": route.raw[1],
                                        "content": {route.raw[0]: {"schema": {"type": "string", "format": "binary"}}}}
    elif route.response is not None:
        for status in (route.status, *route.other_statuses):
            responses[str(status)] = {"description": "OK",
                                      "content": {"application/json": {"schema": _ref(route.response)}}}
    else:
        responses[str(route.status)] = {"description": "OK",
                                        "content": {"application/json": {"schema": {"type": "object"}}}}
    errors = set(route.errors) | ({429} if route.scope is not None else set())  # per-key rate limit
    if route.request is not None:
        errors.add(408)  # the body did not arrive within limits.request_body_timeout_s
    for status in sorted(errors):
        responses[str(status)] = {"description": "Error", "content": {"application/json": {"schema": _ref(ErrorEnvelope)}}}
    op["responses"] = responses
    return op


def document(routes: Sequence[Route], server_url: str = "") -> dict[str, Any]:
    """The OpenAPI document of ``routes`` as JSON-ready dicts (``servers`` lists ``server_url``)."""
    models: set[type[BaseModel]] = {ErrorEnvelope}
    for r in routes:
        models.update(m for m in (r.request, r.response) if m is not None)
    _, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                 by_alias=True, ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        if r.tag == "ui":  # the web page is not part of the API
            continue
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r)
    lifecycle = "\n".join(f"- `{k}`: {v}" for k, v in LIFECYCLE_DOC.items())
    actions = "\n".join(f"- `{k}`: {v}" for k, v in NEXT_ACTIONS_DOC.items())
    return {
        "openapi": "3.1.0",
        "info": {"title": "critique-local Coding Agent API", "version": __version__,
                 "description": f"Lifecycle values:\n{lifecycle}\n\nnextActions values:\n{actions}"},
        "servers": [{"url": server_url}] if server_url else [],
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
