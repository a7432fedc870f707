"""Response models of the API (camelCase on the wire); request models are ``api/schemas.py``,
which re-exports these so callers import both from one place."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class Model(BaseModel):
    """camelCase on the wire; unknown fields are refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Publish(Model):
    mode: Literal["draft_pr", "none"] = Field("none", description="draft_pr opens a draft pull request.")
    branch: str | None = Field(
        None, max_length=200,
        description="Branch name when publishing (default <publish.branch_prefix><slug>-<short run id>); never the "
                    "base branch or a protected one.")


class RepositoryView(Model):
    id: str
    full_name: str


class DiffStats(Model):
    files_changed: int
    additions: int
    deletions: int


class RunErrorView(Model):
    code: str = Field(description="Stable machine-readable code, e.g. server_restarted, model_error.")
    message: str


class ForkedFromView(Model):
    run_id: str
    turn: int = Field(description="The turn of run_id whose tree and transcript this run started from.")


class EventView(Model):
    id: int = Field(description="Per-run increasing event id (the SSE id).")
    event: Literal["builder.event", "run.status"]
    data: dict[str, Any]
    created_at: str


class UsageView(Model):
    input_tokens: int
    output_tokens: int
    credits: float = Field(description="Model cost at catalog prices (BYOK runs: not debited).")
    model_calls: int


class ValidationView(Model):
    mode: Literal["basic", "tests"]
    status: Literal["passed", "failed", "skipped"] = Field(description="skipped: tests mode found no test command.")
    command: str | None = Field(description="What ran (tests: the test command, or .critique/test).")
    exit_code: int | None = Field(description="124: the command hit validation.timeout_s.")
    passed: bool | None
    duration_ms: int
    output_tail: str = Field(description="The last validation.output_tail_chars characters of output.")
    repair_turns: int = Field(description="tests mode: repair prompts the agent got before this final result.")
    command_source: Literal["config", "base_commit", "detected", "server"] | None = Field(
        None, description="Where the command that judged the run came from: validation.commands in the server "
                          "config, .critique/test as it is in the base commit, detection from the base commit's "
                          "files (tests mode), or the server's own checks (basic mode). Never the agent's tree.")


class PublishOutcomeView(Model):
    status: Literal["published", "skipped", "failed"]
    message: str = Field(description="What happened, e.g. why nothing was published.")
    branch: str | None
    head_sha: str | None
    pull_request_number: int | None


class DraftPullRequestView(Model):
    number: int
    url: str = Field(description="The pull request page (local repositories: this run's URL).")
    branch: str
    head_sha: str = Field(description="The last commit pushed to branch.")
    base_ref: str = Field(description="The branch the pull request targets (the run's base branch).")
    state: str = Field(description="open or closed, as the host reports it.")
    draft: bool
    host: Literal["github", "gitea", "gitlab", "local"]
    title: str
    body: str = Field(description="Links the run; lists changed paths, diff stats and the validation result.")
    created_at: str
    updated_at: str


class TurnView(Model):
    index: int
    status: str
    prompt: str | None = Field(None, description="The prompt this turn was given, as sent.")
    summary: str | None
    diff_stats: DiffStats | None
    started_at: str | None
    finished_at: str | None
    usage: UsageView
    validation: ValidationView | None = Field(description="Final validation result of this turn.")
    publish: PublishOutcomeView | None = Field(description="What publishing did at the end of this turn.")
    error: RunErrorView | None = Field(None, description="Why this turn failed (status failed), e.g. model_error or "
                                                         "patch_too_large; the run stays idle after such a turn.")
    first_model_call_at: str | None = Field(
        None, description="When the gateway received this turn's first model call (the agent started working); "
                          "null until then, and for a turn that made none.")


class EnvironmentView(Model):
    key: str = Field(description="The environment's key (SHA-256 of what determines it).")
    reused: bool = Field(description="True when the run started from an environment kept before it asked.")
    build_ms: int | None = Field(description="Duration of the build the run waited for (None when reused).")


