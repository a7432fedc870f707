"""Routes of the Coding Agent API: create, list, get, messages, stream."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

from critique_local import billing
from critique_local.api.http import header, parse_body, parse_query, respond
from critique_local.api.registry import Route
from critique_local.api.schemas import (
    CreateRunRequest,
    DeliveryList,
    DeliveryView,
    ForkRequest,
    GetRunQuery,
    ListRunsQuery,
    MessageRequest,
    RunEnvelope,
    RunList,
    StreamQuery,
)
from critique_local.api.viewcache import VIEW_CACHE
from critique_local.api.views import run_view
from critique_local.appkeys import CONTROL, SCHEDULER, SERVICES, STOPPING, WEBHOOKS
from critique_local.clock import parse_iso
from critique_local.errors import ErrorCode, InvalidRequest, NotFound
from critique_local.runs import create as creating
from critique_local.runs import forks
from critique_local.runs.events import RUN_STATUS as RUN_STATUS_EVENT
from critique_local.runs.states import TERMINAL, RunStatus
from critique_local.store import environments as environments_store
from critique_local.store import events as events_store
from critique_local.store import ledger, pulls
from critique_local.store import runs as store
from critique_local.store.db import NOTHING as _NOTHING
from critique_local.store.db import Read
from critique_local.store.keys import Principal
from critique_local.store.runs import RunRow

log = logging.getLogger(__name__)
HEARTBEAT_S = 10.0
CLOSING_WAIT_S = 2.0  # at most this long for the closing run.status event of an idle or ended run
ENDS_STREAM = {st.value for st in TERMINAL} | {RunStatus.IDLE.value}  # the stream closes after these
MAX_VIEW_EVENTS = 2000  # ?events=1 returns the first ones; the stream (?after=) pages through all
BASE = "/api/v1/coding-agent/runs"


async def owned_run(app: web.Application, principal: Principal, run_id: str) -> RunRow:
    """The caller's run. Raises NotFound (run_not_found) for a missing or another user's run."""
    run = await store.get_run(app[SERVICES].db, run_id, principal.user_id)
    if run is None:  # another user's run is indistinguishable from a missing one
        raise NotFound("run not found", code=ErrorCode.RUN_NOT_FOUND)
    return run


async def _owned_run(request: web.Request, principal: Principal) -> RunRow:
    return await owned_run(request.app, principal, request.match_info["id"])


async def envelope(app: web.Application, run: RunRow, *, patch: bool = False, events: bool = False,
                   brief: bool = False) -> RunEnvelope:
    """The public view of ``run`` as the REST API and the MCP tools return it."""
    found = await app[SERVICES].db.read(*_view_reads(run.id, patch=patch, events=events, brief=brief))
    return _envelope_of(app, run, found, brief=brief)


def _view_reads(run_id: str, *, patch: bool, events: bool, brief: bool) -> list[Read[Any]]:
    """Everything of a run's view besides the run row: turns, usage per turn, patch, events,
    pull request, environment (None where not asked for). One hop to the database for all."""
    return [store.turns_read(run_id) if not brief else _NOTHING, ledger.usage_by_turn_read(run_id),
            store.patch_read(run_id) if patch else _NOTHING,
            events_store.after_read(run_id, 0, limit=MAX_VIEW_EVENTS) if events else _NOTHING,
            pulls.of_run_read(run_id), environments_store.of_run_read(run_id)]


def _envelope_of(app: web.Application, run: RunRow, found: list[Any], *, brief: bool) -> RunEnvelope:
    turns, per_turn, stored_patch, event_rows, pull_request, environment = found
    turns = turns or []
    redactor = app[SERVICES].redactor
    for turn in turns:
        turn["usage"] = per_turn.get(int(turn["index"]), billing.Usage()).view()
        if turn.get("prompt"):  # shown back like the summary: no secret or token in it
            turn["prompt"] = redactor.clean(turn["prompt"], run.id)
    return RunEnvelope(run=run_view(
        run, app[SERVICES].public_url,
        turns=turns,
        usage=billing.total(per_turn).view(),
        patch=stored_patch,
        events=event_rows,
        pull_request=pull_request,
        brief=brief,
        environment=environment,
    ))


async def create_run(request: web.Request, principal: Principal) -> web.StreamResponse:
    idempotency_key = header(request, "Idempotency-Key", creating.MAX_IDEMPOTENCY_KEY_CHARS)
    req, raw = await parse_body(request, CreateRunRequest)
    run, created = await start_run(request.app, principal, req, raw, idempotency_key)
    return respond(await envelope(request.app, run), status=201 if created else 200)


async def start_run(app: web.Application, principal: Principal, req: CreateRunRequest, raw: object,
                    idempotency_key: str | None) -> tuple[RunRow, bool]:
    """Create (or find, by idempotency key) a run and queue it; (run, created)."""
    run, created = await creating.create(app[SERVICES], principal, req.order(), raw, idempotency_key)
    if created:
        await app[SCHEDULER].enqueue(run)
    return run, created


async def list_runs(request: web.Request, principal: Principal) -> web.StreamResponse:
    return respond(await run_page(request.app, principal, parse_query(request, ListRunsQuery)))


async def run_page(app: web.Application, principal: Principal, q: ListRunsQuery) -> RunList:
    """One page of the caller's runs, newest first, as brief views."""
    rows = await store.list_runs(app[SERVICES].db, principal.user_id, q.limit + 1, int(q.cursor) if q.cursor else None,
                                 status=RunStatus(q.status) if q.status else None,
                                 tag=q.tag.strip().lower() if q.tag else None, repository=q.repository)
    page = rows[: q.limit]
    views = [(await envelope(app, r, brief=True)).run for r in page]
    return RunList(data=views, next_cursor=str(page[-1].seq) if len(rows) > q.limit else None)


