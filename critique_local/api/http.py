"""Request parsing and response helpers shared by the routes."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from critique_local.errors import BadRequest, InvalidRequest

M = TypeVar("M", bound=BaseModel)


def validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return InvalidRequest(f"unknown field: {field}", field=field, code="unknown_field")
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequest(f"{field}: {message}" if field else message, field=field)


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        raise BadRequest("request body must be a JSON object", code="bad_json")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="bad_json") from exc


async def parse_body(request: web.Request, model: type[M]) -> tuple[M, Any]:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code="bad_json")
    try:
        return model.model_validate(data), data
    except ValidationError as exc:
        raise validation_error(exc) from exc


def parse_query(request: web.Request, model: type[M]) -> M:
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as exc:
        raise validation_error(exc) from exc


def respond(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=model.model_dump_json(by_alias=True).encode(), status=status,
                        content_type="application/json")
