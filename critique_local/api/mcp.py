"""``/api/mcp``: this server as a Model Context Protocol server (Streamable HTTP).

The official ``mcp`` SDK's session manager answers the protocol; it runs in this process and
event loop behind the same route machinery as the REST API (``crt_`` key, scope ``read:builder``
and the per-key rate limit are checked before it sees a byte: 401/403/429 at HTTP level). It is
stateless: every POST is a complete exchange, so nothing is held per MCP session and a
``tools/call`` that waits streams its progress notifications on that POST's own response.

Tools call the functions the REST handlers call (``api.runs``, ``api.meta``, ``runs.control``);
their schemas are the REST models'. An :class:`ApiError` comes back as a tool result with
``isError`` and ``structuredContent = {"error": {"code", "message", "field"?}}``, the REST
error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import mcp_types as types
from aiohttp import web
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from pydantic import BaseModel, Field, SecretStr, ValidationError

from critique_local import __version__
from critique_local.api import meta
from critique_local.api import runs as rest
from critique_local.api.asgi import call_asgi
from critique_local.api.http import read_json, validation_error
from critique_local.api.registry import Route
from critique_local.api.schemas import (
    CreateRunRequest,
    ListRunsQuery,
    MessageRequest,
    Model,
    ModelList,
    RunEnvelope,
    RunList,
)
from critique_local.appkeys import CONTROL, SERVICES, SETTINGS
from critique_local.errors import (
    ApiError,
    BadRequest,
    ErrorCode,
    Forbidden,
    InvalidRequest,
    NotAcceptable,
    UnsupportedMediaType,
)
from critique_local.ops import auditing
from critique_local.runs.spec import FollowUp
from critique_local.runs.states import TERMINAL, RunStatus
from critique_local.store import events as events_store
from critique_local.store import runs as runs_store
from critique_local.store.keys import Principal

log = logging.getLogger(__name__)
PATH = "/api/mcp"
MAX_WAIT_S = 1800
POLL_S = 10.0  # re-read the run at least this often while waiting (a missed wake-up costs no more)
PRINCIPAL = "critique.principal"  # ASGI scope keys set by the route
APP = "critique.app"
REQUEST = "critique.request"
MANAGER = web.AppKey("mcp_manager", StreamableHTTPSessionManager)


# ---- tool arguments: the REST models plus what only a tool call needs ------------------

class Waiting(Model):
    wait_seconds: int = Field(0, ge=0, le=MAX_WAIT_S, description=(
        "Wait up to this many seconds for the turn to end (the run idle or terminal), sending progress "
        "notifications with the run's activity when the call carries a progressToken; 0: return at once."))


class RunRef(Model):
    run_id: str = Field(min_length=1, max_length=64, description="The run's id (run_...).")


class CreateRunArgs(CreateRunRequest, Waiting):
    pass


class GetRunArgs(RunRef, Waiting):
    include_patch: bool = Field(False, description="Include the cumulative patch text (REST ?patch=1).")
    include_events: bool = Field(False, description="Include the activity timeline (REST ?events=1).")


class SendMessageArgs(MessageRequest, RunRef, Waiting):
    pass


class ListRunsArgs(ListRunsQuery):
    pass


class NoArgs(Model):
    pass


Call = Callable[[web.Application, Principal, Any], Awaitable[BaseModel]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    args: type[Model]
    result: type[BaseModel]
    call: Call
    write: bool = False  # needs write:builder


def _revealed(value: Any) -> Any:
    """``value`` (a python-mode dump) with each SecretStr as its text: what the client sent."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _revealed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_revealed(v) for v in value]
    return value


async def _create(app: web.Application, principal: Principal, a: CreateRunArgs) -> BaseModel:
    # python mode, secrets revealed: a JSON dump would mask a BYOK key or mcpServers header as "**********"
    raw = _revealed(a.model_dump(by_alias=True, exclude_unset=True, exclude={"wait_seconds"}))
    run, _ = await rest.start_run(app, principal, CreateRunRequest.model_validate(raw), raw, None)
    return await rest.envelope(app, run)


async def _get(app: web.Application, principal: Principal, a: GetRunArgs) -> BaseModel:
    run = await rest.owned_run(app, principal, a.run_id)
    return await rest.envelope(app, run, patch=a.include_patch, events=a.include_events)


async def _list(app: web.Application, principal: Principal, a: ListRunsArgs) -> BaseModel:
    return await rest.run_page(app, principal, a)


async def _message(app: web.Application, principal: Principal, a: SendMessageArgs) -> BaseModel:
    run = await rest.owned_run(app, principal, a.run_id)
    req = MessageRequest.model_validate(a.model_dump(by_alias=True, exclude_unset=True,
                                                     exclude={"wait_seconds", "run_id"}))
    return await rest.envelope(app, await app[CONTROL].message(run, req.follow_up()))