async def get_run(request: web.Request, principal: Principal) -> web.StreamResponse:
    q = parse_query(request, GetRunQuery)
    run_id, db, cache = request.match_info["id"], request.app[SERVICES].db, request.app.get(VIEW_CACHE)
    key, changes = (run_id, q.patch in ("1", "true"), q.events in ("1", "true")), db.changes
    body = cache.get(key, principal.user_id, changes) if cache is not None else None
    if body is None:
        # the run (only the caller's) and its view's reads in one hop
        run, *found = await db.read(store.run_read(run_id, principal.user_id),
                                    *_view_reads(run_id, patch=key[1], events=key[2], brief=False))
        if run is None:  # another user's run is indistinguishable from a missing one
            raise NotFound("run not found", code=ErrorCode.RUN_NOT_FOUND)
        view = _envelope_of(request.app, run, found, brief=False)
        body = view.model_dump_json(by_alias=True).encode()
        if cache is not None:
            expiry = view.run.session_expires_at if view.run.session_active else None
            cache.put(key, principal.user_id, changes, body,
                      (parse_iso(expiry).timestamp() - time.time()) if expiry else None)
    return web.Response(body=body, content_type="application/json")


async def get_patch(request: web.Request, principal: Principal) -> web.StreamResponse:
    run = await _owned_run(request, principal)
    patch = await store.get_patch(request.app[SERVICES].db, run.id)
    if patch is None:
        raise NotFound("this run has no patch (no changes yet)", code=ErrorCode.PATCH_NOT_FOUND)
    return web.Response(body=patch.data, content_type="text/x-diff", headers={
        "Content-Disposition": f'attachment; filename="{run.id}.patch"',
        "X-Critique-Patch-Redactions": str(patch.redactions)})


async def send_message(request: web.Request, principal: Principal) -> web.StreamResponse:
    run = await _owned_run(request, principal)
    req, _ = await parse_body(request, MessageRequest)
    carrier = await request.app[CONTROL].message(run, req.follow_up())
    return respond(await envelope(request.app, carrier), status=200 if req.end_session else 202)


async def fork_run(request: web.Request, principal: Principal) -> web.StreamResponse:
    idempotency_key = header(request, "Idempotency-Key", creating.MAX_IDEMPOTENCY_KEY_CHARS)
    source = await _owned_run(request, principal)
    req, raw = await parse_body(request, ForkRequest)
    run, created = await fork(request.app, source, req, raw, idempotency_key)
    return respond(await envelope(request.app, run), status=201 if created else 200)


async def fork(app: web.Application, source: RunRow, req: ForkRequest, raw: object,
               idempotency_key: str | None) -> tuple[RunRow, bool]:
    """Fork ``source`` at ``req.turn`` (or find the fork by idempotency key) and queue it."""
    order = forks.ForkOrder(req.turn, req.prompt, req.title)
    run, created = await forks.create(app[SERVICES], source, order, raw, idempotency_key)
    if created:
        await app[SCHEDULER].enqueue(run)
    return run, created


async def cancel_run(request: web.Request, principal: Principal) -> web.StreamResponse:
    run = await _owned_run(request, principal)
    return respond(await envelope(request.app, await request.app[CONTROL].cancel(run)))


async def webhook_deliveries(request: web.Request, principal: Principal) -> web.StreamResponse:
    run = await _owned_run(request, principal)
    rows = await request.app[WEBHOOKS].for_run(run.id)
    return respond(DeliveryList(data=[DeliveryView.model_validate(r) for r in rows]))


def _resume_point(request: web.Request) -> int:
    q = parse_query(request, StreamQuery)
    header = request.headers.get("Last-Event-ID")
    if header is not None:
        if not re.fullmatch(r"[0-9]{1,18}", header.strip()):
            raise InvalidRequest("Last-Event-ID must be an event id", field="Last-Event-ID")
        return max(int(header), q.after or 0)
    return q.after or 0


async def stream(request: web.Request, principal: Principal) -> web.StreamResponse:
    run = await _owned_run(request, principal)
    last = _resume_point(request)
    opened: web.StreamResponse | None = None
    try:
        async with sse_response(request, ping_interval=HEARTBEAT_S) as sse, request.app[SERVICES].metrics.sse_stream():
            opened = sse
            await _follow(request.app, sse, run.id, last)
    except ConnectionResetError:
        # the client went away (a closed tab, a dropped network): nothing is wrong and there is
        # no one to answer; aiohttp finishes the dead response quietly
        if opened is None:
            raise
        log.debug("stream of %s: client disconnected", run.id)
    assert opened is not None
    return opened


