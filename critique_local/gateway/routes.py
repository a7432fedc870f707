"""``POST /api/v1/chat/completions`` and ``GET /api/v1/models``: the OpenAI-compatible door.

Callers are either a sandbox (a per-run ``crs_`` token, valid only while a turn of its run is
running and only for the run's model) or a user (a ``crt_`` key with the ``inference`` scope). Provider
keys are added upstream-side in ``upstream.py`` and never leave the server.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import Field, ValidationError

from critique_local.api.http import read_json, respond, validation_error
from critique_local.api.middleware import bearer
from critique_local.api.registry import Route
from critique_local.api.schemas import Model, ModelList, ModelView
from critique_local.appkeys import SERVICES, UPSTREAM
from critique_local.errors import ApiError, BadRequest, Forbidden, InvalidRequest, Unauthorized
from critique_local.gateway import scripted, wire
from critique_local.gateway.catalog import ModelEntry
from critique_local.gateway.upstream import UpstreamError
from critique_local.runs.states import RunStatus
from critique_local.services import Services
from critique_local.store import runs as store
from critique_local.store.keys import Principal, principal_for_key
from critique_local.tokens import API_KEY_PREFIX, SANDBOX_TOKEN_PREFIX, token_hash

# A sandbox may call models only while one of its turns runs: a process left behind in an idle
# sandbox cannot spend anything.
LIVE = (RunStatus.RUNNING,)


class ChatRequest(Model):
    """The fields we read; everything else is forwarded to the provider unchanged."""

    model_config = {"extra": "allow", "populate_by_name": True}
    model: str = Field(max_length=200)
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=10_000)
    stream: bool = False


class GatewayError(ApiError):
    status = 502
    code = "upstream_error"


@dataclass(frozen=True)
class Caller:
    run_id: str | None
    user_id: str


async def _caller(s: Services, request: web.Request) -> Caller:
    token = bearer(request)
    if token and token.startswith(SANDBOX_TOKEN_PREFIX):
        run = await store.run_for_sandbox_token(s.db, token_hash(token))
        if run is None or run.status not in LIVE:
            raise Unauthorized("sandbox token is not valid (unknown run, or the run is not live)")
        return Caller(run.id, run.user_id)
    if token and token.startswith(API_KEY_PREFIX):
        principal: Principal | None = await principal_for_key(s.db, token)
        if principal is None:
            raise Unauthorized("invalid or revoked API key")
        if "inference" not in principal.scopes:
            raise Forbidden("this key lacks the inference scope")
        return Caller(None, principal.user_id)
    raise Unauthorized("missing API key: send Authorization: Bearer crt_... (or a sandbox token)")


async def _entry_for(s: Services, caller: Caller, model_id: str) -> ModelEntry:
    if caller.run_id is not None:
        run = await store.get_run(s.db, caller.run_id)
        if run is None or run.model_id != model_id:
            raise Forbidden(f"this run may only use its own model, not {model_id!r}", code="model_not_allowed")
    entry = s.catalog.get(model_id)
    if entry is None:
        raise InvalidRequest(f"unknown model {model_id!r}", field="model", code="unknown_model")
    return entry


async def chat_completions(request: web.Request, principal: Principal) -> web.StreamResponse:
    s = request.app[SERVICES]
    caller = await _caller(s, request)
    raw = await read_json(request)
    if not isinstance(raw, dict):
        raise BadRequest("request body must be a JSON object", code="bad_json")
    try:
        req = ChatRequest.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc) from exc
    entry = await _entry_for(s, caller, req.model)
    if entry.provider is None:
        return await _scripted(request, req, raw)
    return await _forward(request, s, entry, raw, req.stream)


async def _scripted(request: web.Request, req: ChatRequest, raw: dict[str, Any]) -> web.StreamResponse:
    reply = scripted.plan_reply(req.messages, bool(raw.get("tools")))
    if reply.delay_s:
        await asyncio.sleep(reply.delay_s)
    if reply.error is not None:
        raise BadRequest(f"scripted model: {reply.error}", code="model_error")
    prompt_tokens = scripted.estimate_tokens(req.messages)
    completion_tokens = scripted.estimate_tokens([reply.text, reply.tool_args])
    if not req.stream:
        return web.json_response(wire.completion(req.model, reply, prompt_tokens, completion_tokens))
    include_usage = bool((raw.get("stream_options") or {}).get("include_usage"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for chunk in wire.stream_chunks(req.model, reply, prompt_tokens, completion_tokens, include_usage):
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _forward(
    request: web.Request, s: Services, entry: ModelEntry, raw: dict[str, Any], stream: bool
) -> web.StreamResponse:
    assert entry.provider is not None
    provider = s.settings.providers[entry.provider]
    body = {**raw, "model": entry.upstream_id}
    upstream = request.app[UPSTREAM]
    try:
        if not stream:
            return web.json_response(await upstream.complete(provider, body))
        chunks = upstream.stream(provider, body)
        first = await anext(chunks)
    except UpstreamError as exc:
        raise GatewayError(exc.message, code="upstream_error") from exc
    except StopAsyncIteration:
        first = b""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(first)
    try:
        async for chunk in chunks:
            await resp.write(chunk)
    except UpstreamError as exc:
        err = {"error": {"code": "upstream_error", "message": exc.message}}
        await resp.write(f"data: {json.dumps(err)}\n\n".encode())
    await resp.write_eof()
    return resp


async def list_models(request: web.Request, principal: Principal) -> web.StreamResponse:
    s = request.app[SERVICES]
    caller = await _caller(s, request)
    entries = s.catalog.all()
    if caller.run_id is not None:
        run = await store.get_run(s.db, caller.run_id)
        entries = [e for e in entries if run is not None and e.id == run.model_id]
    return respond(ModelList(data=[
        ModelView(id=e.id, name=e.name, provider=e.provider or "critique-local", context_tokens=e.context_tokens)
        for e in entries
    ]))


ROUTES = [
    Route("POST", "/api/v1/chat/completions", chat_completions,
          "OpenAI-compatible chat completions (sandbox token or a key with the inference scope)", None,
          errors=(400, 401, 403, 422, 502), tag="inference"),
    Route("GET", "/api/v1/models", list_models, "Models (OpenAI-compatible list)", None, response=ModelList,
          errors=(401, 403), tag="inference"),
]
