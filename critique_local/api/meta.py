"""Health, the model list and the OpenAPI document."""

from __future__ import annotations

from aiohttp import web

from critique_local import __version__
from critique_local.api.http import respond
from critique_local.api.registry import Route
from critique_local.api.schemas import Health, ModelList, ModelView
from critique_local.appkeys import SERVICES
from critique_local.store.keys import Principal


async def healthz(request: web.Request, principal: Principal) -> web.StreamResponse:
    s = request.app[SERVICES]
    return respond(Health(ok=True, version=__version__, backend=s.backend.name))


async def models(request: web.Request, principal: Principal) -> web.StreamResponse:
    s = request.app[SERVICES]
    return respond(ModelList(data=[
        ModelView(id=m.id, name=m.name, provider=m.provider or "critique-local", context_tokens=m.context_tokens)
        for m in s.catalog.all()
    ]))


async def openapi(request: web.Request, principal: Principal) -> web.StreamResponse:
    from critique_local.api.openapi import document

    return web.json_response(document(request.app[SERVICES].public_url))


ROUTES = [
    Route("GET", "/healthz", healthz, "Liveness", None, response=Health, tag="meta"),
    Route("GET", "/api/v1/coding-agent/models", models, "Models a run may use", "read:builder",
          response=ModelList, errors=(401, 403)),
    Route("GET", "/api/v1/openapi.json", openapi, "This OpenAPI 3.1 document", None, tag="meta"),
]
