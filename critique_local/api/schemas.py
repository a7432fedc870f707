"""Request and response models (camelCase on the wire). These drive validation and the
OpenAPI document; field limits here are the API's documented bounds."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from critique_local.api.responses import (  # responses live there; re-exported here
    DeliveryList,
    DeliveryView,
    DiffStats,
    DraftPullRequestView,
    EnvironmentView,
    ErrorBody,
    ErrorEnvelope,
    EventView,
    ForkedFromView,
    Health,
    Model,
    ModelList,
    ModelView,
    Publish,
    PublishOutcomeView,
    RepositoryView,
    RunEnvelope,
    RunErrorView,
    RunList,
    RunView,
    TurnView,
    UsageView,
    ValidationView,
)
from critique_local.runs.spec import FollowUp, PublishSpec, RunOrder, RunSpec

MAX_PROMPT_CHARS = 120_000
MAX_TAGS = 20
MAX_TAG_CHARS = 64
MAX_METADATA_KEYS = 32
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


# ---- requests ---------------------------------------------------------------------------

class Billing(Model):
    mode: Literal["managed", "openrouter"] = Field("managed", description="Who pays for model calls.")
    open_router_api_key: SecretStr | None = Field(
        None, alias="openRouterApiKey", max_length=512, description="With openrouter: your key, for this run only."
    )


class SafetyNetwork(Model):
    mode: Literal["none", "restricted", "open"] = Field(description="Sandbox egress policy.")
    allowlist: list[str] = Field(default_factory=list, max_length=100, description="Hosts for restricted mode.")


class SafetyResources(Model):
    max_turns: int | None = Field(None, ge=1, le=1000, description="Budget: agent model calls.")
    max_credits: float | None = Field(None, gt=0, le=1_000_000, allow_inf_nan=False,
                                      description="Budget: credits (a finite number).")


class Safety(Model):
    network: SafetyNetwork | None = None
    resources: SafetyResources | None = None


class Webhook(Model):
    url: str = Field(min_length=8, max_length=2000, description="Receives run.status deliveries (Standard Webhooks).")


MAX_MCP_SERVERS = 10
MAX_MCP_HEADERS = 20
MCP_SERVER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"
_HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$"  # an HTTP token


class McpServer(Model):
    url: str = Field(min_length=8, max_length=2000, pattern=r"^https?://",
                     description="The remote MCP server's endpoint (Streamable HTTP or SSE).")
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, max_length=MAX_MCP_HEADERS,
        description="Sent with every request to the server, e.g. Authorization. Stored encrypted, added by "
                    "critique-local's relay outside the sandbox, never returned, deleted when the run ends.")

    @field_validator("headers", mode="after")
    @classmethod
    def _headers(cls, headers: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, value in headers.items():
            if not re.fullmatch(_HEADER_NAME, name):
                raise ValueError(f"header name {name[:40]!r} is not an HTTP token")
            text = value.get_secret_value()
            if len(text) > 8192 or any(c in text for c in "\r\n\x00"):
                raise ValueError(f"header {name} must be at most 8192 characters on one line")
        return headers


class CreateRunRequest(Model):
    repository: str | None = Field(None, max_length=201, description="owner/name.")
    repository_full_name: str | None = Field(None, max_length=201, description="owner/name (alias of repository).")
    repository_id: str | None = Field(None, max_length=64, description="A repository id from an earlier run.")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="Task instruction.")
    model_id: str | None = Field(None, max_length=200, description="Model from GET /api/v1/coding-agent/models.")
    task_kind: Literal["code", "plan"] = Field("code", description="plan uses the read-only plan agent.")
    base_ref: str | None = Field(None, max_length=200, description="Branch, tag or commit to check out.")
    git_checkout_ref: str | None = Field(None, max_length=200, description="Alias of baseRef.")
    validation_mode: Literal["basic", "tests", "minimal"] | None = Field(None, description="Checks after a turn.")
    publish: Publish | None = None
    billing: Billing | None = None
    title: str | None = Field(None, max_length=200)
    tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS,
                            description="Up to 20; normalized: trimmed, lower-cased, de-duplicated.")
    metadata: dict[str, str] = Field(default_factory=dict, max_length=MAX_METADATA_KEYS,
                                     description="Up to 32 string keys; values <= 512 chars.")
    safety: Safety | None = None
    webhook: Webhook | None = Field(None, description="run.status deliveries; the host must be allowed by config.")
    mcp_servers: dict[str, McpServer] = Field(
        default_factory=dict, max_length=MAX_MCP_SERVERS,
        description="Remote MCP servers the agent may use, by name (letters, digits, _ and -; tools appear as "
                    "<name>_<tool>). Needs safety.network.mode restricted or open.")

    @field_validator("mcp_servers", mode="after")
    @classmethod
    def _mcp_names(cls, servers: dict[str, McpServer]) -> dict[str, McpServer]:
        for name in servers:
            if not re.fullmatch(MCP_SERVER_NAME, name):
                raise ValueError(f"server name {name[:40]!r}: 1-32 letters, digits, _ or -")
        return servers

    @field_validator("tags", mode="after")
    @classmethod
    def _tags(cls, tags: list[str]) -> list[str]:
        # the count is bounded by the field (checked before any item is looked at); a dict
        # keeps the first occurrence of each tag in linear time
        out: dict[str, None] = {}
        for tag in tags:
            if len(tag) > 4 * MAX_TAG_CHARS:
                raise ValueError(f"each tag must be at most {MAX_TAG_CHARS} characters")
            norm = tag.strip().lower()
            if not norm:
                raise ValueError("tags must not be empty")
            if len(norm) > MAX_TAG_CHARS:
                raise ValueError(f"each tag must be at most {MAX_TAG_CHARS} characters")
            out.setdefault(norm)
        return list(out)

    @field_validator("metadata", mode="after")
    @classmethod
    def _metadata(cls, metadata: dict[str, str]) -> dict[str, str]:
        if len(metadata) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} keys")
        for key, value in metadata.items():
            if not key or len(key) > MAX_METADATA_KEY_CHARS:
                raise ValueError(f"keys must be 1-{MAX_METADATA_KEY_CHARS} characters")
            if len(value) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(f"values must be at most {MAX_METADATA_VALUE_CHARS} characters")
        return metadata

    @model_validator(mode="after")
    def _one_repository(self) -> CreateRunRequest:
        given = [v for v in (self.repository, self.repository_full_name, self.repository_id) if v]
        if not given:
            raise ValueError("one of repository, repositoryFullName or repositoryId is required")
        if self.repository and self.repository_full_name and self.repository != self.repository_full_name:
            raise ValueError("repository and repositoryFullName disagree")
        if self.base_ref and self.git_checkout_ref and self.base_ref != self.git_checkout_ref:
            raise ValueError("baseRef and gitCheckoutRef disagree")
        return self

    def order(self) -> RunOrder:
        """The request as the run layer takes it (the spec is what ``runs.request`` stores)."""
        stored = self.model_dump(mode="json", by_alias=True, exclude={"prompt", "billing", "mcp_servers"})
        stored["billingMode"] = self.billing.mode if self.billing else "managed"
        if self.mcp_servers:  # header names only: the values go sealed into their own column
            stored["mcpServers"] = {n: {"url": s.url, "headerNames": sorted(s.headers)} for n, s in self.mcp_servers.items()}
        key = self.billing.open_router_api_key if self.billing else None
        headers = {n: {k: v.get_secret_value() for k, v in s.headers.items()} for n, s in self.mcp_servers.items()}
        return RunOrder(RunSpec.from_stored(stored), self.prompt, key.get_secret_value() if key is not None else None,
                        {n: h for n, h in headers.items() if h})


class MessageRequest(Model):
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS, description="The follow-up.")
    publish: Publish | None = None
    end_session: bool | None = Field(None, description="true: destroy the sandbox and complete the run.")
    fallback: Literal["restore", "chain", "none"] = Field(
        "restore", description="When the session has ended (expired, sandbox lost, idle limit): restore it on the "
        "same run id from its durable state (default; a chained run when none was kept), always chain a new run, "
        "or answer 409 session_expired.")

    def follow_up(self) -> FollowUp:
        publish = PublishSpec(self.publish.mode, self.publish.branch) if self.publish is not None else None
        return FollowUp(self.prompt, publish, bool(self.end_session), self.fallback)


class ForkRequest(Model):
    turn: int = Field(ge=1, le=1_000_000, strict=True,
                      description="The turn whose tree and transcript the fork starts from (a JSON integer).")
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS,
                               description="The fork's first turn; without it the fork waits idle.")
    title: str | None = Field(None, max_length=200, description="The fork's title (default: the source's).")


MAX_EVENT_ID = 10**18 - 1  # ids and cursors are SQLite integers; larger numbers are not ours


class ListRunsQuery(Model):
    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = Field(None, max_length=18, pattern=r"^[0-9]{1,18}$", description="nextCursor of the last page.")
    status: Literal["queued", "running", "idle", "completed", "failed", "cancelled"] | None = Field(
        None, description="Only runs with this status.")
    tag: str | None = Field(None, min_length=1, max_length=MAX_TAG_CHARS,
                            description="Only runs with this tag (compared normalized: trimmed, lower-cased).")
    repository: str | None = Field(None, min_length=1, max_length=201, description="Only runs on this owner/name.")


class GetRunQuery(Model):
    patch: Literal["0", "1", "true", "false"] = Field("0", description="1: include the patch text.")
    events: Literal["0", "1", "true", "false"] = Field("0", description="1: include the activity timeline.")


class StreamQuery(Model):
    after: int | None = Field(None, ge=0, le=MAX_EVENT_ID,
                              description="Resume after this event id (or send Last-Event-ID).")

__all__ = ["DeliveryList", "DeliveryView", "DiffStats", "DraftPullRequestView", "EnvironmentView", "ErrorBody", "ErrorEnvelope", "EventView", "ForkRequest", "ForkedFromView", "Health", "Model", "ModelList", "ModelView", "Publish", "PublishOutcomeView", "RepositoryView", "RunEnvelope", "RunErrorView", "RunList", "RunView", "TurnView", "UsageView", "ValidationView"]
