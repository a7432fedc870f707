"""Settings: one TOML file plus ``CRITIQUE_LOCAL_<SECTION>_<KEY>`` environment overrides.

Every key is declared once here, with its default and help text; ``config.example.toml``
documents the same keys and a test keeps the two in step. Unknown sections or keys fail at
start-up instead of being ignored.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from critique_local.envs.settings import (
    EnvironmentSettings,
)
from critique_local.settings_base import Section, absolute_path  # re-exported

ENV_PREFIX = "CRITIQUE_LOCAL_"
# Settings that name files or directories: (section, key). Each is made absolute once, when the
# configuration is validated (see :func:`absolute_path`), so no later use depends on a process's
# working directory (git runs in other directories; CLI commands run from anywhere).
PATH_SETTINGS = (("server", "data_dir"), ("server", "host_state_dir"), ("git", "local_root"), ("github", "app_private_key_path"))


class ServerSettings(Section):
    host: str = Field("127.0.0.1", description="Address the public API listens on.")
    port: int = Field(8787, ge=0, le=65535, description="Port of the public API (0 picks a free one).")
    data_dir: Path = Field(Path("./.critique-local"), validate_default=True,
                           description="State: SQLite database, secret key, mirrors, checkouts (absolute once loaded).")
    host_state_dir: Path = Field(
        Path("/run/critique-local"), validate_default=True,
        description="Host-wide directory where running servers claim their instance ids (shared by every server "
        "on the host; a per-user temp dir when it is not writable; absolute once loaded).")
    public_url: str = Field("", description="Base URL clients use (statusUrl/streamUrl); default from host:port.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or as JSON objects with request_id and run_id on every line.")
    drain_timeout_s: float = Field(
        60, ge=0, description="On SIGTERM, how long running turns may take to finish before they are cancelled.")
    end_idle_sessions_on_stop: bool = Field(
        False, description="On stop, end idle (warm) sessions instead of keeping their sandboxes for the next start.")

    @field_validator("data_dir", "host_state_dir")
    @classmethod
    def _absolute(cls, value: Path, info: ValidationInfo) -> Path:
        return absolute_path(value, info)


class GitSettings(Section):
    local_root: Path = Field(
        Path("./repos"), validate_default=True,
        description="Repository owner/name resolves to <local_root>/owner/name.git (bare; absolute once loaded)."
    )
    clone_timeout_s: float = Field(600, gt=0, description="Upper bound for preparing one checkout.")
    mirror_cache: bool = Field(True, description="Keep a bare mirror per repository and cache packed checkouts.")
    mirror_max_age_s: float = Field(0, ge=0, description="Reuse a mirror without fetching for this long (0: always fetch).")
    checkout_depth: int = Field(1, ge=0, description="History given to the sandbox (commits; 0: all of it).")
    checkout_cache_entries: int = Field(20, ge=1, description="Packed checkouts kept (per commit and branch).")

    @field_validator("local_root")
    @classmethod
    def _absolute(cls, value: Path, info: ValidationInfo) -> Path:
        return absolute_path(value, info)


class GitHubSettings(Section):
    enabled: bool = Field(False, description="Clone repositories not found under git.local_root from GitHub.")
    base_url: str = Field("https://github.com", description="github.com or a GitHub Enterprise Server URL.")
    api_url: str = Field("", description="REST API root (default: api.github.com, or <base_url>/api/v3 for GHES).")
    token: str = Field("", description="Token for cloning, pushing and pull requests (server side only).")
    app_id: str = Field("", description="GitHub App id; with app_private_key_path, used instead of token.")
    app_private_key_path: str = Field("", description="PEM private key of the GitHub App.")
    app_installation_id: str = Field("", description="Installation id (default: looked up per repository).")

    @field_validator("app_private_key_path")
    @classmethod
    def _absolute(cls, value: str, info: ValidationInfo) -> str:
        return str(absolute_path(value, info)) if value else ""

    def api_root(self) -> str:
        if self.api_url:
            return self.api_url.rstrip("/")
        base = self.base_url.rstrip("/")
        return "https://api.github.com" if base in ("https://github.com", "http://github.com") else f"{base}/api/v3"


class GiteaSettings(Section):
    enabled: bool = Field(False, description="Use a Gitea or Forgejo server for repositories not under local_root.")
    base_url: str = Field("", description="e.g. https://git.internal.example.com")
    token: str = Field("", description="Access token (server side only) for cloning, pushing and pull requests.")


class GitLabSettings(Section):
    enabled: bool = Field(False, description="Use a GitLab server (self-managed or gitlab.com) for repositories "
                                             "not under local_root.")
    base_url: str = Field("", description="e.g. https://gitlab.internal.example.com")
    token: str = Field("", description="Access token with api and write_repository scopes (server side only) for "
                                       "cloning, pushing and merge requests.")


class PublishSettings(Section):
    author_name: str = Field("critique-local agent", min_length=1, description="Author and committer of commits.")
    author_email: str = Field("agent@critique-local.invalid", min_length=3, description="Their e-mail address.")
    branch_prefix: str = Field("critique-agent/", description="Default branch: <prefix><slug>-<short run id>.")
    protected_branches: list[str] = Field(
        default_factory=lambda: ["main", "master", "develop", "release/*", "releases/*"],
        description="Branch patterns (fnmatch) never pushed to, besides the run's base branch.")
    max_bundle_bytes: int = Field(50_000_000, ge=1024, description="Largest git pack of a turn's changes read out of a sandbox.")
    timeout_s: float = Field(300, gt=0, description="Upper bound for pushing and opening the pull request.")


class ValidationSettings(Section):
    timeout_s: float = Field(600, gt=0, description="Upper bound for one validation command.")
    max_repair_turns: int = Field(2, ge=0, le=20, description="validationMode tests: repair prompts after a failure.")
    output_tail_chars: int = Field(4000, ge=100, le=100_000, description="Output kept in validation.outputTail.")
    commands: dict[str, str] = Field(
        default_factory=dict, description="Test command per repository full name (wins over the repo's own).")


class SandboxSettings(Section):
    backend: Literal["docker", "e2b"] = Field("docker", description="Sandbox backend: docker or e2b.")
    image: str = Field("critique-local/sandbox:latest", description="Sandbox image built from sandboxes/docker.")
    cpus: float = Field(1.0, gt=0, description="CPU limit per sandbox.")
    memory_mb: int = Field(2048, ge=256, description="Memory limit per sandbox (OpenCode alone uses ~0.4-0.8 GB).")
    pids_limit: int = Field(512, ge=16, description="Process limit per sandbox (fork bombs stop here).")
    nofile: int = Field(4096, ge=256, description="Open files limit per sandbox process.")
    workspace_mb: int = Field(2048, ge=64, description="Size of /workspace (tmpfs; counts as sandbox memory).")
    tmp_mb: int = Field(512, ge=16, description="Size of /tmp (tmpfs).")
    home_mb: int = Field(256, ge=16, description="Size of each writable home mount (~, ~/.local, ~/.cache).")
    agent_ready_timeout_s: float = Field(60, gt=0, description="How long OpenCode may take to become healthy "
                                         "(and, for each turn, to open its event stream).")
    turn_timeout_s: float = Field(1800, gt=0, description="Upper bound for one agent turn.")
    idle_timeout_s: float = Field(1800, gt=0, description="A warm session expires this long after its last turn.")
    max_lifetime_s: float = Field(14400, gt=0, description="Hard cap on one sandbox's total lifetime.")
    reap_interval_s: float = Field(5, gt=0, description="How often expired sessions are looked for.")
    sweep_interval_s: float = Field(30, gt=0, description="How often sandboxes nothing can use any more (of "
                                    "ended runs, or stopped) are looked for and removed.")
    pause_after_s: float = Field(600, ge=0, description="An idle session is paused after this long without a "
                                 "message (Docker: the agent's processes stop and their memory is freed, the "
                                 "container and its files stay; E2B: paused in place); the next message resumes "
                                 "it; 0: never.")
    state_keep_s: float = Field(604800, gt=0, description="How long a run's durable turn state (tree and agent "
                                "transcript, for restore and fork) is kept after its last turn once the session "
                                "ended (expired, lost, idle limit).")
    max_state_bytes: int = Field(64_000_000, ge=1_000_000, description="Largest agent session export kept per run "
                                 "(larger: that run's session cannot be restored, a message chains).")


class NetworkSettings(Section):
    default_mode: Literal["none", "restricted", "open"] = Field(
        "none", description="safety.network.mode of runs that name none.")
    allow_open: bool = Field(False, description="Whether runs may ask for mode open (unrestricted egress).")
    default_allowlist: list[str] = Field(default_factory=list, description="Allowlist of restricted runs naming none.")
    private_cidrs: list[str] = Field(
        default_factory=list,
        description="Private address ranges the egress proxy may connect to (default: none; public addresses only).")
    proxy_port: int = Field(0, ge=0, le=65535, description="Egress proxy port on the sandbox-facing address (0: any).")


class E2BSettings(Section):
    api_key: str = Field("", description="E2B API key (default: the E2B_API_KEY environment variable).")
    template: str = Field("critique-local-opencode", description="Template built from sandboxes/e2b.")
    domain: str = Field("", description="E2B domain (self-hosted E2B); empty: E2B's cloud.")
    gateway_url: str = Field("", description="This server's /api/v1 as E2B sandboxes reach it (https).")


class DockerSettings(Section):
    network: str = Field("critique-sandboxes", description="Internal Docker network (no route out) for sandboxes.")
    open_network: str = Field("critique-sandboxes-open", description="Network with a route out, for mode open.")
    host_firewall: bool = Field(
        True, description="iptables: sandboxes may reach only the gateway and proxy ports of the host.")
    gateway_port: int = Field(
        0, ge=0, le=65535, description="Port of the model gateway on the sandbox network's gateway address "
        "(0: a free port, picked at first start and remembered in the data dir, so several servers never clash)."
    )


class MetricsSettings(Section):
    enabled: bool = Field(False, description="Serve /metrics (Prometheus text format) on a listener of its own.")
    host: str = Field("127.0.0.1", description="Address of the metrics listener.")
    port: int = Field(9464, ge=0, le=65535, description="Port of the metrics listener (0 picks a free one, logged).")
    token: str = Field("", description="When set, /metrics is also served on the public port to "
                       "Authorization: Bearer <token> (empty: never on the public port).")


class PoolSettings(Section):
    size: int = Field(1, ge=0, le=64, description="Warm sandboxes with OpenCode running and an empty workspace.")
    max_size: int = Field(
        0, ge=0, le=64, description="Grow the empty-workspace pool above pool.size, up to this many, while runs "
        "asked for that many warm sandboxes within pool.demand_window_s (0: fixed at pool.size).")
    demand_window_s: float = Field(300, gt=0, description="How far back recent demand is counted for pool.max_size.")
    refill_parallel: int = Field(
        2, ge=1, le=16, description="Warm sandboxes started at once while the pool refills.")
    repositories: dict[str, int] = Field(
        default_factory=dict, description="Warm sandboxes that already hold a repository's default branch.")
    environments: dict[str, int] = Field(
        default_factory=dict, description="Warm sandboxes started from the kept environment of a repository's "
        "default branch (.critique/setup.sh), holding that branch.")


class SchedulerSettings(Section):
    max_concurrent_runs: int = Field(4, ge=1, description="Runs executing at once; later ones wait queued.")
    max_concurrent_runs_per_user: int = Field(2, ge=1, description="Turns one user may have executing at once.")
    max_idle_sessions: int = Field(
        32, ge=1, description="Warm (idle) sessions kept in all; beyond it the least recently used one ends.")
    max_idle_sessions_per_user: int = Field(
        8, ge=1, description="Warm (idle) sessions one user keeps; beyond it their least recently used one ends.")


class ModelsSettings(Section):
    default: str = Field("critique/scripted", description="modelId used when a run does not name one.")
    scripted_input_price: float = Field(0.0, ge=0, description="Credits per million input tokens of critique/scripted.")
    scripted_output_price: float = Field(0.0, ge=0, description="Credits per million output tokens of critique/scripted.")
    unreachable_timeout_s: float = Field(
        120, gt=0, le=3600, description="A turn whose model cannot be reached ends with model_unreachable after this "
        "long: no model call from the sandbox reaches the gateway, or the provider keeps failing or does not answer.")


class BillingSettings(Section):
    default_plan: str = Field("free", description="Plan of a new user.")
    initial_credits: float = Field(0.0, ge=0, description="Credits a new user starts with.")
    orchestration_credits: float = Field(0.0, ge=0, description="Charged per run in openrouter (BYOK) mode.")
    byok_provider: str = Field("openrouter", description="[providers.NAME] that BYOK runs' model calls go to.")


class WebhookSettings(Section):
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Hosts webhook URLs may name (exact, or *.example.com); empty: none.")
    timeout_s: float = Field(10, gt=0, description="Upper bound for one delivery attempt.")
    retry_base_s: float = Field(5, gt=0, description="First retry delay; doubles each attempt.")
    retry_max_s: float = Field(3600, gt=0, description="Longest delay between two attempts.")
    retry_window_s: float = Field(90000, gt=0, description="Give up after this long (default 25 h).")
    poll_interval_s: float = Field(1, gt=0, description="How often due deliveries are looked for.")
    user_urls: dict[str, list[str]] = Field(
        default_factory=dict, description="Default endpoints per user name, for every run of that user.")


class LimitsSettings(Section):
    max_patch_bytes: int = Field(10_000_000, ge=1024, description="A larger patch fails the run (patch_too_large).")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body.")
    requests_per_minute: int = Field(600, ge=0, description="Per API key (0: unlimited); over it: 429 + Retry-After.")
    burst: int = Field(120, ge=1, description="Requests a key may make at once before the per-minute rate applies.")
    public_connections: int = Field(1024, ge=16, description="Open connections to the public listener (more: 503).")
    sandbox_connections: int = Field(
        1024, ge=16, description="Open connections from all sandboxes to the gateway and egress proxy together.")
    connections_per_sandbox: int = Field(
        64, ge=4, description="Open connections from one sandbox to the gateway and egress proxy together.")
    request_head_timeout_s: float = Field(
        10, gt=0, description="A connection must send a complete request head this soon after opening or after "
                              "its previous response, or it is closed.")
    request_body_timeout_s: float = Field(30, gt=0, description="Upper bound for receiving one request body (408).")
    max_summary_chars: int = Field(20_000, ge=1000, description="Summaries and agent error messages are clipped "
                                                                "to this, with a marker.")
    max_events_per_turn: int = Field(2000, ge=100, description="Agent events stored per turn; the rest are counted "
                                                               "in one events.clipped event.")


class ProviderSettings(Section):
    base_url: str = Field(description="OpenAI-compatible base URL, e.g. http://127.0.0.1:11434/v1.")
    api_key: str = Field("", description="Provider key; stays in the server.")
    timeout_s: float = Field(300, gt=0, description="Upper bound for one upstream call.")


class CatalogModel(Section):
    id: str = Field(description="modelId clients use.")
    input_price: float = Field(0.0, ge=0, description="Credits per million input tokens.")
    output_price: float = Field(0.0, ge=0, description="Credits per million output tokens.")
    plans: list[str] = Field(default_factory=list, description="Plans that may use the model (empty: all).")
    provider: str = Field(description="Name of a [providers.NAME] section.")
    upstream_id: str = Field("", description="Model name sent upstream (default: id).")
    name: str = Field("", description="Display name.")
    context_tokens: int = Field(128_000, ge=1024, description="Context window told to OpenCode.")
    output_tokens: int = Field(8192, ge=256, description="Output limit told to OpenCode.")


class Settings(Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    git: GitSettings = Field(default_factory=GitSettings)
    github: GitHubSettings = Field(default_factory=GitHubSettings)
    gitea: GiteaSettings = Field(default_factory=GiteaSettings)
    gitlab: GitLabSettings = Field(default_factory=GitLabSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)
    docker: DockerSettings = Field(default_factory=DockerSettings)
    e2b: E2BSettings = Field(default_factory=E2BSettings)
    network: NetworkSettings = Field(default_factory=NetworkSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    environments: EnvironmentSettings = Field(default_factory=EnvironmentSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    billing: BillingSettings = Field(default_factory=BillingSettings)
    providers: dict[str, ProviderSettings] = Field(default_factory=dict)
    catalog: list[CatalogModel] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_remote_host(self) -> Settings:
        if sum((self.github.enabled, self.gitea.enabled, self.gitlab.enabled)) > 1:
            raise ValueError("enable at most one of [github], [gitea] and [gitlab]")
        if self.gitlab.enabled and not self.gitlab.base_url:
            raise ValueError("[gitlab] enabled needs base_url")
        if self.gitea.enabled and not self.gitea.base_url:
            raise ValueError("[gitea] enabled needs base_url")
        if bool(self.github.app_id) != bool(self.github.app_private_key_path):
            raise ValueError("[github] app_id and app_private_key_path go together")
        return self

    @property
    def db_path(self) -> Path:
        return self.server.data_dir / "critique.db"

    def paths_summary(self) -> str:
        """The path settings as ``section.key=/absolute/path``, for the start-up log."""
        return ", ".join(f"{section}.{key}={getattr(getattr(self, section), key) or '(unset)'}"
                         for section, key in PATH_SETTINGS)

    def public_base_url(self, bound_port: int | None = None) -> str:
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        port = bound_port or self.server.port
        host = self.server.host if self.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{port}"


class ConfigError(Exception):
    """The configuration file or an override is invalid; the message says where."""


SCALAR_SECTIONS = ("server", "git", "github", "gitea", "gitlab", "publish", "validation", "sandbox", "docker", "e2b", "network", "scheduler", "pool", "metrics", "models", "limits", "webhooks", "billing", "environments")


def _env_overrides(environ: dict[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for section in SCALAR_SECTIONS:
        model = Settings.model_fields[section].annotation
        assert isinstance(model, type) and issubclass(model, Section)
        for key in model.model_fields:
            name = f"{ENV_PREFIX}{section.upper()}_{key.upper()}"
            if name in environ:
                value: Any = environ[name]
                if value.startswith(("[", "{")):  # lists and tables as JSON
                    try:
                        value = json.loads(value)
                    except ValueError as exc:
                        raise ConfigError(f"{name}: invalid JSON: {exc}") from exc
                out.setdefault(section, {})[key] = value
    return out


def load_settings(path: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read ``path`` (if given), apply environment overrides, validate strictly.

    Path settings (:data:`PATH_SETTINGS`) come back absolute: relative values written in the
    file (and the defaults, e.g. ``./.critique-local``) are taken from the file's directory, or
    from the working directory when there is no file; relative values from the environment are
    taken from the working directory. Raises :class:`ConfigError` naming the file, key or
    variable at fault."""
    data: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        base_dir = absolute_path(path).parent
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    for section, key in PATH_SETTINGS:  # defaults are relative to the file like written values
        target = data.setdefault(section, {})
        model = Settings.model_fields[section].annotation
        if isinstance(target, dict) and isinstance(model, type) and issubclass(model, Section):
            target.setdefault(key, str(model.model_fields[key].default))
    for section, values in _env_overrides(dict(os.environ if environ is None else environ)).items():
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in values.items():
            if (section, key) in PATH_SETTINGS and isinstance(value, str) and value:
                value = str(absolute_path(value))  # typed in a shell: relative to where it was typed
            target[key] = value
    try:
        return Settings.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from exc
