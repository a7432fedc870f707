"""Git hosts against a loopback stand-in: GitHub App installation tokens (minted, cached,
refreshed before expiry), token auth, Gitea/Forgejo pull requests; branch-name rules."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from critique_local.config import GiteaSettings, GitHubSettings
from critique_local.repos.hosts import GiteaHost, GitHubHost, HostError
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
