"""Serve one ASGI application call from an aiohttp handler (HTTP only, no websockets, no lifespan).

The MCP SDK's Streamable HTTP transport is an ASGI app; this bridge lets it answer a request
that aiohttp has already routed, authenticated and rate-limited, in the same process and event
loop. The caller reads the body (bounded by the app's ``client_max_size`` and the body deadline)
before the ASGI app runs; the response streams (Server-Sent Events included) as the app sends it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aiohttp import web

from critique_local.errors import ErrorCode

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def http_scope(request: web.Request, extra: dict[str, Any]) -> Scope:
    """The ASGI HTTP connection scope of ``request`` plus ``extra`` keys (e.g. ``user``)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.raw_path.split("?", 1)[0].encode("latin-1", "replace"),
        "query_string": request.query_string.encode("latin-1", "replace"),
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in request.raw_headers],
        "client": tuple(peer[:2]) if isinstance(peer, tuple) else None,
        "server": tuple(sock[:2]) if isinstance(sock, tuple) else None,
        "state": {},
        **extra,
    }


async def call_asgi(request: web.Request, app: ASGIApp, extra: dict[str, Any], body: bytes) -> web.StreamResponse:
    """Run ``app`` for ``request``, whose ``body`` the caller has read (and bounded), and return
    what it answered. A client that goes away is reported to the app as ``http.disconnect``;
    writes after that are dropped."""
    finished = asyncio.Event()
    body_sent = False
    response: web.StreamResponse | None = None

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal response
        if finished.is_set():
            return
        try:
            if message["type"] == "http.response.start":
                response = web.StreamResponse(status=int(message["status"]))
                for key, value in message.get("headers", []):
                    response.headers.add(bytes(key).decode("latin-1"), bytes(value).decode("latin-1"))
                await response.prepare(request)
            elif message["type"] == "http.response.body" and response is not None:
                chunk = bytes(message.get("body", b""))
                if chunk:
                    await response.write(chunk)
                if not message.get("more_body", False):
                    await response.write_eof()
                    finished.set()
        except ConnectionError:  # the client went away mid-response
            finished.set()

    try:
        await app(http_scope(request, extra), receive, send)
    finally:
        finished.set()
    if response is None:
        return web.json_response({"error": {"code": ErrorCode.INTERNAL_ERROR.value, "message": "no response"}},
                                 status=500)
    return response
