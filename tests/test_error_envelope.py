"""The one place errors become responses (``api/middleware.py``): an HTTP error that none of our
errors produced (aiohttp's own) still answers the error envelope with an ``ErrorCode`` member,
never a code made up from its reason phrase."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from critique_local.api.middleware import code_for_status, error_middleware
from critique_local.errors import ErrorCode


@pytest.mark.parametrize(("error", "code"), [
    (web.HTTPRequestHeaderFieldsTooLarge, ErrorCode.BAD_REQUEST),  # 431: no code of its own
    (web.HTTPGone, ErrorCode.BAD_REQUEST),
    (web.HTTPConflict, ErrorCode.CONFLICT),
    (web.HTTPUnsupportedMediaType, ErrorCode.UNSUPPORTED_MEDIA_TYPE),
    (web.HTTPServiceUnavailable, ErrorCode.INTERNAL_ERROR),
])
async def test_an_http_error_from_aiohttp_answers_an_error_code(error: type[web.HTTPException],
                                                                code: ErrorCode) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise error(text="what aiohttp said")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/x", handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.get("/x")
        assert resp.status == error.status_code
        assert await resp.json() == {"error": {"code": code.value, "message": "what aiohttp said"}}


def test_every_http_error_status_has_a_code() -> None:
    assert {code_for_status(status) for status in range(400, 600)} <= set(ErrorCode)
    assert code_for_status(404) is ErrorCode.NOT_FOUND and code_for_status(599) is ErrorCode.INTERNAL_ERROR
