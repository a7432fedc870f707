"""Where a repository lives and how the server (never a sandbox) authenticates to it.

A repository ``owner/name`` resolves, in order, to a bare repository under ``git.local_root``,
then to GitHub / GitHub Enterprise Server, Gitea / Forgejo or GitLab (whichever is enabled). Remote
hosts also open and update pull requests through their REST APIs. Credentials reach git only
as an ``http.extraHeader`` in the environment of a git process the server runs.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt

from critique_local.config import GiteaSettings, GitHubSettings, GitLabSettings, Settings
from critique_local.redact import Redactor
from critique_local.repos.git import clean_env

API_TIMEOUT_S = 30.0
TOKEN_REFRESH_MARGIN_S = 300.0  # installation tokens live an hour; renew five minutes early


class HostError(Exception):
    """A git host's API refused or failed a request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class RemotePullRequest:
    number: int
    url: str
    state: str
    draft: bool
    head_sha: str


class RemoteHost(abc.ABC):
    kind: str

    @abc.abstractmethod
    def clone_url(self, full_name: str) -> str: ...

    @abc.abstractmethod
    async def git_auth_header(self, full_name: str) -> str | None:
        """The ``Authorization`` header value git sends, or None for anonymous access."""

    @abc.abstractmethod
    async def open_pull_request(self, full_name: str, *, head: str, base: str, title: str,
                                body: str) -> RemotePullRequest: ...

    @abc.abstractmethod
    async def update_pull_request(self, full_name: str, number: int, *, title: str,
                                  body: str) -> RemotePullRequest: ...


@dataclass(frozen=True)
class Source:
    """One repository: a local bare repository, or a remote host's."""

    full_name: str
    url: str
    host: RemoteHost | None  # None: under git.local_root

    @property
    def local(self) -> bool:
        return self.host is None

    @property
    def kind(self) -> str:
        return "local" if self.host is None else self.host.kind

    async def git_env(self) -> dict[str, str]:
        """Environment for a git process: no user or system config, no prompts, credentials as a
        header (never on the command line, never in a remote URL that could be persisted)."""
        env = clean_env()
        header = await self.host.git_auth_header(self.full_name) if self.host is not None else None
        if header:
            env.update({"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
                        "GIT_CONFIG_VALUE_0": f"Authorization: {header}"})
        return env


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _api_error(resp: httpx.Response, what: str) -> HostError:
    try:
        body = resp.json()
        detail = str(body.get("message") or body)
        if body.get("errors"):
            detail += f" ({body['errors']})"
    except ValueError:
        detail = resp.text[:300]
    return HostError(f"{what}: HTTP {resp.status_code}: {detail[:500]}", resp.status_code)