async def _follow(app: web.Application, sse: EventSourceResponse, run_id: str, last: int) -> None:
    """Send the run's events after ``last`` as they are appended, until the turn is over (idle or
    terminal), the client leaves or the server stops. Raises ConnectionResetError when the
    client has gone."""
    s = app[SERVICES]
    stopping = app[STOPPING]
    status: str | None = None  # the run's status as the events sent so far tell it (None: not known)
    closing_by: float | None = None
    while sse.is_connected() and not stopping.is_set():
        signal = s.hub.signal(run_id)
        batch = s.hub.recent(run_id, last)  # the hub's in-memory tail; None: read the store
        if batch is None:
            batch = await events_store.after(s.db, run_id, last)
        for ev in batch:
            await sse.send(_json(ev.data, ev.seq, ev.created_at), id=str(ev.seq), event=ev.kind)
            last = ev.seq
            if ev.kind == RUN_STATUS_EVENT:
                status = str(ev.data.get("status"))
        if batch:
            continue
        if status in ENDS_STREAM:  # its closing run.status event was sent
            return
        timeout_s = HEARTBEAT_S
        if status is None:  # every change of status is a run.status event: read the run once, then follow those
            current = await store.get_run(s.db, run_id)
            if current is None:
                return
            if current.status in TERMINAL or current.status is RunStatus.IDLE:
                # the run's row changes just before its closing run.status event is appended: read
                # what is announced, then send everything up to it; when the event is not there
                # yet, wait for it (bounded), so the stream never ends without it
                announced = await events_store.last_of_kind(s.db, run_id, RUN_STATUS_EVENT)
                for ev in await events_store.after(s.db, run_id, last):
                    await sse.send(_json(ev.data, ev.seq, ev.created_at), id=str(ev.seq), event=ev.kind)
                    last = ev.seq
                if (announced or {}).get("status") == current.status.value:
                    return
                now = asyncio.get_running_loop().time()
                closing_by = closing_by or now + CLOSING_WAIT_S
                if now >= closing_by:
                    return
                timeout_s = closing_by - now
            else:
                status = current.status.value
        waits = {asyncio.ensure_future(signal.wait()), asyncio.ensure_future(stopping.wait())}
        done, pending = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()
        if not done and status not in ENDS_STREAM:  # quiet for a while: look at the run itself again
            status = None


def _json(data: dict[str, object], seq: int, created_at: str) -> str:
    return json.dumps({"id": seq, "createdAt": created_at, **data})


ROUTES = [
    Route("POST", BASE, create_run, "Start a run", "write:builder", request=CreateRunRequest,
          response=RunEnvelope, status=201, other_statuses=(200,), errors=(400, 401, 402, 403, 404, 413, 422)),
    Route("GET", BASE, list_runs, "List your recent runs, newest first", "read:builder", query=ListRunsQuery,
          response=RunList, errors=(401, 403, 422)),
    Route("GET", BASE + "/{id}", get_run, "Status, summary, optional patch and events", "read:builder",
          query=GetRunQuery, response=RunEnvelope, errors=(401, 403, 404, 422)),
    Route("GET", BASE + "/{id}/patch", get_patch,
          "The run's cumulative patch as exact bytes (git apply applies it to baseCommit)", "read:builder",
          raw=("text/x-diff", "The patch, byte for byte as git wrote it (any file encoding). Header "
                              "X-Critique-Patch-Redactions: secrets replaced by [REDACTED] (0: exact)."),
          errors=(401, 403, 404)),
    Route("POST", BASE + "/{id}/messages", send_message,
          "Follow-up on the warm session (202), chained run when the session ended (202, new run), "
          "or {endSession: true} (200)", "write:builder", request=MessageRequest, response=RunEnvelope, status=202,
          other_statuses=(200,), errors=(400, 401, 402, 403, 404, 409, 413, 422)),
    Route("POST", BASE + "/{id}/fork", fork_run,
          "Fork the run at a turn: a new run (forkedFrom) from that turn's tree and transcript; with a prompt it "
          "runs that turn, without one it waits idle (201; 200 for an idempotent replay)", "write:builder",
          request=ForkRequest, response=RunEnvelope, status=201, other_statuses=(200,),
          errors=(400, 401, 403, 404, 409, 413, 422)),
    Route("POST", BASE + "/{id}/cancel", cancel_run, "Abort the turn, destroy the sandbox (idempotent)",
          "write:builder", response=RunEnvelope, errors=(401, 403, 404, 409)),
    Route("GET", BASE + "/{id}/webhook-deliveries", webhook_deliveries,
          "run.status webhook deliveries of this run, with attempts and outcomes", "read:builder",
          response=DeliveryList, errors=(401, 403, 404)),
    Route("GET", BASE + "/{id}/stream", stream, "Server-Sent Events: builder.event and run.status",
          "read:builder", query=StreamQuery, sse=True, errors=(401, 403, 404, 422)),
]