async def _end(app: web.Application, principal: Principal, a: RunRef) -> BaseModel:
    run = await rest.owned_run(app, principal, a.run_id)
    return await rest.envelope(app, await app[CONTROL].message(run, FollowUp(end_session=True)))


async def _cancel(app: web.Application, principal: Principal, a: RunRef) -> BaseModel:
    run = await rest.owned_run(app, principal, a.run_id)
    return await rest.envelope(app, await app[CONTROL].cancel(run))


async def _models(app: web.Application, principal: Principal, a: NoArgs) -> BaseModel:
    return await meta.model_list(app[SERVICES], principal)


TOOLS = {t.name: t for t in [
    Tool("create_run", "Start a coding run: a sandboxed agent works on the repository (POST /api/v1/coding-agent/"
         "runs). Set waitSeconds to wait for the first turn.", CreateRunArgs, RunEnvelope, _create, write=True),
    Tool("get_run", "A run's status, summary, changed paths and optionally its patch.", GetRunArgs, RunEnvelope, _get),
    Tool("list_runs", "Your recent runs, newest first (nextCursor pages on).", ListRunsArgs, RunList, _list),
    Tool("send_message", "A follow-up prompt on an idle run's warm session (or a chained run when the session "
         "ended). Set waitSeconds to wait for the turn.", SendMessageArgs, RunEnvelope, _message, write=True),
    Tool("end_session", "Destroy an idle run's sandbox and complete the run.", RunRef, RunEnvelope, _end, write=True),
    Tool("cancel_run", "Abort the turn and destroy the sandbox (idempotent).", RunRef, RunEnvelope, _cancel,
         write=True),
    Tool("list_models", "Models a run may use.", NoArgs, ModelList, _models),
]}


def _schema(model: type[BaseModel], mode: str) -> dict[str, Any]:
    return model.model_json_schema(by_alias=True, mode="validation" if mode == "input" else "serialization")


LISTING = types.ListToolsResult(tools=[
    types.Tool(name=t.name, description=t.description, input_schema=_schema(t.args, "input"),
               output_schema=_schema(t.result, "output"),
               annotations=types.ToolAnnotations(read_only_hint=not t.write, open_world_hint=False))
    for t in TOOLS.values()])


# ---- results ---------------------------------------------------------------------------

def _readable(result: BaseModel) -> str:
    if isinstance(result, RunEnvelope):
        run = result.run
        lines = [f"Run {run.id}: {run.status} ({run.lifecycle}); turns: {run.turn_count}; "
                 f"next: {', '.join(run.next_actions) or 'none'}"]
        if run.summary:
            lines.append(f"Summary: {run.summary}")
        if run.changed_paths:
            lines.append(f"Changed: {', '.join(run.changed_paths[:50])}")
        if run.error:
            lines.append(f"Error: {run.error.code}: {run.error.message}")
        if run.draft_pull_request:
            lines.append(f"Draft pull request: {run.draft_pull_request.url}")
        if run.patch is not None:
            lines.append(f"Patch:\n{run.patch}")
        return "\n".join(lines)
    if isinstance(result, RunList):
        return "\n".join(f"{r.id}: {r.status} ({r.lifecycle}) {r.title or ''}".rstrip() for r in result.data) \
            or "No runs."
    if isinstance(result, ModelList):
        return "\n".join(f"{m.id}: {m.name}" for m in result.data) or "No models."
    return result.model_dump_json(by_alias=True)


def _ok(result: BaseModel) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=_readable(result))],
                                structured_content=json.loads(result.model_dump_json(by_alias=True)))


def _error(err: ApiError) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=f"{err.code}: {err.message}")],
                                structured_content=err.body(), is_error=True)


# ---- waiting with progress -------------------------------------------------------------

def _activity(kind: str, data: dict[str, Any]) -> str:
    """One progress message: what the run is doing, in a line."""
    if kind == "run.status":
        return f"run {data.get('status')} ({data.get('lifecycle')})"
    what = str(data.get("type", "event"))
    detail = data.get("tool") or data.get("path") or data.get("name") or data.get("text") or ""
    return f"{what}: {str(detail)[:200]}" if detail else what


def _gone(request: web.Request | None) -> bool:
    return request is not None and (request.transport is None or request.transport.is_closing())


async def _wait(ctx: ServerRequestContext[Any], app: web.Application, run_id: str, after: int,
                seconds: int) -> None:
    """Until run ``run_id`` is idle or terminal, at most ``seconds`` and only while the client
    is connected: report each event after ``after`` as progress (its id is the progress value;
    a no-op without a progressToken)."""
    s = app[SERVICES]
    http: web.Request | None = ctx.request.scope.get(REQUEST) if ctx.request is not None else None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not _gone(http):
        signal = s.hub.signal(run_id)
        batch = await events_store.after(s.db, run_id, after)
        for ev in batch:
            after = ev.seq
            await ctx.session.report_progress(ev.seq, None, _activity(ev.kind, ev.data))
        if batch:
            continue
        run = await runs_store.get_run(s.db, run_id)
        if run is None or run.status in TERMINAL or run.status is RunStatus.IDLE:
            return
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(signal.wait(), min(remaining, POLL_S))


