"""Route declarations: every route is declared once with its models and scope, which is what
the router, the auth check and the OpenAPI document all read."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from pydantic import BaseModel

from critique_local.store.keys import Principal

Handler = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    scope: str | None  # None: no API key needed
    request: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    other_statuses: tuple[int, ...] = ()  # further success statuses with the same response body
    errors: tuple[int, ...] = ()
    sse: bool = False
    raw: tuple[str, str] | None = None  # a non-JSON success body: (content type, description)
    tag: str = "coding-agent"
