"""Health, the model list and the OpenAPI document."""

from __future__ import annotations

import functools
import json

from aiohttp import web

from critique_local import __version__, billing
from critique_local.api.http import respond
from critique_local.api.openapi import document
from critique_local.api.registry import Route
from critique_local.api.schemas import Health, ModelList, ModelView
from critique_local.appkeys import POOL, SERVED_ROUTES, SERVICES
from critique_local.gateway.catalog import ModelEntry
from critique_local.store.keys import Principal


async def healthz(request: web.Request, principal: Principal) -> web.StreamResponse:
    s = request.app[SERVICES]
    return respond(Health(ok=True, version=__version__, backend=s.backend.name,
                          warm_sandboxes=request.app[POOL].ready_count))


async def models(request: web.Request, principal: Principal) -> web.StreamResponse:
    """The models the caller's plan may use."""
    s = request.app[SERVICES]
    plan = await billing.plan_of(s.db, s.settings.billing, principal.user_id)
    return respond(ModelList(data=[model_view(m) for m in s.catalog.all() if m.allowed_for(plan)]))


def model_view(m: ModelEntry) -> ModelView:
    return ModelView(id=m.id, name=m.name, provider=m.provider or "critique-local", context_tokens=m.context_tokens,
                     input_price=m.input_price, output_price=m.output_price, plans=list(m.plans))


async def openapi(request: web.Request, principal: Principal) -> web.StreamResponse:
    """The document of the routes this application serves."""
    # unauthenticated and ~50 ms of CPU to build: built once, not on every request
    return web.Response(body=_document(request.app[SERVED_ROUTES], request.app[SERVICES].public_url),
                        content_type="application/json")


@functools.lru_cache(maxsize=4)
def _document(routes: tuple[Route, ...], public_url: str) -> bytes:
    return json.dumps(document(routes, public_url)).encode()


ROUTES = [
    Route("GET", "/healthz", healthz, "Liveness", None, response=Health, tag="meta"),
    Route("GET", "/api/v1/coding-agent/models", models, "Models a run may use", "read:builder",
          response=ModelList, errors=(401, 403)),
    Route("GET", "/api/v1/openapi.json", openapi, "This OpenAPI 3.1 document", None, tag="meta"),
]
