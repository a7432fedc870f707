"""Accepting a run: validate what config and state decide (repository, ref, model, fields
whose behaviour is not built yet), then insert it, idempotently. A chained run (a message to a
run whose session ended) is inserted by the same path, from the run it continues."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from critique_local import billing
from critique_local.config import Settings
from critique_local.errors import (
    ErrorCode,
    Forbidden,
    IdempotencyKeyReused,
    InvalidRequest,
    NotFound,
    PaymentRequired,
    ProtectedBranch,
)
from critique_local.repos.names import branch_problem, protected_pattern, ref_problem, repository_name_problem
from critique_local.runs import intent, mcp_servers, network
from critique_local.runs.spec import PublishSpec, RunOrder, RunSpec
from critique_local.services import Services
from critique_local.store import runs as store
from critique_local.store.keys import Principal
from critique_local.tokens import new_id
from critique_local.webhooks import check_url

MAX_IDEMPOTENCY_KEY_CHARS = 255
MAX_CHAIN_CONTEXT_CHARS = 60_000  # prior summaries carried into a chained run's prompt


def check_publish(settings: Settings, publish: PublishSpec | None, task_kind: str, base_ref: str | None) -> None:
    """A publish request that could never be carried out is refused before anything is created."""
    if publish is None:
        return
    if publish.mode == "draft_pr" and task_kind == "plan":
        raise InvalidRequest("plan runs never publish: use taskKind code with publish.mode draft_pr",
                             field="publish.mode")
    if publish.branch is None:
        return
    if publish.mode != "draft_pr":
        raise InvalidRequest("publish.branch needs publish.mode draft_pr", field="publish.branch")
    if problem := branch_problem(publish.branch):
        raise InvalidRequest(f"publish.branch {problem}", field="publish.branch")
    if base_ref is not None and publish.branch == base_ref:
        raise ProtectedBranch("publish.branch must differ from the base branch", field="publish.branch")
    if pattern := protected_pattern(publish.branch, settings.publish.protected_branches):
        raise ProtectedBranch(f"publish.branch matches the protected pattern {pattern!r}", field="publish.branch")


def check_billing(order: RunOrder) -> str | None:
    """The BYOK key of an openrouter run (None for managed runs)."""
    if not order.spec.byok:
        if order.open_router_api_key is not None:
            raise InvalidRequest("openRouterApiKey is only used with billing.mode openrouter",
                                 field="billing.openRouterApiKey")
        return None
    key = (order.open_router_api_key or "").strip()
    if not key:
        raise InvalidRequest("billing.mode openrouter needs billing.openRouterApiKey", field="billing.openRouterApiKey")
    return key


def body_hash(raw: Any) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


async def _repository_id(s: Services, req: RunSpec) -> str:
    if req.repository_id and not (req.repository or req.repository_full_name):
        name = await store.repository_by_id(s.db, req.repository_id)
        if name is None:
            raise NotFound(f"repository {req.repository_id} not found", field="repositoryId",
                           code=ErrorCode.REPOSITORY_NOT_FOUND)
        return req.repository_id
    full_name = str(req.repository or req.repository_full_name)
    field = "repository" if req.repository else "repositoryFullName"
    problem = repository_name_problem(full_name)
    if problem:
        raise InvalidRequest(f"{field} {problem}", field=field)
    source = s.hosts.resolve(full_name)
    if source is None:
        raise NotFound(f"repository {full_name} not found", field=field, code=ErrorCode.REPOSITORY_NOT_FOUND)
    repo_id = await store.ensure_repository(s.db, new_id("repo"), full_name, "local" if source.local else "github")
    if req.repository_id and req.repository_id != repo_id:
        raise InvalidRequest("repositoryId does not match repository", field="repositoryId")
    return repo_id


async def create(
    s: Services, principal: Principal, order: RunOrder, raw: Any, idempotency_key: str | None
) -> tuple[store.RunRow, bool]:
    """Validate ``order`` against configuration and state and insert it, queued; (run, created).
    ``raw`` is the request body as parsed JSON (its hash pins an Idempotency-Key to one body).
    Raises ApiError subclasses (4xx) and changes nothing when it does."""
    req = order.spec
    network.check(s.settings, req.network, s.backend.network_modes)
    if idempotency_key is not None and not (0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS):
        raise InvalidRequest("Idempotency-Key must be 1-255 characters", field="Idempotency-Key")
    ref = req.base_ref or req.git_checkout_ref
    if ref is not None and (problem := ref_problem(ref)):
        raise InvalidRequest(f"baseRef {problem}", field="baseRef" if req.base_ref else "gitCheckoutRef")
    check_publish(s.settings, req.publish, req.task_kind, ref)
    if req.webhook_url is not None:
        check_url(s.settings.webhooks, req.webhook_url)
    byok_key = check_billing(order)
    model_id = req.model_id or s.settings.models.default
    entry = s.catalog.get(model_id)
    if entry is None:
        raise InvalidRequest(f"unknown model {model_id!r}; see GET /api/v1/coding-agent/models",
                             field="modelId", code=ErrorCode.UNKNOWN_MODEL)
    if not entry.allowed_for(await billing.plan_of(s.db, s.settings.billing, principal.user_id)):
        raise Forbidden(f"model {model_id} is not in your plan", field="modelId", code=ErrorCode.MODEL_NOT_IN_PLAN)
    if byok_key is not None and entry.provider is not None and s.settings.billing.byok_provider not in s.settings.providers:
        raise InvalidRequest("this server has no provider for billing.mode openrouter", field="billing.mode",
                             code=ErrorCode.UNSUPPORTED)
    mcp_servers.check(s.settings, req)
    repo_id = await _repository_id(s, req)
    run_id = new_id("run")
    new = store.NewRun(
        id=run_id, user_id=principal.user_id, repository_id=repo_id, spec=req,
        model_id=model_id, task_kind=req.task_kind, intent=intent.classify(order.prompt), base_ref=ref,
        prompt=order.prompt, mcp_headers=mcp_servers.seal_headers(s.box, run_id, order.mcp_headers),
        byok_key=s.box.seal(byok_key, run_id) if byok_key is not None else None,
        fee=s.settings.billing.orchestration_credits if byok_key is not None else 0.0,
    )
    digest = body_hash(raw)
    if idempotency_key is not None:
        replay = await store.idempotent_run(s.db, principal.user_id, idempotency_key)
        if replay is not None:
            if replay[1] != digest:
                raise IdempotencyKeyReused("Idempotency-Key was already used with a different body",
                                           field="Idempotency-Key")
            original = await store.get_run(s.db, replay[0])
            assert original is not None
            return original, False
    needed = s.settings.billing.orchestration_credits if byok_key else (0.0 if entry.free else 1e-9)
    if needed and await billing.balance(s.db, principal.user_id) < needed:
        raise PaymentRequired("no credits left for this run; ask your operator for credits "
                              "(critique-local credits grant)")
    result = await _insert(s, new, (idempotency_key, digest) if idempotency_key else None)
    if not result.created and result.body_hash != digest:
        raise IdempotencyKeyReused("Idempotency-Key was already used with a different body",
                                   field="Idempotency-Key")
    run = await store.get_run(s.db, result.run_id)
    assert run is not None
    return run, result.created


async def _insert(s: Services, new: store.NewRun, idempotency: tuple[str, str] | None,
                  chained_from: store.RunRow | None = None) -> store.Created:
    """Store a queued run with its first turn (``store.create_run``); a chained one is linked
    both ways with the run it continues, in the same transaction."""
    return await store.create_run(s.db, new, idempotency, chained_from.id if chained_from is not None else None)


def chain_problem(old: store.RunRow) -> str | None:
    """Why ``old`` cannot be continued by a chained run, or None. A run's BYOK key and its
    mcpServers' header values are deleted when its session ends (before any chaining), so a
    chained run could not have them: it would fail at its first model call or MCP request."""
    gone = [what for what, needed in (("BYOK key", old.spec.byok),
                                      ("MCP server headers", any(m.header_names for m in old.spec.mcp_servers.values())))
            if needed]
    if not gone:
        return None
    return (f"the session of this run has ended and its {' and '.join(gone)} were deleted with it; "
            "start a new run that sends them again")


async def chain(s: Services, old: store.RunRow, prompt: str) -> store.RunRow:
    """A new run continuing ``old`` (whose session ended) with ``prompt``: same repository, base
    ref, model and settings, a fresh checkout, and the earlier turns' summaries in its prompt."""
    summaries = [(t.index, t.summary) for t in await store.turns(s.db, old.id) if t.summary]
    context = "".join(f"> Turn {i}: {line}\n" for i, summary in summaries for line in summary.splitlines())
    if len(context) > MAX_CHAIN_CONTEXT_CHARS:  # summaries are agent-made: the newest are kept
        context = "> [earlier turns clipped]\n" + context[-MAX_CHAIN_CONTEXT_CHARS:]
    chained_prompt = prompt if not context else (
        f"Earlier turns of this task (run {old.id}; their changes are not in this checkout):\n{context}\n{prompt}")
    new = store.NewRun(
        id=new_id("run"), user_id=old.user_id, repository_id=old.repository_id,
        spec=dataclasses.replace(old.spec, chained_from_run_id=old.id), model_id=old.model_id,
        task_kind=old.task_kind,
        intent=old.intent, base_ref=old.base_ref, prompt=chained_prompt,
    )
    await _insert(s, new, None, chained_from=old)
    run = await store.get_run(s.db, new.id)
    assert run is not None
    return run
