"""``POST /api/v1/chat/completions`` and ``GET /api/v1/models``: the OpenAI-compatible door.

Callers are either a sandbox (a per-run ``crs_`` token, valid only while a turn of its run is
running and only for the run's model) or a user (a ``crt_`` key with the ``inference`` scope). Provider
keys are added upstream-side in ``upstream.py`` and never leave the server.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from httpx_sse import ServerSentEvent
from pydantic import Field, ValidationError

from critique_local import billing, bounds
from critique_local.api.http import read_json, respond, validation_error
from critique_local.api.meta import model_view
from critique_local.api.middleware import bearer
from critique_local.api.registry import Route
from critique_local.api.schemas import Model, ModelList
from critique_local.appkeys import LIMITER, SERVICES, UPSTREAM
from critique_local.clock import now_iso
from critique_local.errors import (
    BadRequest,
    BudgetExceeded,
    ErrorCode,
    Forbidden,
    GatewayError,
    InvalidRequest,
    PaymentRequired,
    Unauthorized,
)
from critique_local.gateway import mcp_relay, scripted, wire
from critique_local.gateway.calls import CallLog
from critique_local.gateway.catalog import ModelEntry
from critique_local.gateway.metering import Meter
from critique_local.gateway.upstream import UpstreamError
from critique_local.runs.spec import ResourcesSpec
from critique_local.runs.states import RunStatus
from critique_local.services import Services
from critique_local.store import runs as store
from critique_local.store.keys import Principal, principal_for_key
from critique_local.store.runs import RunRow
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


@dataclass(frozen=True)
class Caller:
    run: RunRow | None
    user_id: str


async def _caller(s: Services, request: web.Request) -> Caller:
    """Who calls, after the rate limit of their key (or of their run, for sandbox tokens)."""
    token = bearer(request)
    limiter = request.app.get(LIMITER)
    if token and token.startswith(SANDBOX_TOKEN_PREFIX):
        run = await store.run_for_sandbox_token(s.db, token_hash(token))
        if run is None or run.status not in LIVE:
            raise Unauthorized("sandbox token is not valid (unknown run, or no turn of it is running)")
        if limiter is not None:
            limiter.check(f"run:{run.id}")
        return Caller(run, run.user_id)
    if token and token.startswith(API_KEY_PREFIX):
        principal: Principal | None = await principal_for_key(s.db, token)
        if principal is None:
            raise Unauthorized("invalid or revoked API key")
        if limiter is not None:
            limiter.check(principal.key_id)
        if "inference" not in principal.scopes:
            raise Forbidden("this key lacks the inference scope")
        return Caller(None, principal.user_id)
    raise Unauthorized("missing API key: send Authorization: Bearer crt_... (or a sandbox token)")


async def _entry_for(s: Services, caller: Caller, model_id: str) -> ModelEntry:
    if caller.run is not None and caller.run.model_id != model_id:
        raise Forbidden(f"this run may only use its own model, not {model_id!r}", code=ErrorCode.MODEL_NOT_ALLOWED)
    entry = s.catalog.get(model_id)
    if entry is None:
        raise InvalidRequest(f"unknown model {model_id!r}", field="model", code=ErrorCode.UNKNOWN_MODEL)
    if caller.run is None and not entry.allowed_for(await billing.plan_of(s.db, s.settings.billing, caller.user_id)):
        raise Forbidden(f"model {model_id} is not in your plan", field="model", code=ErrorCode.MODEL_NOT_IN_PLAN)
    return entry


def _byok(run: RunRow | None) -> bool:
    return run is not None and run.spec.byok


async def _check_budget(s: Services, caller: Caller, entry: ModelEntry, messages: list[dict[str, Any]]) -> None:
    """Refuse the call that would exceed a budget, before it is made."""
    run = caller.run
    if run is None:
        if not entry.free and await billing.balance(s.db, caller.user_id) <= 0:
            raise PaymentRequired("no credits left")
        return
    resources = run.spec.resources or ResourcesSpec()
    max_turns, max_credits = resources.max_turns, resources.max_credits
    if max_turns is not None:
        this_turn = await billing.usage(s.db, run.id, run.turn_count)
        if this_turn.model_calls >= max_turns:
            raise BudgetExceeded(f"budget_exceeded: maxTurns {max_turns} model calls per turn used up")
    if max_credits is not None:
        used = await billing.usage(s.db, run.id)
        projected = used.credits + entry.cost(scripted.estimate_tokens(messages), 0)
        if projected > max_credits:
            raise BudgetExceeded(f"budget_exceeded: maxCredits {max_credits} would be exceeded "
                                 f"({used.credits:.6f} used)")
    if not _byok(run) and not entry.free and await billing.balance(s.db, run.user_id) <= 0:
        raise BudgetExceeded("budget_exceeded: no credits left")


async def chat_completions(request: web.Request, principal: Principal) -> web.StreamResponse:
    s = request.app[SERVICES]
    caller = await _caller(s, request)
    raw = await read_json(request)
    if not isinstance(raw, dict):
        raise BadRequest("request body must be a JSON object", code=ErrorCode.BAD_JSON)
    try:
        req = ChatRequest.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc) from exc
    entry = await _entry_for(s, caller, req.model)
    await _check_budget(s, caller, entry, req.messages)
    meter = Meter(req.messages)
    # the run's model watch learns that the sandbox reached us, and how the provider answered
    log = s.model_calls.get(caller.run.id) if caller.run is not None else None
    call = log.start() if log is not None else -1
    if log is not None and caller.run is not None and log.calls == 1:  # the turn's first: firstModelCallAt
        await store.mark_first_model_call(s.db, caller.run.id, max(caller.run.turn_count, 1), now_iso())
    cancelled, outcome, started = False, "ok", time.monotonic()
    try:
        if entry.provider is None:
            if log is not None:
                log.answered(call)  # served in-process: an @sleep is the model thinking, not a provider away
            return await _scripted(request, req, raw, meter)
        return await _forward(request, s, caller, entry, raw, req.stream, meter, log, call)
    except asyncio.CancelledError:
        cancelled, outcome = True, "cancelled"
        raise
    except Exception as exc:
        outcome = str(getattr(exc, "code", ErrorCode.INTERNAL_ERROR))
        raise
    finally:
        if log is not None:
            log.end(call, cancelled=cancelled)
        usage = meter.result() if meter.reported is not None or meter.fed else None
        s.metrics.gateway_call(entry.id, entry.provider, outcome, usage[:2] if usage else None,
                               entry.cost(*usage[:2]) if usage else 0.0, time.monotonic() - started)
        if usage is not None:
            inp, out, estimated = usage
            await billing.record_call(
                s.db, user_id=caller.user_id, run_id=caller.run.id if caller.run else None,
                turn_idx=caller.run.turn_count if caller.run else None, model_id=entry.id, input_tokens=inp,
                output_tokens=out, credits=entry.cost(inp, out), estimated=estimated, billed=not _byok(caller.run))


async def _scripted(request: web.Request, req: ChatRequest, raw: dict[str, Any], meter: Meter) -> web.StreamResponse:
    reply = scripted.plan_reply(req.messages, bool(raw.get("tools")))
    if reply.delay_s:
        await asyncio.sleep(reply.delay_s)
    if reply.error is not None:
        raise BadRequest(f"scripted model: {reply.error}", code=ErrorCode.MODEL_ERROR)
    prompt_tokens = scripted.estimate_tokens(req.messages)
    completion_tokens = scripted.estimate_tokens([reply.text, reply.tool_args])
    if not req.stream:
        body = wire.completion(req.model, reply, prompt_tokens, completion_tokens)
        meter.feed(body)
        return web.json_response(body)
    include_usage = bool((raw.get("stream_options") or {}).get("include_usage"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        await resp.prepare(request)
        for chunk in wire.stream_chunks(req.model, reply, prompt_tokens, completion_tokens, include_usage):
            meter.feed(chunk)
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        meter.feed({"usage": wire.usage(prompt_tokens, completion_tokens)})  # we know exactly what we served
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionResetError:  # the agent went away (its turn was aborted): no one listens any more
        pass
    return resp


async def _forward(request: web.Request, s: Services, caller: Caller, entry: ModelEntry, raw: dict[str, Any],
                   stream: bool, meter: Meter, log: CallLog | None, call: int) -> web.StreamResponse:
    assert entry.provider is not None
    provider = s.settings.providers[entry.provider]
    if _byok(caller.run):
        assert caller.run is not None
        sealed = await store.byok_key(s.db, caller.run.id)
        if sealed is None:
            raise PaymentRequired("this run's provider key is gone", code=ErrorCode.BYOK_KEY_MISSING)
        base = s.settings.providers.get(s.settings.billing.byok_provider, provider)
        provider = base.model_copy(update={"api_key": s.box.open(sealed, caller.run.id)})
    body = {**raw, "model": entry.upstream_id}
    if stream:
        body["stream_options"] = {**(raw.get("stream_options") or {}), "include_usage": True}
    upstream = request.app[UPSTREAM]

    def answered() -> None:
        if log is not None:
            log.answered(call)

    def failed(exc: UpstreamError) -> None:
        s.metrics.upstream_error(entry.provider, exc.code)
        if log is None:
            return
        if exc.unavailable:
            log.failed(call, exc.message)
        else:
            log.answered(call)  # it answered, and refused: reachable

    try:
        if not stream:
            data = await upstream.complete(provider, body)
            answered()
            meter.feed(data)
            return web.json_response(data)
        events = upstream.stream(provider, body, answered)
        first = await anext(events)
    except UpstreamError as exc:
        failed(exc)
        raise GatewayError(exc.message, code=exc.code, status=exc.status) from exc
    except StopAsyncIteration:
        raise GatewayError("upstream closed the stream without data") from None
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        await _relay(resp, first, meter)
        async for event in events:
            await _relay(resp, event, meter)
    except UpstreamError as exc:
        failed(exc)
        err = {"error": {"code": exc.code, "message": exc.message}}
        await resp.write(f"data: {json.dumps(err)}\n\n".encode())
    await resp.write_eof()
    return resp


async def _relay(resp: web.StreamResponse, event: ServerSentEvent, meter: Meter) -> None:
    if event.data and event.data != "[DONE]":
        try:
            meter.feed(bounds.loads(event.data))
        except ValueError:
            pass
    await resp.write(f"data: {event.data}\n\n".encode())


async def list_models(request: web.Request, principal: Principal) -> web.StreamResponse:
    s = request.app[SERVICES]
    caller = await _caller(s, request)
    entries = s.catalog.all()
    if caller.run is not None:
        entries = [e for e in entries if e.id == caller.run.model_id]
    else:
        plan = await billing.plan_of(s.db, s.settings.billing, caller.user_id)
        entries = [e for e in entries if e.allowed_for(plan)]
    return respond(ModelList(data=[model_view(e) for e in entries]))


ROUTES = [
    Route("POST", "/api/v1/chat/completions", chat_completions,
          "OpenAI-compatible chat completions (sandbox token or a key with the inference scope)", None,
          errors=(400, 401, 402, 403, 408, 413, 422, 429, 502, 504), tag="inference"),
    Route("GET", "/api/v1/models", list_models, "Models (OpenAI-compatible list)", None, response=ModelList,
          errors=(401, 403, 429), tag="inference"),
    *mcp_relay.ROUTES,
]
