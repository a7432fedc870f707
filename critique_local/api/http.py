"""Request parsing and response helpers shared by the routes."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from critique_local import bounds
from critique_local.appkeys import SERVICES
from critique_local.errors import BadRequest, ErrorCode, InvalidRequest, RequestTimeout

M = TypeVar("M", bound=BaseModel)


def validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return InvalidRequest(f"unknown field: {field}", field=field, code=ErrorCode.UNKNOWN_FIELD)
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequest(f"{field}: {message}" if field else message, field=field)


async def read_json(request: web.Request) -> Any:
    """The request body as JSON. Raises :class:`RequestTimeout` (408) when it does not arrive
    within ``limits.request_body_timeout_s`` and ``BadRequest`` (400 ``bad_json``) when it is
    empty, not JSON, or nested deeper than :data:`bounds.MAX_JSON_DEPTH`."""
    try:
        async with asyncio.timeout(request.app[SERVICES].settings.limits.request_body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeout("the request body did not arrive in time (limits.request_body_timeout_s)") from None
    if not raw:
        raise BadRequest("request body must be a JSON object", code=ErrorCode.BAD_JSON)
    try:
        return bounds.loads(raw)
    except bounds.TooDeep as exc:
        raise BadRequest(f"request body is nested too deeply: {exc}", code=ErrorCode.BAD_JSON) from exc
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code=ErrorCode.BAD_JSON) from exc


def header(request: web.Request, name: str, max_chars: int) -> str | None:
    """A header that must be 1-``max_chars`` printable ASCII characters, or None when absent.
    Raises ``InvalidRequest`` naming the header otherwise (bytes that are not UTF-8 included)."""
    value = request.headers.get(name)
    if value is None:
        return None
    if not (0 < len(value) <= max_chars and value.isascii() and value.isprintable()):
        raise InvalidRequest(f"{name} must be 1-{max_chars} printable ASCII characters", field=name)
    return value


async def parse_body(request: web.Request, model: type[M]) -> tuple[M, Any]:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code=ErrorCode.BAD_JSON)
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