async def _call(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
    scope = ctx.request.scope if ctx.request is not None else {}
    app: web.Application = scope[APP]
    principal: Principal = scope[PRINCIPAL]
    tool = TOOLS.get(params.name)
    acted = False  # the audit trail has the call (tools that start or change runs)
    try:
        if tool is None:
            raise InvalidRequest(f"unknown tool: {params.name}", field="name")
        if tool.write and "write:builder" not in principal.scopes:
            raise Forbidden("this key lacks the write:builder scope")
        try:
            args = tool.args.model_validate(params.arguments or {})
        except ValidationError as exc:
            raise validation_error(exc) from exc
        seconds = int(getattr(args, "wait_seconds", 0))
        after = 0
        if seconds and isinstance(args, RunRef):  # a follow-up: only this turn's activity
            after = await events_store.last_seq(app[SERVICES].db, args.run_id)
        result = await tool.call(app, principal, args)
        acted = True
        await auditing.audit_tool(app[SERVICES], params.name, principal, params.arguments, result, None)
        if seconds and isinstance(result, RunEnvelope):
            run_id = result.run.id
            if run_id != getattr(args, "run_id", run_id):  # chained: the new run carries the turn
                after = 0
            await _wait(ctx, app, run_id, after, seconds)
            result = await tool.call(app, principal, args) if isinstance(args, GetRunArgs) else \
                await _get(app, principal, GetRunArgs(run_id=run_id))
    except ApiError as err:
        if not acted:
            await auditing.audit_tool(app[SERVICES], params.name, principal, params.arguments, None, err)
        return _error(err)
    except Exception:  # as the REST error middleware does: logged here, no internals to the client
        log.exception("unhandled error in MCP tool %s", params.name)
        return _error(ApiError("internal server error", code=ErrorCode.INTERNAL_ERROR))
    return _ok(result)


async def _list_tools(ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
                      ) -> types.ListToolsResult:
    return LISTING


def protocol_server() -> Server[Any]:
    """The MCP server (protocol handlers only; the transport is the session manager)."""
    return Server("critique-local", version=__version__, title="critique-local Coding Agent",
                  instructions="Hand coding tasks to sandboxed agents: create_run, then get_run/send_message.",
                  on_list_tools=_list_tools, on_call_tool=_call)


async def lifespan(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the SDK's session manager, run in its own task (its anyio task group must be
    entered and left by one task) for the life of the app."""
    logging.getLogger("mcp").setLevel(logging.WARNING)  # it logs every stateless request at INFO
    manager = StreamableHTTPSessionManager(protocol_server(), stateless=True,
                                           max_request_body_size=app[SETTINGS].limits.max_body_bytes)
    started, stop = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with manager.run():
            started.set()
            await stop.wait()

    task = asyncio.create_task(hold(), name="mcp-session-manager")
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        task.result()  # raises what stopped it
    app[MANAGER] = manager
    yield
    stop.set()
    await task


def _accepts(request: web.Request) -> bool:
    types_ = {part.split(";")[0].strip().lower() for part in request.headers.get("Accept", "").split(",")}
    return bool(types_ & {"application/json", "application/*", "*/*"}) and \
        bool(types_ & {"text/event-stream", "text/*", "*/*"})


async def endpoint(request: web.Request, principal: Principal) -> web.StreamResponse:
    """What the protocol's transport would refuse is refused here first, with the API's error
    body (406, 415, 400 ``bad_json``, 408, 413); the rest is the SDK's."""
    if not _accepts(request):
        raise NotAcceptable("Accept must include application/json and text/event-stream (MCP Streamable HTTP)",
                            field="Accept")
    if request.content_type != "application/json":
        raise UnsupportedMediaType("Content-Type must be application/json", field="Content-Type")
    message = await read_json(request)
    if not (isinstance(message, dict) and message.get("jsonrpc") == "2.0"):
        raise BadRequest("the body must be one JSON-RPC 2.0 message", code=ErrorCode.BAD_JSON)
    extra = {PRINCIPAL: principal, APP: request.app, REQUEST: request}
    return await call_asgi(request, request.app[MANAGER].handle_request, extra, await request.read())


ROUTES = [
    Route("POST", PATH, endpoint, "Model Context Protocol (Streamable HTTP, stateless): the run tools",
          "read:builder", raw=("text/event-stream", "JSON-RPC responses and progress notifications (MCP Streamable "
                                                    "HTTP); application/json for requests that answer at once"),
          errors=(400, 401, 403, 406, 408, 413, 415), tag="mcp"),
]