class RunView(Model):
    id: str
    status: Literal["queued", "running", "idle", "completed", "failed", "cancelled"]
    lifecycle: str = Field(description="Where the run is; see the README's lifecycle table.")
    terminal: bool
    awaiting_follow_up: bool
    can_follow_up: bool
    next_actions: list[str]
    session_active: bool
    session_expires_at: str | None
    session_end_reason: str | None = Field(
        None, description="Why the sandbox went: end_session, expired, sandbox_lost, idle_limit (least recently "
                          "used beyond scheduler.max_idle_sessions(_per_user)), finished, server_stopped "
                          "(server.end_idle_sessions_on_stop); null while it lives. An idle run with sandbox_lost: a "
                          "follow-up turn lost its sandbox or agent; the next message restores the session.")
    turn_count: int
    repository: RepositoryView
    model_id: str
    task_kind: Literal["code", "plan"]
    title: str | None
    tags: list[str]
    metadata: dict[str, str]
    intent: str = Field(description="Deterministic prompt classification: see README.")
    base_ref: str | None
    base_commit: str | None
    validation_mode: str
    publish: Publish
    billing_mode: str
    safety: dict[str, Any] | None = Field(description="As requested (budgets under resources).")
    usage: UsageView = Field(description="All model calls of the run through the gateway.")
    summary: str | None
    changed_paths: list[str]
    diff_stats: DiffStats | None
    validation: ValidationView | None = Field(description="The latest turn's final validation result.")
    draft_pull_request: DraftPullRequestView | None = Field(description="When publish.mode was draft_pr and a "
                                                                        "turn had changes.")
    patch: str | None = Field(None, description=(
        "Only with ?patch=1: the cumulative patch against baseCommit. Patches are bytes: when the patch is valid "
        "UTF-8 this is exactly the patch (patchEncoding utf-8); when it is not (e.g. a Latin-1 file), invalid "
        "bytes are shown as U+FFFD for reading only (patchEncoding utf-8-lossy) and the exact bytes, which git "
        "apply needs, are at GET /api/v1/coding-agent/runs/{id}/patch."))
    patch_encoding: Literal["utf-8", "utf-8-lossy"] | None = Field(
        None, description="Only with ?patch=1: utf-8 when patch is exact, utf-8-lossy when it is not.")
    patch_redactions: int | None = Field(
        None, description="Only with ?patch=1: secrets or tokens replaced by [REDACTED] in the stored patch (0: it "
                          "recreates the sandbox's files exactly; otherwise it does not, and nothing was published).")
    events: list[EventView] | None = Field(None, description="Only with ?events=1.")
    turns: list[TurnView]
    agent_session_id: str | None = Field(description="The OpenCode session id; unchanged across warm turns.")
    environment: EnvironmentView | None = Field(None, description="The environment the run started from "
                                                "(.critique/setup.sh), or None.")
    chained_from_run_id: str | None = Field(description="The run this one continues (chained fallback).")
    chained_to_run_id: str | None = Field(description="The run that continued this one.")
    forked_from: ForkedFromView | None = Field(None, description="The run and turn this run was forked from.")
    paused_at: str | None = Field(None, description="When the idle session was paused (sandbox.pause_after_s); "
                                                    "the next message resumes it. Null while not paused, once "
                                                    "resumed, and once the run ended.")
    error: RunErrorView | None
    created_at: str
    updated_at: str
    started_at: str | None
    agent_ready_at: str | None = Field(
        description="When the run's first agent session was ready (restores do not change it: their timings are in "
                    "the session.restored event); null until then.")
    first_model_call_at: str | None = Field(
        description="When the gateway received the run's first model call (of its earliest turn that made one: "
                    "firstModelCallAt - createdAt is what a user waits before the agent works); null until then. "
                    "Each turn's is turns[].firstModelCallAt.")
    finished_at: str | None
    status_url: str
    stream_url: str


class RunEnvelope(Model):
    run: RunView


class RunList(Model):
    data: list[RunView]
    next_cursor: str | None


class DeliveryView(Model):
    id: str = Field(description="The webhook-id header value.")
    url: str
    event_type: str
    status: str = Field(description="The run status this delivery announces.")
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: str
    delivered_at: str | None
    next_attempt_at: str | None


class DeliveryList(Model):
    data: list[DeliveryView]


class ModelView(Model):
    id: str
    name: str
    provider: str
    context_tokens: int
    input_price: float = Field(description="Credits per million input tokens.")
    output_price: float = Field(description="Credits per million output tokens.")
    plans: list[str] = Field(description="Plans that may use the model (empty: every plan).")


class ModelList(Model):
    data: list[ModelView]


class Health(Model):
    ok: bool
    version: str
    backend: str
    warm_sandboxes: int = Field(description="Warm-pool sandboxes ready for the next run.")


class ErrorBody(Model):
    code: str
    message: str
    field: str | None = None


class ErrorEnvelope(Model):
    error: ErrorBody
