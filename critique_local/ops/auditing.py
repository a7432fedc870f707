"""What goes into the audit trail: the API's run actions (create, fork, follow-up, end session,
cancel) seen by :func:`audit_request` after their handler answered, the same actions taken
through the MCP endpoint's tools (:func:`audit_tool`), and publishing seen by :func:`observer`
in the run events. Rows are written by ``store/audit.py``."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from critique_local.api.middleware import PRINCIPAL
from critique_local.errors import ApiError
from critique_local.services import Services
from critique_local.store import audit
from critique_local.store.db import Database
from critique_local.store.events import EventRow
from critique_local.store.keys import Principal

log = logging.getLogger(__name__)
RUNS = "/api/v1/coding-agent/runs"
ACTIONS = {RUNS: "run.create", RUNS + "/{id}/messages": "run.follow_up", RUNS + "/{id}/cancel": "run.cancel",
           RUNS + "/{id}/fork": "run.fork"}
TOOL_ACTIONS = {"create_run": "run.create", "send_message": "run.follow_up", "end_session": "run.end_session",
                "cancel_run": "run.cancel"}  # the MCP tools that start or change runs


def _json(body: bytes | None) -> dict[str, Any]:
    try:
        data = json.loads(body or b"")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


async def audit_request(services: Services, request: web.Request, response: web.StreamResponse) -> None:
    """Record the request when it is an audited run action (any outcome, refusals included)."""
    if request.method != "POST":
        return
    route = request.match_info.route.resource
    action = ACTIONS.get(route.canonical) if route is not None else None
    if action is None:
        return
    principal = request.get(PRINCIPAL)
    body = _json(response.body if isinstance(response, web.Response) and isinstance(response.body, bytes) else None)
    run: dict[str, Any] = body["run"] if isinstance(body.get("run"), dict) else {}
    run_id = request.match_info.get("id") or (run.get("id") if isinstance(run.get("id"), str) else None)
    detail: dict[str, Any] = {}
    if action == "run.follow_up":
        try:
            if _json(await request.read()).get("endSession") is True:
                action = "run.end_session"
        except Exception:  # the body was refused (too large, too slow): it stays a follow-up
            pass
        if run.get("id") and run.get("id") != run_id:
            detail["chainedRunId"] = run["id"]
    if action == "run.create" and run:
        detail = {"repository": (run.get("repository") or {}).get("fullName"), "modelId": run.get("modelId")}
    if action == "run.fork" and run.get("id"):
        detail = {"forkRunId": run["id"], "turn": (run.get("forkedFrom") or {}).get("turn")}
    error: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
    outcome = "ok" if response.status < 400 else str(error.get("code") or response.status)
    await audit.record(services.db, action, user_id=principal.user_id if isinstance(principal, Principal) else None,
                       key_id=principal.key_id if isinstance(principal, Principal) else None, run_id=run_id,
                       outcome=outcome, http_status=response.status, detail=detail)


async def audit_tool(services: Services, tool: str, principal: Principal, arguments: dict[str, Any] | None,
                     run: Any, error: ApiError | None) -> None:
    """Record an MCP tool call that starts or changes a run (any outcome; ``run``: the
    ``RunEnvelope`` it answered, None on ``error``). ``detail.via`` is ``mcp``; ``http_status``
    is 200, or the status the same refusal gets from the REST API."""
    action = TOOL_ACTIONS.get(tool)
    if action is None:
        return
    args = arguments or {}
    if action == "run.follow_up" and args.get("endSession") is True:
        action = "run.end_session"
    given = args.get("runId")
    result_id = getattr(getattr(run, "run", None), "id", None)
    run_id = given if isinstance(given, str) and given else result_id
    detail: dict[str, Any] = {"via": "mcp"}
    if action == "run.follow_up" and result_id and result_id != run_id:
        detail["chainedRunId"] = result_id
    if action == "run.create" and run is not None:
        detail.update(repository=run.run.repository.full_name, modelId=run.run.model_id)
    try:
        await audit.record(services.db, action, user_id=principal.user_id, key_id=principal.key_id, run_id=run_id,
                           outcome="ok" if error is None else error.code.value,
                           http_status=200 if error is None else error.status, detail=detail)
    except Exception:
        log.exception("audit: MCP tool %s not recorded", tool)


def observer(db: Database) -> Callable[[EventRow], Awaitable[None]]:
    """An :class:`EventHub` observer recording each publish outcome (the server acts for the
    run's user; ``critique-local audit`` shows that user)."""

    async def observe(row: EventRow) -> None:
        if row.kind != "builder.event" or row.data.get("type") != "publish":
            return
        data = row.data
        detail = {k: data.get(k) for k in ("branch", "headSha", "pullRequestNumber", "message") if data.get(k)}
        try:
            await audit.record(db, "run.publish", user_id=None, key_id=None, run_id=row.run_id,
                               outcome=str(data.get("status") or "unknown"), detail=detail)
        except Exception:
            log.exception("audit: publish of run %s not recorded", row.run_id)

    return observe