class GitHubAuth:
    """A configured token, or GitHub App installation tokens minted from the app's key and
    cached until five minutes before they expire."""

    def __init__(self, settings: GitHubSettings, client: httpx.AsyncClient, redactor: Redactor | None = None) -> None:
        self.settings = settings
        self.client = client
        self.redactor = redactor
        self._installations: dict[str, str] = {}  # owner/name -> installation id
        self._tokens: dict[str, tuple[str, float]] = {}  # installation id -> (token, expires at, epoch)
        self._lock = asyncio.Lock()

    @property
    def is_app(self) -> bool:
        return bool(self.settings.app_id)

    def app_jwt(self) -> str:
        key = Path(self.settings.app_private_key_path).read_text()
        now = int(time.time())
        return str(jwt.encode({"iat": now - 60, "exp": now + 540, "iss": self.settings.app_id}, key, algorithm="RS256"))

    async def token(self, full_name: str) -> str | None:
        if not self.is_app:
            return self.settings.token or None
        async with self._lock:
            installation = self.settings.app_installation_id or self._installations.get(full_name)
            if not installation:
                installation = await self._lookup_installation(full_name)
                self._installations[full_name] = installation
            cached = self._tokens.get(installation)
            if cached and cached[1] - time.time() > TOKEN_REFRESH_MARGIN_S:
                return cached[0]
            resp = await self.client.post(f"{self.settings.api_root()}/app/installations/{installation}/access_tokens",
                                          headers=self._app_headers())
            if resp.status_code != 201:
                raise _api_error(resp, "creating a GitHub App installation token")
            body = resp.json()
            expires = _epoch(str(body["expires_at"]))
            self._tokens[installation] = (str(body["token"]), expires)
            if self.redactor is not None:
                self.redactor.add(str(body["token"]))
            return str(body["token"])

    async def _lookup_installation(self, full_name: str) -> str:
        resp = await self.client.get(f"{self.settings.api_root()}/repos/{full_name}/installation",
                                     headers=self._app_headers())
        if resp.status_code != 200:
            raise _api_error(resp, f"finding the GitHub App installation for {full_name}")
        return str(resp.json()["id"])

    def _app_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.app_jwt()}", "Accept": "application/vnd.github+json"}


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class GitHubHost(RemoteHost):
    kind = "github"

    def __init__(self, settings: GitHubSettings, client: httpx.AsyncClient, redactor: Redactor | None = None) -> None:
        self.settings = settings
        self.client = client
        self.auth = GitHubAuth(settings, client, redactor)

    def clone_url(self, full_name: str) -> str:
        return f"{self.settings.base_url.rstrip('/')}/{full_name}.git"

    async def git_auth_header(self, full_name: str) -> str | None:
        token = await self.auth.token(full_name)
        return _basic("x-access-token", token) if token else None

    async def _headers(self, full_name: str) -> dict[str, str]:
        token = await self.auth.token(full_name)
        if not token:
            raise HostError("publishing to GitHub needs github.token or a GitHub App")
        return {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28"}

    async def open_pull_request(self, full_name: str, *, head: str, base: str, title: str,
                                body: str) -> RemotePullRequest:
        resp = await self.client.post(f"{self.settings.api_root()}/repos/{full_name}/pulls",
                                      headers=await self._headers(full_name),
                                      json={"title": title, "head": head, "base": base, "body": body, "draft": True})
        if resp.status_code != 201:
            raise _api_error(resp, "opening the pull request")
        return self._pull(resp.json())

    async def update_pull_request(self, full_name: str, number: int, *, title: str, body: str) -> RemotePullRequest:
        resp = await self.client.patch(f"{self.settings.api_root()}/repos/{full_name}/pulls/{number}",
                                       headers=await self._headers(full_name), json={"title": title, "body": body})
        if resp.status_code != 200:
            raise _api_error(resp, f"updating pull request #{number}")
        return self._pull(resp.json())

    @staticmethod
    def _pull(data: dict[str, Any]) -> RemotePullRequest:
        return RemotePullRequest(number=int(data["number"]), url=str(data["html_url"]), state=str(data["state"]),
                                 draft=bool(data.get("draft", True)), head_sha=str(data["head"]["sha"]))


class GiteaHost(RemoteHost):
    """Gitea and Forgejo. They have no draft flag; a ``WIP:`` title prefix marks work in progress
    (and blocks merging) there."""

    kind = "gitea"

    def __init__(self, settings: GiteaSettings, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.client = client

    def clone_url(self, full_name: str) -> str:
        return f"{self.settings.base_url.rstrip('/')}/{full_name}.git"

    async def git_auth_header(self, full_name: str) -> str | None:
        return _basic("critique-local", self.settings.token) if self.settings.token else None

    def _api(self, full_name: str) -> str:
        return f"{self.settings.base_url.rstrip('/')}/api/v1/repos/{full_name}/pulls"

    def _headers(self) -> dict[str, str]:
        if not self.settings.token:
            raise HostError("publishing to Gitea needs gitea.token")
        return {"Authorization": f"token {self.settings.token}", "Accept": "application/json"}

    async def open_pull_request(self, full_name: str, *, head: str, base: str, title: str,
                                body: str) -> RemotePullRequest:
        resp = await self.client.post(self._api(full_name), headers=self._headers(),
                                      json={"title": f"WIP: {title}", "head": head, "base": base, "body": body})
        if resp.status_code != 201:
            raise _api_error(resp, "opening the pull request")
        return self._pull(resp.json())

    async def update_pull_request(self, full_name: str, number: int, *, title: str, body: str) -> RemotePullRequest:
        resp = await self.client.patch(f"{self._api(full_name)}/{number}", headers=self._headers(),
                                       json={"title": f"WIP: {title}", "body": body})
        if resp.status_code not in (200, 201):
            raise _api_error(resp, f"updating pull request #{number}")
        return self._pull(resp.json())

    @staticmethod
    def _pull(data: dict[str, Any]) -> RemotePullRequest:
        return RemotePullRequest(number=int(data["number"]), url=str(data["html_url"]), state=str(data["state"]),
                                 draft=True, head_sha=str((data.get("head") or {}).get("sha") or ""))


class GitLabHost(RemoteHost):
    """GitLab (self-managed or gitlab.com), REST API v4. Merge requests are drafts through the
    ``Draft:`` title prefix (GitLab derives ``draft: true`` from it); their number is the iid."""

    kind = "gitlab"

    def __init__(self, settings: GitLabSettings, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.client = client

    def clone_url(self, full_name: str) -> str:
        return f"{self.settings.base_url.rstrip('/')}/{full_name}.git"

    async def git_auth_header(self, full_name: str) -> str | None:
        # GitLab takes any token as the password of the user "oauth2" (personal, project, group)
        return _basic("oauth2", self.settings.token) if self.settings.token else None

    def _api(self, full_name: str) -> str:
        project = quote(full_name, safe="")  # a project path is an id when URL-encoded
        return f"{self.settings.base_url.rstrip('/')}/api/v4/projects/{project}/merge_requests"

    def _headers(self) -> dict[str, str]:
        if not self.settings.token:
            raise HostError("publishing to GitLab needs gitlab.token")
        return {"PRIVATE-TOKEN": self.settings.token, "Accept": "application/json"}

    async def open_pull_request(self, full_name: str, *, head: str, base: str, title: str,
                                body: str) -> RemotePullRequest:
        resp = await self.client.post(self._api(full_name), headers=self._headers(), json={
            "source_branch": head, "target_branch": base, "title": f"Draft: {title}", "description": body})
        if resp.status_code != 201:
            raise _api_error(resp, "opening the merge request")
        return self._merge_request(resp.json())

    async def update_pull_request(self, full_name: str, number: int, *, title: str, body: str) -> RemotePullRequest:
        resp = await self.client.put(f"{self._api(full_name)}/{number}", headers=self._headers(),
                                     json={"title": f"Draft: {title}", "description": body})
        if resp.status_code != 200:
            raise _api_error(resp, f"updating merge request !{number}")
        return self._merge_request(resp.json())

    @staticmethod
    def _merge_request(data: dict[str, Any]) -> RemotePullRequest:
        state = str(data["state"])
        return RemotePullRequest(number=int(data["iid"]), url=str(data["web_url"]),
                                 state="open" if state == "opened" else state,
                                 draft=bool(data.get("draft", data.get("work_in_progress", True))),
                                 head_sha=str(data.get("sha") or ""))


class Hosts:
    """Resolves repositories; owns the HTTP client and token caches of the remote host."""

    def __init__(self, settings: Settings, redactor: Redactor | None = None) -> None:
        self.settings = settings
        self.client = httpx.AsyncClient(timeout=API_TIMEOUT_S, transport=httpx.AsyncHTTPTransport(retries=2))
        self.remote: RemoteHost | None = None
        if settings.github.enabled:
            self.remote = GitHubHost(settings.github, self.client, redactor)
        elif settings.gitea.enabled:
            self.remote = GiteaHost(settings.gitea, self.client)
        elif settings.gitlab.enabled:
            self.remote = GitLabHost(settings.gitlab, self.client)

    def local_path(self, full_name: str) -> Path:
        owner, name = full_name.split("/", 1)
        return self.settings.git.local_root / owner / f"{name}.git"

    def resolve(self, full_name: str) -> Source | None:
        path = self.local_path(full_name)
        if path.is_dir():
            return Source(full_name, str(path.resolve()), None)
        if self.remote is not None:
            return Source(full_name, self.remote.clone_url(full_name), self.remote)
        return None

    async def aclose(self) -> None:
        await self.client.aclose()
