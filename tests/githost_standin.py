"""A loopback git host that behaves like GitHub's REST API (and Gitea's) for pull requests, like
GitLab's REST API v4 for merge requests, and serves bare repositories over smart HTTP through
``git http-backend``. It records every request, checks credentials and payloads like the real
services, and answers as they do when something is wrong (401, 403, 409, 422). It is an external service to the server under test, never part of it."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import subprocess
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

INSTALLATION_ID = 4242
APP_ID = "777"


@dataclass
class PullRequest:
    number: int
    repo: str
    head: str
    base: str
    title: str
    body: str
    draft: bool
    state: str = "open"
    history: list[dict[str, Any]] = field(default_factory=list)


class GitHostStandIn:
    def __init__(self, root: Path, token: str = "ghp_standin_token_0123456789") -> None:
        self.root = root  # bare repositories at <root>/<owner>/<name>.git
        self.token = token
        self.requests: list[dict[str, Any]] = []
        self.pulls: dict[tuple[str, int], PullRequest] = {}
        self.installation_tokens: dict[str, datetime] = {}
        self.token_lifetime = timedelta(hours=1)
        self.pulls_status: int | None = None  # set: opening a pull request answers this (e.g. 502)
        self.merge_requests: dict[tuple[str, int], PullRequest] = {}  # GitLab: (project path, iid)
        self.read_only_token = "glpat-readonly-0123456789"  # GitLab: valid, but may not write (403)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.app_private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()).decode()
        self._app_public = key.public_key()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- credentials ----------------------------------------------------------------------

    def _valid_token(self, token: str) -> bool:
        if token == self.token:
            return True
        expires = self.installation_tokens.get(token)
        return expires is not None and expires > datetime.now(UTC)

    def _bearer(self, request: web.Request, scheme: str = "Bearer") -> str | None:
        header = request.headers.get("Authorization", "")
        return header[len(scheme) + 1:] if header.startswith(f"{scheme} ") else None

    def _app_jwt_ok(self, request: web.Request) -> bool:
        token = self._bearer(request)
        if not token:
            return False
        try:
            claims = jwt.decode(token, self._app_public, algorithms=["RS256"])
        except jwt.PyJWTError:
            return False
        return str(claims.get("iss")) == APP_ID

    def _record(self, request: web.Request, body: Any) -> None:
        self.requests.append({"method": request.method, "path": request.path, "raw_path": request.raw_path,
                              "authorization": request.headers.get("Authorization"),
                              "private_token": request.headers.get("PRIVATE-TOKEN"), "json": body})

    # ---- GitHub App ------------------------------------------------------------------------

    async def _installation(self, request: web.Request) -> web.Response:
        self._record(request, None)
        if not self._app_jwt_ok(request):
            return web.json_response({"message": "A JSON web token could not be decoded"}, status=401)
        return web.json_response({"id": INSTALLATION_ID, "app_id": int(APP_ID)})

    async def _access_token(self, request: web.Request) -> web.Response:
        self._record(request, None)
        if not self._app_jwt_ok(request) or request.match_info["id"] != str(INSTALLATION_ID):
            return web.json_response({"message": "Bad credentials"}, status=401)
        token = "ghs_" + secrets.token_hex(16)
        expires = datetime.now(UTC) + self.token_lifetime
        self.installation_tokens[token] = expires
        return web.json_response({"token": token, "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ")},
                                 status=201)

    # ---- pull requests (GitHub and Gitea shapes) -------------------------------------------

    def _branch_sha(self, repo: str, branch: str) -> str | None:
        res = subprocess.run(["git", "--git-dir", str(self.root / f"{repo}.git"), "rev-parse", "--verify", "--quiet",
                              f"refs/heads/{branch}"], capture_output=True, text=True)
        return res.stdout.strip() or None

    def _pull_json(self, pr: PullRequest) -> dict[str, Any]:
        return {"number": pr.number, "html_url": f"{self.url}/{pr.repo}/pull/{pr.number}", "state": pr.state,
                "draft": pr.draft, "title": pr.title, "body": pr.body,
                "head": {"ref": pr.head, "sha": self._branch_sha(pr.repo, pr.head)}, "base": {"ref": pr.base}}

    async def _create_pull(self, request: web.Request) -> web.Response:
        gitea = request.path.startswith("/api/v1/")
        body = await request.json()
        self._record(request, body)
        token = self._bearer(request, "token" if gitea else "Bearer")
        if not token or not self._valid_token(token):
            return web.json_response({"message": "Bad credentials"}, status=401)
        if self.pulls_status is not None:
            return web.json_response({"message": "Server Error"}, status=self.pulls_status)
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}"
        required = {"title", "head", "base", "body"} | (set() if gitea else {"draft"})
        if not required <= set(body) or not all(isinstance(body[k], str) and body[k] for k in ("title", "head", "base")):
            return web.json_response({"message": "Validation Failed", "errors": sorted(required - set(body))},
                                     status=422)
        if self._branch_sha(repo, body["head"]) is None or self._branch_sha(repo, body["base"]) is None:
            return web.json_response({"message": "Validation Failed", "errors": [{"field": "head"}]}, status=422)
        if any(p.repo == repo and p.head == body["head"] and p.state == "open" for p in self.pulls.values()):
            return web.json_response({"message": "A pull request already exists"}, status=422)
        number = 1 + max((n for r, n in self.pulls if r == repo), default=0)
        pr = PullRequest(number, repo, body["head"], body["base"], body["title"], body["body"],
                         bool(body.get("draft", False)))
        self.pulls[(repo, number)] = pr
        return web.json_response(self._pull_json(pr), status=201)

    async def _update_pull(self, request: web.Request) -> web.Response:
        gitea = request.path.startswith("/api/v1/")
        body = await request.json()
        self._record(request, body)
        token = self._bearer(request, "token" if gitea else "Bearer")
        if not token or not self._valid_token(token):
            return web.json_response({"message": "Bad credentials"}, status=401)
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}"
        pr = self.pulls.get((repo, int(request.match_info["number"])))
        if pr is None:
            return web.json_response({"message": "Not Found"}, status=404)
        pr.history.append({"title": pr.title, "body": pr.body})
        pr.title = body.get("title", pr.title)
        pr.body = body.get("body", pr.body)
        return web.json_response(self._pull_json(pr), status=201 if gitea else 200)

    # ---- GitLab merge requests (REST API v4) ----------------------------------------------

    def _mr_json(self, mr: PullRequest) -> dict[str, Any]:
        draft = mr.title.startswith(("Draft:", "[Draft]", "(Draft)"))
        return {"id": 1000 + mr.number, "iid": mr.number, "title": mr.title, "description": mr.body,
                "state": mr.state, "draft": draft, "work_in_progress": draft, "source_branch": mr.head,
                "target_branch": mr.base, "sha": self._branch_sha(mr.repo, mr.head),
                "web_url": f"{self.url}/{mr.repo}/-/merge_requests/{mr.number}"}

    def _gitlab_auth(self, request: web.Request) -> web.Response | None:
        token = request.headers.get("PRIVATE-TOKEN") or self._bearer(request)
        if token == self.read_only_token:
            return web.json_response({"message": "403 Forbidden"}, status=403)
        if not token or not self._valid_token(token):
            return web.json_response({"message": "401 Unauthorized"}, status=401)
        return None

    async def _create_mr(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._record(request, body)
        if (refused := self._gitlab_auth(request)) is not None:
            return refused
        repo = unquote(request.match_info["project"])
        if not (self.root / f"{repo}.git").is_dir():
            return web.json_response({"message": "404 Project Not Found"}, status=404)
        missing = [k for k in ("source_branch", "target_branch", "title") if not isinstance(body.get(k), str)
                   or not body[k]]
        if missing:
            return web.json_response({"error": f"{missing[0]} is missing"}, status=400)
        if body["source_branch"] == body["target_branch"] or self._branch_sha(repo, body["source_branch"]) is None \
                or self._branch_sha(repo, body["target_branch"]) is None:
            return web.json_response({"message": ["Source branch does not exist or equals the target branch"]},
                                     status=422)
        for mr in self.merge_requests.values():
            if mr.repo == repo and mr.head == body["source_branch"] and mr.state == "opened":
                return web.json_response({"message": [
                    f"Another open merge request already exists for this source branch: !{mr.number}"]}, status=409)
        iid = 1 + max((n for r, n in self.merge_requests if r == repo), default=0)
        mr = PullRequest(iid, repo, body["source_branch"], body["target_branch"], body["title"],
                         str(body.get("description") or ""), False, state="opened")
        self.merge_requests[(repo, iid)] = mr
        return web.json_response(self._mr_json(mr), status=201)

    async def _update_mr(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._record(request, body)
        if (refused := self._gitlab_auth(request)) is not None:
            return refused
        mr = self.merge_requests.get((unquote(request.match_info["project"]), int(request.match_info["iid"])))
        if mr is None:
            return web.json_response({"message": "404 Not found"}, status=404)
        if "title" in body and not body["title"]:
            return web.json_response({"message": {"title": ["can't be blank"]}}, status=400)
        mr.history.append({"title": mr.title, "body": mr.body})
        mr.title = body.get("title", mr.title)
        mr.body = body.get("description", mr.body)
        return web.json_response(self._mr_json(mr))

    # ---- git smart HTTP ----------------------------------------------------------------------

    async def _git(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        password = ""
        if auth.startswith("Basic "):
            password = base64.b64decode(auth[6:]).decode().partition(":")[2]
        self.requests.append({"method": request.method, "path": request.path, "authorization": auth or None,
                              "json": None})
        if not self._valid_token(password):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="standin"'})
        env = {
            "GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1", "REMOTE_USER": "standin",
            "PATH_INFO": request.path, "QUERY_STRING": request.query_string, "REQUEST_METHOD": request.method,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""), "PATH": "/usr/bin:/bin",
            "GIT_HTTP_MAX_REQUEST_BUFFER": "100M",
        }
        if request.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = request.headers["Content-Encoding"]
        if request.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = request.headers["Git-Protocol"]
        data = await request.read()
        proc = await asyncio.create_subprocess_exec(
            "git", "-c", "http.receivepack=true", "http-backend", env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate(data)
        head, _, payload = out.partition(b"\r\n\r\n")
        status = 200
        headers: dict[str, str] = {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(": ")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers[name] = value
        return web.Response(status=status, body=payload, headers=headers)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        def run() -> None:
            asyncio.set_event_loop(self._loop)
            app = web.Application(client_max_size=200 * 1024 * 1024)
            for prefix in ("/api/v3", "/api/v1"):
                app.router.add_post(prefix + "/repos/{owner}/{repo}/pulls", self._create_pull)
                app.router.add_patch(prefix + "/repos/{owner}/{repo}/pulls/{number}", self._update_pull)
            app.router.add_post("/api/v4/projects/{project}/merge_requests", self._create_mr)
            app.router.add_put("/api/v4/projects/{project}/merge_requests/{iid:[0-9]+}", self._update_mr)
            app.router.add_get("/api/v3/repos/{owner}/{repo}/installation", self._installation)
            app.router.add_post("/api/v3/app/installations/{id}/access_tokens", self._access_token)
            app.router.add_route("*", "/{owner}/{repo}.git/{tail:.*}", self._git)
            runner = web.AppRunner(app)
            self._runner = runner
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
            self._ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        self._ready.wait(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def pulls_json(self) -> str:
        return json.dumps({f"{r}#{n}": p.__dict__ for (r, n), p in self.pulls.items()}, default=str)
