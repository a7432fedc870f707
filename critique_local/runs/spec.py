"""A run's request, typed: what the client asked for, parsed once from the stored JSON.

The API layer turns a validated ``CreateRunRequest`` into a :class:`RunSpec` (and a follow-up
message into a :class:`FollowUp`); the store keeps the spec as JSON in ``runs.request`` and hands
it back parsed on every :class:`~critique_local.store.runs.RunRow`. Nothing under ``runs/`` reads
the wire models or the stored JSON itself.

The stored JSON has the wire's camelCase keys (``RunSpec.from_stored(s).to_stored() == s`` for
everything the API stores), so rows written before this module existed parse unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

PublishMode = Literal["draft_pr", "none"]
NetworkMode = Literal["none", "restricted", "open"]


@dataclass(frozen=True)
class PublishSpec:
    """``publish``: ``draft_pr`` opens a draft pull request on ``branch`` (None: the default name)."""

    mode: PublishMode = "none"
    branch: str | None = None

    @classmethod
    def from_stored(cls, data: Mapping[str, Any] | None) -> PublishSpec | None:
        if not data:
            return None
        return cls("draft_pr" if data.get("mode") == "draft_pr" else "none", _opt_str(data.get("branch")))

    def to_stored(self) -> dict[str, Any]:
        return {"mode": self.mode, "branch": self.branch}


@dataclass(frozen=True)
class NetworkSpec:
    """``safety.network``: the sandbox's egress mode and, for ``restricted``, allowed host names."""

    mode: NetworkMode
    allowlist: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResourcesSpec:
    """``safety.resources``: budgets per turn (``max_turns`` model calls) and per run (``max_credits``)."""

    max_turns: int | None = None
    max_credits: float | None = None


@dataclass(frozen=True)
class McpServerSpec:
    """One of ``mcpServers``: the remote server's ``url`` and the names of the headers the relay
    adds (their values are sealed in their own column, never in the spec)."""

    url: str
    header_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunSpec:
    """Everything a run was asked to do besides its prompts (which live on its turns).

    ``repository``/``repository_full_name``/``repository_id``, ``model_id``, ``base_ref`` and
    ``git_checkout_ref`` are kept as the client sent them (None when not sent); the resolved
    values are columns of the run itself.
    """

    repository: str | None = None
    repository_full_name: str | None = None
    repository_id: str | None = None
    model_id: str | None = None
    task_kind: Literal["code", "plan"] = "code"
    base_ref: str | None = None
    git_checkout_ref: str | None = None
    validation_mode: Literal["basic", "tests", "minimal"] | None = None  # None: minimal
    publish: PublishSpec | None = None
    billing_mode: Literal["managed", "openrouter"] = "managed"
    title: str | None = None
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    network: NetworkSpec | None = None  # None: the server's network.default_mode
    resources: ResourcesSpec | None = None
    webhook_url: str | None = None
    chained_from_run_id: str | None = None
    mcp_servers: Mapping[str, McpServerSpec] = field(default_factory=dict)
    safety_sent: bool = False  # ``safety`` was in the request (possibly with neither part)

    @property
    def byok(self) -> bool:
        """The run pays its own model provider (``billing.mode openrouter``)."""
        return self.billing_mode == "openrouter"

    @property
    def validation(self) -> Literal["basic", "tests", "minimal"]:
        return self.validation_mode or "minimal"

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> RunSpec:
        """Parse ``runs.request`` (unknown keys are ignored; missing ones take the defaults)."""
        safety = data.get("safety") or {}
        net = safety.get("network") or None
        res = safety.get("resources") or None
        return cls(
            repository=_opt_str(data.get("repository")),
            repository_full_name=_opt_str(data.get("repositoryFullName")),
            repository_id=_opt_str(data.get("repositoryId")),
            model_id=_opt_str(data.get("modelId")),
            task_kind="plan" if data.get("taskKind") == "plan" else "code",
            base_ref=_opt_str(data.get("baseRef")),
            git_checkout_ref=_opt_str(data.get("gitCheckoutRef")),
            validation_mode=data.get("validationMode") if data.get("validationMode") in ("basic", "tests", "minimal")
            else None,
            publish=PublishSpec.from_stored(data.get("publish")),
            billing_mode="openrouter" if data.get("billingMode") == "openrouter" else "managed",
            title=_opt_str(data.get("title")),
            tags=tuple(str(t) for t in data.get("tags") or ()),
            metadata={str(k): str(v) for k, v in (data.get("metadata") or {}).items()},
            network=NetworkSpec(net["mode"], tuple(net.get("allowlist") or ())) if net else None,
            resources=ResourcesSpec(res.get("maxTurns"), res.get("maxCredits")) if res else None,
            webhook_url=_opt_str((data.get("webhook") or {}).get("url")),
            chained_from_run_id=_opt_str(data.get("chainedFromRunId")),
            mcp_servers={str(name): McpServerSpec(str(s["url"]), tuple(str(h) for h in s.get("headerNames") or ()))
                         for name, s in (data.get("mcpServers") or {}).items()},
            safety_sent=data.get("safety") is not None,
        )

    def to_stored(self) -> dict[str, Any]:
        """The JSON kept in ``runs.request`` (camelCase, as the API stores it)."""
        safety: dict[str, Any] | None = None
        if self.safety_sent or self.network is not None or self.resources is not None:
            safety = {
                "network": {"mode": self.network.mode, "allowlist": list(self.network.allowlist)}
                if self.network is not None else None,
                "resources": {"maxTurns": self.resources.max_turns, "maxCredits": self.resources.max_credits}
                if self.resources is not None else None,
            }
        stored: dict[str, Any] = {
            "repository": self.repository, "repositoryFullName": self.repository_full_name,
            "repositoryId": self.repository_id, "modelId": self.model_id, "taskKind": self.task_kind,
            "baseRef": self.base_ref, "gitCheckoutRef": self.git_checkout_ref, "validationMode": self.validation_mode,
            "publish": self.publish.to_stored() if self.publish is not None else None,
            "title": self.title, "tags": list(self.tags), "metadata": dict(self.metadata), "safety": safety,
            "webhook": {"url": self.webhook_url} if self.webhook_url is not None else None,
            "billingMode": self.billing_mode,
        }
        if self.chained_from_run_id is not None:
            stored["chainedFromRunId"] = self.chained_from_run_id
        if self.mcp_servers:
            stored["mcpServers"] = {name: {"url": s.url, "headerNames": list(s.header_names)}
                                    for name, s in self.mcp_servers.items()}
        return stored

    def safety_view(self) -> dict[str, Any] | None:
        """``safety`` as the client sent it (None when not sent)."""
        return self.to_stored()["safety"]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class RunOrder:
    """A validated create request: the spec, plus what is not stored with it (the prompt goes to
    the first turn, the BYOK key and the mcpServers' header values are sealed into their own columns)."""

    spec: RunSpec
    prompt: str
    open_router_api_key: str | None = None  # as sent, None when absent
    mcp_headers: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # {server: {header: value}}


@dataclass(frozen=True)
class FollowUp:
    """A message to a run: a prompt (with the turn's publish settings), or ``end_session``."""

    prompt: str | None = None
    publish: PublishSpec | None = None
    end_session: bool = False
    fallback: Literal["restore", "chain", "none"] = "restore"


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
