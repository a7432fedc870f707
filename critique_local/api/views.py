"""RunRow (+ optional patch, events, turns) -> the public RunView."""

from __future__ import annotations

from typing import Literal

from critique_local.api.schemas import (
    DiffStats,
    DraftPullRequestView,
    EnvironmentView,
    EventView,
    ForkedFromView,
    Publish,
    RepositoryView,
    RunErrorView,
    RunView,
    TurnView,
    UsageView,
    ValidationView,
)
from critique_local.bounds import clip_text
from critique_local.clock import now_iso
from critique_local.runs.states import lifecycle_of
from critique_local.store.events import EventRow
from critique_local.store.pulls import PullRequestRow
from critique_local.store.runs import RunRow, StoredPatch

LIST_TEXT_CHARS = 1000  # summary, error message, validation output and PR body in list rows
LIST_PATHS = 100  # changedPaths in list rows (diffStats.filesChanged counts them all)


def run_view(
    run: RunRow,
    base_url: str,
    *,
    turns: list[dict[str, object]],
    usage: dict[str, object],
    patch: StoredPatch | None = None,
    events: list[EventRow] | None = None,
    pull_request: PullRequestRow | None = None,
    brief: bool = False,
    environment: dict[str, object] | None = None,
) -> RunView:
    """The public view of a run. ``brief`` (list rows) keeps a row small whatever the run holds:
    no turns, texts clipped to :data:`LIST_TEXT_CHARS`, at most :data:`LIST_PATHS` paths."""
    if brief:
        return _brief(run_view(run, base_url, turns=[], usage=usage, pull_request=pull_request,
                               environment=environment))
    lc = lifecycle_of(run.status, run.phase, run.has_patch, run.session_end_reason, run.chained_to_run_id)
    spec = run.spec
    url = f"{base_url}/api/v1/coding-agent/runs/{run.id}"
    return RunView(
        id=run.id,
        status=run.status.value,
        lifecycle=lc.lifecycle,
        terminal=lc.terminal,
        awaiting_follow_up=lc.awaiting_follow_up,
        can_follow_up=lc.can_follow_up,
        next_actions=list(lc.next_actions),
        session_active=lc.session_active and (run.session_expires_at or "") > now_iso(),
        session_expires_at=run.session_expires_at if lc.session_active else None,
        session_end_reason=run.session_end_reason,
        turn_count=run.turn_count,
        repository=RepositoryView(id=run.repository_id, full_name=run.repository_full_name),
        model_id=run.model_id,
        task_kind="plan" if run.task_kind == "plan" else "code",
        title=spec.title,
        tags=list(spec.tags),
        metadata=dict(spec.metadata),
        intent=run.intent,
        base_ref=run.base_ref,
        base_commit=run.base_commit,
        validation_mode=spec.validation,
        publish=Publish(mode=spec.publish.mode, branch=spec.publish.branch) if spec.publish else Publish(),
        billing_mode=spec.billing_mode,
        safety=spec.safety_view(),
        usage=UsageView.model_validate(usage),
        summary=run.summary,
        changed_paths=run.changed_paths,
        diff_stats=DiffStats.model_validate(run.diff_stats) if run.diff_stats else None,
        validation=ValidationView.model_validate(run.validation) if run.validation else None,
        draft_pull_request=DraftPullRequestView(
            number=pull_request.number, url=pull_request.url, branch=pull_request.branch,
            head_sha=pull_request.head_sha, base_ref=pull_request.base_ref, state=pull_request.state,
            draft=pull_request.draft, host=pull_request.host, title=pull_request.title,
            body=pull_request.body, created_at=pull_request.created_at, updated_at=pull_request.updated_at,
        ) if pull_request else None,
        patch=patch_text(patch.data)[0] if patch else None,
        patch_encoding=patch_text(patch.data)[1] if patch else None,
        patch_redactions=patch.redactions if patch else None,
        events=[EventView(id=e.seq, event=e.kind, data=e.data, created_at=e.created_at)
                for e in events] if events is not None else None,
        turns=[TurnView.model_validate(t) for t in turns],
        agent_session_id=run.agent_session_id,
        environment=EnvironmentView.model_validate(environment) if environment else None,
        chained_from_run_id=run.chained_from_run_id,
        chained_to_run_id=run.chained_to_run_id,
        forked_from=ForkedFromView(run_id=run.forked_from_run_id, turn=run.forked_from_turn or 0)
        if run.forked_from_run_id else None,
        paused_at=run.paused_at,
        error=RunErrorView(code=run.error_code, message=run.error_message or "") if run.error_code else None,
        created_at=run.created_at,
        updated_at=run.updated_at,
        started_at=run.started_at,
        agent_ready_at=run.agent_ready_at,
        first_model_call_at=run.first_model_call_at,
        finished_at=run.finished_at,
        status_url=url,
        stream_url=f"{url}/stream",
    )


def _brief(view: RunView) -> RunView:
    def clip(text: str | None) -> str | None:
        return clip_text(text, LIST_TEXT_CHARS) if text is not None else None

    update: dict[str, object] = {"summary": clip(view.summary), "changed_paths": view.changed_paths[:LIST_PATHS]}
    if view.error is not None:
        update["error"] = view.error.model_copy(update={"message": clip(view.error.message)})
    if view.validation is not None:
        update["validation"] = view.validation.model_copy(update={"output_tail": clip(view.validation.output_tail)})
    if view.draft_pull_request is not None:
        update["draft_pull_request"] = view.draft_pull_request.model_copy(
            update={"body": clip(view.draft_pull_request.body)})
    return view.model_copy(update=update)


def patch_text(data: bytes) -> tuple[str, Literal["utf-8", "utf-8-lossy"]]:
    """The patch for JSON: exact when it is UTF-8, else with U+FFFD for invalid bytes."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), "utf-8-lossy"
