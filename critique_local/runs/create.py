"""Accepting a run: validate what config and state decide (repository, ref, model, fields
whose behaviour is not built yet), then insert it, idempotently."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from critique_local import billing
from critique_local.api.schemas import CreateRunRequest, Publish
from critique_local.config import Settings
from critique_local.errors import (
    Forbidden,
    IdempotencyKeyReused,
    InvalidRequest,
    NotFound,
    PaymentRequired,
)
from critique_local.repos.names import branch_problem, protected_pattern, ref_problem, repository_name_problem
from critique_local.runs import intent, mcp_servers, network
from critique_local.services import Services
from critique_local.store import runs as store
from critique_local.store.keys import Principal
from critique_local.tokens import new_id
from critique_local.webhooks import check_url

MAX_IDEMPOTENCY_KEY_CHARS = 255


class ProtectedBranch(InvalidRequest):
    code = "protected_branch"


def check_publish(settings: Settings, publish: Publish | None, task_kind: str, base_ref: str | None) -> None:
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


def check_billing(req: CreateRunRequest) -> str | None:
    """The BYOK key of an openrouter run (None for managed runs)."""
    billing = req.billing
    if billing is None or billing.mode == "managed":
        if billing is not None and billing.open_router_api_key is not None:
            raise InvalidRequest("openRouterApiKey is only used with billing.mode openrouter",
                                 field="billing.openRouterApiKey")
        return None
    key = billing.open_router_api_key.get_secret_value().strip() if billing.open_router_api_key else ""
    if not key:
        raise InvalidRequest("billing.mode openrouter needs billing.openRouterApiKey", field="billing.openRouterApiKey")
    return key


def body_hash(raw: Any) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


async def _repository_id(s: Services, req: CreateRunRequest) -> str:
    if req.repository_id and not (req.repository or req.repository_full_name):
        name = await store.repository_by_id(s.db, req.repository_id)
        if name is None:
            raise NotFound(f"repository {req.repository_id} not found", field="repositoryId",
                           code="repository_not_found")
        return req.repository_id
    full_name = str(req.repository or req.repository_full_name)
    field = "repository" if req.repository else "repositoryFullName"
    problem = repository_name_problem(full_name)
    if problem:
        raise InvalidRequest(f"{field} {problem}", field=field)
    source = s.hosts.resolve(full_name)
    if source is None:
        raise NotFound(f"repository {full_name} not found", field=field, code="repository_not_found")
    repo_id = await store.ensure_repository(s.db, new_id("repo"), full_name, "local" if source.local else "github")
    if req.repository_id and req.repository_id != repo_id:
        raise InvalidRequest("repositoryId does not match repository", field="repositoryId")
    return repo_id


async def create(
    s: Services, principal: Principal, req: CreateRunRequest, raw: Any, idempotency_key: str | None
) -> tuple[store.RunRow, bool]:
    network.check(s.settings, req.safety.network if req.safety else None, s.backend.network_modes)
    if idempotency_key is not None and not (0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS):
        raise InvalidRequest("Idempotency-Key must be 1-255 characters", field="Idempotency-Key")
    ref = req.base_ref or req.git_checkout_ref
    if ref is not None and (problem := ref_problem(ref)):
        raise InvalidRequest(f"baseRef {problem}", field="baseRef" if req.base_ref else "gitCheckoutRef")
    check_publish(s.settings, req.publish, req.task_kind, ref)
    if req.webhook is not None:
        check_url(s.settings.webhooks, req.webhook.url)
    byok_key = check_billing(req)
    model_id = req.model_id or s.settings.models.default
    entry = s.catalog.get(model_id)
    if entry is None:
        raise InvalidRequest(f"unknown model {model_id!r}; see GET /api/v1/coding-agent/models",
                             field="modelId", code="unknown_model")
    if not entry.allowed_for(await billing.plan_of(s.db, s.settings.billing, principal.user_id)):
        raise Forbidden(f"model {model_id} is not in your plan", field="modelId", code="model_not_in_plan")
    if byok_key is not None and entry.provider is not None and s.settings.billing.byok_provider not in s.settings.providers:
        raise InvalidRequest("this server has no provider for billing.mode openrouter", field="billing.mode",
                             code="unsupported")
    mcp_servers.check(s.settings, req)
    repo_id = await _repository_id(s, req)
    stored_request = req.model_dump(mode="json", by_alias=True, exclude={"prompt", "billing", "mcp_servers"})
    stored_request["billingMode"] = req.billing.mode if req.billing else "managed"
    if req.mcp_servers:
        stored_request["mcpServers"] = mcp_servers.stored(req)
    new = store.NewRun(
        id=new_id("run"), user_id=principal.user_id, repository_id=repo_id, request=stored_request,
        model_id=model_id, task_kind=req.task_kind, intent=intent.classify(req.prompt), base_ref=ref,
        prompt=req.prompt,
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
    result = await store.create_run(s.db, new, (idempotency_key, digest) if idempotency_key else None)
    if not result.created and result.body_hash != digest:
        raise IdempotencyKeyReused("Idempotency-Key was already used with a different body",
                                   field="Idempotency-Key")
    if result.created and (sealed := mcp_servers.seal_headers(s.box, new.id, req)) is not None:
        await store.update_run(s.db, new.id, mcp_headers=sealed)
    if result.created and byok_key is not None:
        await store.update_run(s.db, new.id, byok_key=s.box.seal(byok_key, new.id))
        await billing.charge_orchestration(s.db, principal.user_id, new.id, s.settings.billing.orchestration_credits)
    run = await store.get_run(s.db, result.run_id)
    assert run is not None
    return run, result.created
