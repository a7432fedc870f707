"""Git hosts against a loopback stand-in: GitHub App installation tokens (minted, cached,
refreshed before expiry), token auth, Gitea/Forgejo pull requests, GitLab merge requests;
branch-name rules."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from critique_local.config import GiteaSettings, GitHubSettings, GitLabSettings, Settings
from critique_local.repos.hosts import GiteaHost, GitHubHost, GitLabHost, HostError, Hosts
from critique_local.repos.names import branch_problem, protected_pattern, slug
from tests.githost_standin import APP_ID, INSTALLATION_ID, GitHostStandIn
from tests.helpers import git, make_repo


@pytest.fixture(scope="module")
def githost(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHostStandIn]:
    root = tmp_path_factory.mktemp("hosts")
    bare = make_repo(root, "acme/lib", {"a.txt": "a\n"})
    work = root / ".work" / "acme" / "lib"
    git("checkout", "-q", "-b", "topic", cwd=work)
    (work / "b.txt").write_text("b\n")
    git("add", "-A", cwd=work)
    git("commit", "-qm", "topic", cwd=work)
    git("push", "-q", str(bare), "topic", cwd=work)
    standin = GitHostStandIn(root)
    standin.start()
    yield standin
    standin.stop()


def app_settings(githost: GitHostStandIn, tmp_path: Path) -> GitHubSettings:
    key = tmp_path / "app.pem"
    key.write_text(githost.app_private_pem)
    return GitHubSettings(enabled=True, base_url=githost.url, api_url=f"{githost.url}/api/v3", app_id=APP_ID,
                          app_private_key_path=str(key))


async def test_github_app_tokens_are_cached_and_refreshed_before_expiry(githost: GitHostStandIn,
                                                                        tmp_path: Path) -> None:
    async with httpx.AsyncClient() as client:
        host = GitHubHost(app_settings(githost, tmp_path), client)
        first = await host.auth.token("acme/lib")
        assert first is not None and first.startswith("ghs_") and first in githost.installation_tokens
        assert await host.auth.token("acme/lib") == first  # cached
        minted = [r for r in githost.requests if r["path"].endswith("/access_tokens")]
        assert len(minted) == 1 and minted[0]["path"] == f"/api/v3/app/installations/{INSTALLATION_ID}/access_tokens"
        # a token with less than five minutes left is renewed, not reused
        githost.token_lifetime = timedelta(minutes=4)
        try:
            fresh = GitHubHost(app_settings(githost, tmp_path), client)
            second = await fresh.auth.token("acme/lib")
            third = await fresh.auth.token("acme/lib")
        finally:
            githost.token_lifetime = timedelta(hours=1)
        assert len({first, second, third}) == 3
        assert len([r for r in githost.requests if r["path"].endswith("/access_tokens")]) == 3
        assert (await host.git_auth_header("acme/lib") or "").startswith("Basic ")


def wrong_key_settings(githost: GitHostStandIn, tmp_path: Path) -> GitHubSettings:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    settings = app_settings(githost, tmp_path)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    Path(settings.app_private_key_path).write_bytes(other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return settings


async def test_a_wrong_app_key_is_a_clear_host_error(githost: GitHostStandIn, tmp_path: Path) -> None:
    settings = wrong_key_settings(githost, tmp_path)
    async with httpx.AsyncClient() as client:
        with pytest.raises(HostError, match="HTTP 401"):
            await GitHubHost(settings, client).auth.token("acme/lib")


async def test_github_token_pull_request_open_and_update(githost: GitHostStandIn) -> None:
    settings = GitHubSettings(enabled=True, base_url=githost.url, api_url=f"{githost.url}/api/v3",
                              token=githost.token)
    async with httpx.AsyncClient() as client:
        host = GitHubHost(settings, client)
        pr = await host.open_pull_request("acme/lib", head="topic", base="main", title="T", body="B")
        assert pr.draft is True and pr.state == "open" and pr.url.endswith(f"/acme/lib/pull/{pr.number}")
        assert githost.requests[-1]["authorization"] == f"Bearer {githost.token}"
        updated = await host.update_pull_request("acme/lib", pr.number, title="T2", body="B2")
        assert updated.number == pr.number and githost.pulls[("acme/lib", pr.number)].body == "B2"
        with pytest.raises(HostError, match="422"):  # one open PR per head
            await host.open_pull_request("acme/lib", head="topic", base="main", title="T", body="B")
        bad = GitHubHost(GitHubSettings(enabled=True, base_url=githost.url, api_url=f"{githost.url}/api/v3",
                                        token="ghp_wrong"), client)
        with pytest.raises(HostError, match="401"):
            await bad.update_pull_request("acme/lib", pr.number, title="x", body="y")
    assert GitHubSettings().api_root() == "https://api.github.com"
    assert GitHubSettings(base_url="https://ghe.corp").api_root() == "https://ghe.corp/api/v3"


async def test_gitea_pull_requests_are_marked_work_in_progress(githost: GitHostStandIn) -> None:
    async with httpx.AsyncClient() as client:
        host = GiteaHost(GiteaSettings(enabled=True, base_url=githost.url, token=githost.token), client)
        for number in list(githost.pulls):
            githost.pulls[number].state = "closed"
        pr = await host.open_pull_request("acme/lib", head="topic", base="main", title="Fix it", body="B")
        post = githost.requests[-1]
        assert post["path"] == "/api/v1/repos/acme/lib/pulls" and post["authorization"] == f"token {githost.token}"
        assert post["json"]["title"] == "WIP: Fix it" and pr.draft is True
        await host.update_pull_request("acme/lib", pr.number, title="Fix it", body="B2")
        assert githost.pulls[("acme/lib", pr.number)].title == "WIP: Fix it"


@pytest.mark.parametrize("branch", ["-x", "a..b", "a\x00b", "a\x7fb", "x@{1}", "refs/heads/x", "HEAD", "a b",
                                    "x.lock", "/x", "x/", ".x", "a//b", "a+b", "a~1", "a^", "a:b", "a?b", "a*b",
                                    "a[b", "a\\b", "é", ""])
def test_branch_names_git_could_misread_are_refused(branch: str) -> None:
    assert branch_problem(branch) is not None


@pytest.mark.parametrize("branch", ["critique-agent/fix-1", "feature/x_y.z", "a-b", "v1.2.3"])
def test_ordinary_branch_names_pass(branch: str) -> None:
    assert branch_problem(branch) is None


def test_protected_patterns_and_slugs() -> None:
    patterns = ["main", "release/*"]
    assert protected_pattern("release/2.0", patterns) == "release/*"
    assert protected_pattern("main", patterns) == "main" and protected_pattern("mainline", patterns) is None
    assert slug("Fix the Login page!!  (urgent)") == "fix-the-login-page-urgent"
    assert slug("") == "change" and slug("@@@") == "change"
    assert len(slug("x" * 100)) == 40


async def test_gitlab_merge_requests_are_drafts_numbered_by_iid(githost: GitHostStandIn, tmp_path: Path) -> None:
    settings = GitLabSettings(enabled=True, base_url=githost.url, token=githost.token)
    async with httpx.AsyncClient() as client:
        host = GitLabHost(settings, client)
        mr = await host.open_pull_request("acme/lib", head="topic", base="main", title="Fix it", body="B")
        post = githost.requests[-1]
        assert post["raw_path"] == "/api/v4/projects/acme%2Flib/merge_requests"
        assert post["private_token"] == githost.token and post["authorization"] is None
        assert post["json"] == {"source_branch": "topic", "target_branch": "main", "title": "Draft: Fix it",
                                "description": "B"}
        topic_sha = git("--git-dir", str(githost.root / "acme" / "lib.git"), "rev-parse", "topic")
        assert (mr.number, mr.draft, mr.state, mr.head_sha) == (1, True, "open", topic_sha)
        assert mr.url == f"{githost.url}/acme/lib/-/merge_requests/1"

        updated = await host.update_pull_request("acme/lib", mr.number, title="Fix it", body="B2")
        assert githost.requests[-1]["method"] == "PUT" and updated.number == 1
        assert githost.merge_requests[("acme/lib", 1)].body == "B2"
        assert githost.merge_requests[("acme/lib", 1)].title == "Draft: Fix it"

        with pytest.raises(HostError, match=r"HTTP 409: .*already exists for this source branch: !1"):
            await host.open_pull_request("acme/lib", head="topic", base="main", title="Again", body="B")
        with pytest.raises(HostError, match="HTTP 422"):
            await host.open_pull_request("acme/lib", head="no-such-branch", base="main", title="T", body="B")
        with pytest.raises(HostError, match="HTTP 404"):
            await host.update_pull_request("acme/lib", 99, title="T", body="B")
        wrong = GitLabHost(GitLabSettings(enabled=True, base_url=githost.url, token="glpat-wrong"), client)
        with pytest.raises(HostError, match="HTTP 401"):
            await wrong.update_pull_request("acme/lib", mr.number, title="x", body="y")
        reader = GitLabHost(GitLabSettings(enabled=True, base_url=githost.url, token=githost.read_only_token), client)
        with pytest.raises(HostError, match="HTTP 403"):
            await reader.open_pull_request("acme/lib", head="topic", base="main", title="T", body="B")
        with pytest.raises(HostError, match=r"needs gitlab\.token"):
            await GitLabHost(GitLabSettings(enabled=True, base_url=githost.url), client).open_pull_request(
                "acme/lib", head="topic", base="main", title="T", body="B")

    # git over smart HTTP with the token as the password of "oauth2", only in the process's env
    clone = tmp_path / "clone"
    source = Hosts(Settings(gitlab=settings, git={"local_root": str(tmp_path / "none")})).resolve("acme/lib")
    assert source is not None and source.kind == "gitlab" and source.url == f"{githost.url}/acme/lib.git"
    env = await source.git_env()
    cloned = await asyncio.create_subprocess_exec("git", "clone", "-q", source.url, str(clone), env=env)
    assert await cloned.wait() == 0
    assert (clone / "a.txt").read_text() == "a\n" and githost.token not in (clone / ".git" / "config").read_text()
    assert Settings(gitlab={"enabled": True, "base_url": "x"}).gitlab.enabled
    with pytest.raises(ValueError, match="at most one"):
        Settings(gitlab={"enabled": True, "base_url": "x"}, gitea={"enabled": True, "base_url": "y"})
