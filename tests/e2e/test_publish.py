"""Publishing, as the reference's `publish.mode: draft_pr` describes it: the run's patch lands as a
commit on a branch and a draft pull request opens against the base ref; follow-ups update the
same pull request. The git host is a loopback stand-in speaking GitHub's REST API and smart
HTTP (the server authenticates to it as a GitHub App installation); `git.local_root`
repositories get the branch in the bare repository and a pull request record kept by us."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.githost_standin import APP_ID, GitHostStandIn
from tests.helpers import Server, git, make_repo, our_containers, sandbox_contains, wait_for

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"
CALC = {"calc.py": "def add(a, b):\n    return a + b\n", "README.md": "# calc\n", "pytest.ini": "[pytest]\n"}


@pytest.fixture(scope="module")
def githost(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHostStandIn]:
    root = tmp_path_factory.mktemp("githost")
    standin = GitHostStandIn(root)
    make_repo(root, "acme/api", {"README.md": "# api\n", "src/app.py": "VALUE = 1\n"})
    make_repo(root, "acme/calc", CALC)
    make_repo(root, "acme/gl", {"README.md": "# gl\n", "src/app.py": "VALUE = 1\n"})
    standin.start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def gh_server(tmp_path_factory: pytest.TempPathFactory, githost: GitHostStandIn) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("gh-server")
    key = base / "app.pem"
    key.write_text(githost.app_private_pem)
    srv = Server(base, extra_env={
        "CRITIQUE_LOCAL_GITHUB_ENABLED": "true", "CRITIQUE_LOCAL_GITHUB_BASE_URL": githost.url,
        "CRITIQUE_LOCAL_GITHUB_API_URL": f"{githost.url}/api/v3", "CRITIQUE_LOCAL_GITHUB_APP_ID": APP_ID,
        "CRITIQUE_LOCAL_GITHUB_APP_PRIVATE_KEY_PATH": str(key),
        "CRITIQUE_LOCAL_PUBLISH_AUTHOR_NAME": "Fix Bot", "CRITIQUE_LOCAL_PUBLISH_AUTHOR_EMAIL": "fixbot@example.test",
        "CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S": "60",
    })
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def gl_server(tmp_path_factory: pytest.TempPathFactory, githost: GitHostStandIn) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("gl-server"), extra_env={
        "CRITIQUE_LOCAL_GITLAB_ENABLED": "true", "CRITIQUE_LOCAL_GITLAB_BASE_URL": githost.url,
        "CRITIQUE_LOCAL_GITLAB_TOKEN": githost.token, "CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S": "60"})
    srv.start()
    yield srv
    srv.stop()


def clone(url_or_path: str, dest: Path, token: str | None = None) -> Path:
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    args = ["-c", f"http.extraHeader=Authorization: Basic {basic}"] if token else []
    subprocess.run(["git", *args, "clone", "-q", url_or_path, str(dest)], check=True, capture_output=True)
    if token:
        git("config", "http.extraHeader", args[1].split("=", 1)[1], cwd=dest)
    return dest


def tree_with_patch(repo: Path, base: str, patch: str) -> str:
    """The tree of ``base`` with the run's patch applied (in a scratch index)."""
    git("checkout", "-q", "--detach", base, cwd=repo)
    subprocess.run(["git", "apply", "--index", "--binary", "-"], input=patch, text=True, cwd=repo, check=True)
    tree = git("write-tree", cwd=repo)
    git("reset", "-q", "--hard", base, cwd=repo)
    return tree


def pull_posts(githost: GitHostStandIn, repo: str) -> list[dict[str, Any]]:
    return [r for r in githost.requests if r["method"] == "POST" and r["path"] == f"/api/v3/repos/{repo}/pulls"]


def test_draft_pr_opens_with_exactly_the_patch_and_follow_ups_update_it(
        gh_server: Server, githost: GitHostStandIn, tmp_path: Path) -> None:
    api = gh_server.client(gh_server.new_key("fixbot"))
    prompt = ("Tune the value.\n@write src/app.py\nVALUE = 2\n@end\n@write docs/NOTES.md\nnotes\n@end\n"
              "@say Bumped VALUE and added notes.")
    run = api.post(RUNS, json={"repository": "acme/api", "prompt": prompt, "publish": {"mode": "draft_pr"},
                               "validationMode": "basic"}).json()["run"]
    assert run["publish"] == {"mode": "draft_pr", "branch": None}
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["status"] == "idle" and done["error"] is None, done["error"]
    pr = done["draftPullRequest"]
    short = run["id"].removeprefix("run_")[:8]
    assert pr["branch"] == f"critique-agent/tune-the-value-{short}"
    assert (pr["number"], pr["baseRef"], pr["state"], pr["draft"], pr["host"]) == (1, "main", "open", True, "github")
    assert pr["url"] == f"{githost.url}/acme/api/pull/1" and pr["title"] == "Tune the value."
    assert done["validation"]["status"] == "passed" and done["validation"]["mode"] == "basic"
    assert done["turns"][0]["publish"]["status"] == "published"

    # the host got one draft PR, authenticated with an installation token (GitHub App), with a useful body
    (post,) = pull_posts(githost, "acme/api")
    assert post["authorization"].startswith("Bearer ghs_")
    assert post["json"]["draft"] is True and post["json"]["head"] == pr["branch"] and post["json"]["base"] == "main"
    body = post["json"]["body"]
    assert run["id"] in body and f"{RUNS}/{run['id']}" in body
    assert "`src/app.py`" in body and "`docs/NOTES.md`" in body and "+2 -1" in body
    assert "validationMode `basic`: **✅ passed**" in body
    assert "Bumped VALUE and added notes." in body

    # the branch head is one commit on the base, by the configured author, containing exactly the patch
    patch = api.get(f"{RUNS}/{run['id']}", params={"patch": "1"}).json()["run"]["patch"]
    repo = clone(f"{githost.url}/acme/api.git", tmp_path / "c1", githost.token)
    git("fetch", "-q", "origin", pr["branch"], cwd=repo)
    head = git("rev-parse", "FETCH_HEAD", cwd=repo)
    assert head == pr["headSha"]
    assert git("rev-parse", f"{head}^@", cwd=repo) == done["baseCommit"]
    assert git("log", "-1", "--format=%an <%ae>|%cn <%ce>", head, cwd=repo) == (
        "Fix Bot <fixbot@example.test>|Fix Bot <fixbot@example.test>")
    assert git("rev-parse", f"{head}^{{tree}}", cwd=repo) == tree_with_patch(repo, done["baseCommit"], patch)

    # a follow-up with publish pushes to the same branch and updates the same PR
    resp = api.post(f"{RUNS}/{run['id']}/messages", json={
        "prompt": "@write src/app.py\nVALUE = 3\n@end\n@say Bumped again.", "publish": {"mode": "draft_pr"}})
    assert resp.status_code == 202
    second = wait_for(api, run["id"], {"idle", "failed"})
    assert second["error"] is None, second["error"]
    pr2 = second["draftPullRequest"]
    assert (pr2["number"], pr2["branch"]) == (1, pr["branch"]) and pr2["headSha"] != pr["headSha"]
    assert len(pull_posts(githost, "acme/api")) == 1  # no second PR
    patches = [r for r in githost.requests if r["method"] == "PATCH" and r["path"] == "/api/v3/repos/acme/api/pulls/1"]
    assert len(patches) == 1 and "Bumped again." in patches[0]["json"]["body"]
    assert githost.pulls[("acme/api", 1)].body == patches[0]["json"]["body"]
    git("fetch", "-q", "origin", pr["branch"], cwd=repo)
    head2 = git("rev-parse", "FETCH_HEAD", cwd=repo)
    assert head2 == pr2["headSha"] and git("rev-parse", f"{head2}^@", cwd=repo) == pr["headSha"]
    patch2 = api.get(f"{RUNS}/{run['id']}", params={"patch": "1"}).json()["run"]["patch"]
    assert git("rev-parse", f"{head2}^{{tree}}", cwd=repo) == tree_with_patch(repo, done["baseCommit"], patch2)

    # a follow-up without changes (publish inherited from the last turn) pushes nothing and says so
    api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say Nothing to change."})
    third = wait_for(api, run["id"], {"idle", "failed"})
    outcome = third["turns"][2]["publish"]
    assert outcome["status"] == "skipped" and "no changes since the last published commit" in outcome["message"]
    assert third["draftPullRequest"]["headSha"] == pr2["headSha"]
    assert api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True}).status_code == 200

    # credentials never reached the sandbox: the installation token is nowhere in the run's output
    full = api.get(f"{RUNS}/{run['id']}", params={"patch": "1", "events": "1"}).text
    assert not any(token in full for token in githost.installation_tokens)


def test_a_host_error_after_the_push_is_publish_failed_and_the_next_turn_opens_the_pr(
        gh_server: Server, githost: GitHostStandIn, tmp_path: Path) -> None:
    api = gh_server.client(gh_server.new_key("flaky-host"))
    githost.pulls_status = 502
    try:
        run = api.post(RUNS, json={"repository": "acme/api", "prompt": "@write src/app.py\nVALUE = 7\n@end\n@say Seven.",
                                   "publish": {"mode": "draft_pr", "branch": "critique-agent/flaky"}}).json()["run"]
        first = wait_for(api, run["id"], {"idle", "failed"})
    finally:
        githost.pulls_status = None
    # the run stays usable; the branch was pushed, the pull request was not opened, and it says so
    assert first["status"] == "idle" and first["error"]["code"] == "publish_failed", first["error"]
    assert first["draftPullRequest"] is None
    outcome = first["turns"][0]["publish"]
    assert outcome["status"] == "failed" and outcome["branch"] == "critique-agent/flaky" and outcome["headSha"]
    assert "could not be opened" in outcome["message"] and "next turn" in outcome["message"]
    repo = clone(f"{githost.url}/acme/api.git", tmp_path / "flaky", githost.token)
    git("fetch", "-q", "origin", "critique-agent/flaky", cwd=repo)
    assert git("rev-parse", "FETCH_HEAD", cwd=repo) == outcome["headSha"]

    # the next turn (no new changes, publish inherited) opens the pull request on the pushed head
    api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say Try again."})
    second = wait_for(api, run["id"], {"idle", "failed"})
    assert second["error"] is None, second["error"]
    pr = second["draftPullRequest"]
    assert pr["branch"] == "critique-agent/flaky" and pr["headSha"] == outcome["headSha"]
    assert githost.pulls[("acme/api", pr["number"])].head == "critique-agent/flaky"
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})


def test_a_turn_without_changes_opens_nothing_and_says_so(gh_server: Server, githost: GitHostStandIn) -> None:
    api = gh_server.client(gh_server.new_key("quiet"))
    before = len(pull_posts(githost, "acme/api"))
    run = api.post(RUNS, json={"repository": "acme/api", "prompt": "@say Everything is fine already.",
                               "publish": {"mode": "draft_pr", "branch": "critique-agent/nothing"}}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["error"] is None and done["draftPullRequest"] is None
    assert done["turns"][0]["publish"] == {"status": "skipped", "branch": None, "headSha": None,
                                           "pullRequestNumber": None,
                                           "message": "no changes: no branch pushed and no pull request opened"}
    assert len(pull_posts(githost, "acme/api")) == before
    events = api.get(f"{RUNS}/{run['id']}", params={"events": "1"}).json()["run"]["events"]
    assert any(e["data"].get("type") == "publish" and e["data"]["status"] == "skipped" for e in events)
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})


def test_tests_mode_repairs_a_failing_test_and_the_pr_shows_the_passing_result(
        gh_server: Server, githost: GitHostStandIn) -> None:
    api = gh_server.client(gh_server.new_key("tester"))
    prompt = (
        "Add multiply with a test.\n"
        "@write test_calc.py\nfrom calc import add, multiply\n\n\ndef test_multiply():\n    assert multiply(3, 4) == 12\n"
        "\n\ndef test_add():\n    assert add(1, 2) == 3\n@end\n"
        "@write calc.py\ndef add(a, b):\n    return a + b\n\n\ndef multiply(a, b):\n    return a + b\n@end\n"
        "@say Added multiply.\n"
        "@repair\n"
        "@write calc.py\ndef add(a, b):\n    return a + b\n\n\ndef multiply(a, b):\n    return a * b\n@end\n"
        "@say Fixed multiply.\n"
    )
    run = api.post(RUNS, json={"repository": "acme/calc", "prompt": prompt, "validationMode": "tests",
                               "publish": {"mode": "draft_pr", "branch": "critique-agent/multiply"}}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["status"] == "idle" and done["error"] is None, done["error"]
    v = done["validation"]
    assert (v["mode"], v["status"], v["passed"], v["exitCode"], v["repairTurns"]) == ("tests", "passed", True, 0, 1)
    assert v["command"] == "python3 -m pytest -q -p no:cacheprovider" and "2 passed" in v["outputTail"]
    assert v["commandSource"] == "detected"  # from the base commit's pytest.ini
    assert done["summary"] == "Fixed multiply." and done["turns"][0]["validation"] == v

    events = api.get(f"{RUNS}/{run['id']}", params={"events": "1", "patch": "1"}).json()["run"]
    checks = [e["data"] for e in events["events"] if e["data"].get("type", "").startswith("validation")]
    assert [(c["type"], c.get("status")) for c in checks] == [
        ("validation", "failed"), ("validation.repair", None), ("validation", "passed"), ("validation", "passed")]
    assert "assert 7 == 12" in checks[0]["outputTail"] and checks[-1]["final"] is True
    assert "return a * b" in events["patch"]

    body = githost.pulls[("acme/calc", done["draftPullRequest"]["number"])].body
    assert "validationMode `tests`: **✅ passed**" in body and "after 1 repair turn(s)" in body
    assert "2 passed" in body
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})


def test_local_root_runs_get_a_branch_in_the_bare_repo_and_a_pr_record(
        server: Server, alice: str, tmp_path: Path) -> None:
    api = server.client(alice)
    run = api.post(RUNS, json={"repository": "acme/web", "title": "Local publish",
                               "prompt": "@write LOCAL.md\nlocal\n@end\n@say done",
                               "publish": {"mode": "draft_pr", "branch": "critique-agent/local-publish"}}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["error"] is None, done["error"]
    pr = done["draftPullRequest"]
    assert (pr["host"], pr["branch"], pr["baseRef"], pr["state"], pr["draft"]) == (
        "local", "critique-agent/local-publish", "main", "open", True)
    assert pr["number"] >= 1 and pr["url"] == f"{server.url}{RUNS}/{run['id']}#draftPullRequest"
    assert pr["title"] == "Local publish" and "`LOCAL.md`" in pr["body"]
    bare = server.repos / "acme" / "web.git"
    assert git("--git-dir", str(bare), "rev-parse", "refs/heads/critique-agent/local-publish") == pr["headSha"]
    assert git("--git-dir", str(bare), "show", f"{pr['headSha']}:LOCAL.md") == "local"
    assert git("--git-dir", str(bare), "rev-parse", "main") == done["baseCommit"]  # the base is untouched
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})

    # a second run asking for the same branch cannot overwrite it
    again = api.post(RUNS, json={"repository": "acme/web", "prompt": "@write OTHER.md\nx\n@end\n@say x",
                                 "publish": {"mode": "draft_pr", "branch": "critique-agent/local-publish"}}).json()
    clash = wait_for(api, again["run"]["id"], {"idle", "failed"})
    assert clash["status"] == "idle" and clash["error"]["code"] == "publish_failed"
    assert "already exists" in clash["error"]["message"] and clash["draftPullRequest"] is None
    assert git("--git-dir", str(bare), "rev-parse", "refs/heads/critique-agent/local-publish") == pr["headSha"]
    api.post(f"{RUNS}/{again['run']['id']}/messages", json={"endSession": True})


@pytest.mark.parametrize("branch", ["-delete-me", "a..b", "feat\x01x", "feat@{1}", "main", "release/1.0",
                                    "refs/heads/x", "HEAD", "has space", "x.lock", "/abs", "trailing/", "a//b",
                                    "--upload-pack=evil"])
def test_malicious_or_protected_branch_names_are_refused(server: Server, alice: str, branch: str) -> None:
    api = server.client(alice)
    before = api.get(RUNS, params={"limit": 100}).json()["data"]
    resp = api.post(RUNS, json={"repository": "acme/web", "prompt": "x",
                                "publish": {"mode": "draft_pr", "branch": branch}})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == "publish.branch"
    assert resp.json()["error"]["code"] in ("invalid_request", "protected_branch")
    assert api.get(RUNS, params={"limit": 100}).json()["data"] == before


def test_plan_runs_never_publish(server: Server, alice: str) -> None:
    api = server.client(alice)
    resp = api.post(RUNS, json={"repository": "acme/web", "prompt": "x", "taskKind": "plan",
                                "publish": {"mode": "draft_pr"}})
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "publish.mode"
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say a plan", "taskKind": "plan"}).json()["run"]
    wait_for(api, run["id"], {"idle", "failed"})
    msg = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say now publish",
                                                         "publish": {"mode": "draft_pr"}})
    assert msg.status_code == 422 and msg.json()["error"]["field"] == "publish.mode"
    after = api.get(f"{RUNS}/{run['id']}").json()["run"]
    assert after["turnCount"] == 1 and after["draftPullRequest"] is None
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})


def test_repo_test_file_comes_from_the_base_commit_and_repairs_are_capped(
        fresh_server: Server) -> None:
    make_repo(fresh_server.repos, "acme/guarded", {".critique/test": "test -f DONE && echo all-good\n",
                                                   "README.md": "# guarded\n"})
    fresh_server.extra_env["CRITIQUE_LOCAL_VALIDATION_MAX_REPAIR_TURNS"] = "1"
    fresh_server.start()
    api = fresh_server.client(fresh_server.new_key("carol"))
    # the agent rewrites the test script to always pass; the base commit's version is what runs
    prompt = "@write .critique/test\nexit 0\n@end\n@say tests weakened"
    run = api.post(RUNS, json={"repository": "acme/guarded", "prompt": prompt, "validationMode": "tests"}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    v = done["validation"]
    assert (v["status"], v["command"], v["exitCode"], v["repairTurns"]) == ("failed", ".critique/test", 1, 1)
    assert v["commandSource"] == "base_commit"
    assert done["status"] == "idle" and done["error"] is None  # the work is kept; the result says it fails
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})


def test_gitlab_draft_merge_request_opens_and_follow_ups_update_it(gl_server: Server, githost: GitHostStandIn,
                                                                    tmp_path: Path) -> None:
    api = gl_server.client(gl_server.new_key("fixbot"))
    run = api.post(RUNS, json={"repository": "acme/gl", "publish": {"mode": "draft_pr"},
                               "prompt": "Tune it.\n@write src/app.py\nVALUE = 2\n@end\n@say Tuned."}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["status"] == "idle" and done["error"] is None, done["error"]
    mr = done["draftPullRequest"]
    assert (mr["number"], mr["host"], mr["draft"], mr["state"], mr["baseRef"]) == (1, "gitlab", True, "open", "main")
    assert mr["url"] == f"{githost.url}/acme/gl/-/merge_requests/1"
    (post,) = [r for r in githost.requests if r["method"] == "POST" and r["path"].endswith("/merge_requests")]
    assert post["private_token"] == githost.token and post["json"]["title"] == "Draft: Tune it."
    assert post["json"]["source_branch"] == mr["branch"] and run["id"] in post["json"]["description"]
    repo = clone(f"{githost.url}/acme/gl.git", tmp_path / "gl", githost.token)
    git("fetch", "-q", "origin", mr["branch"], cwd=repo)
    assert git("rev-parse", "FETCH_HEAD", cwd=repo) == mr["headSha"]

    api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@write src/app.py\nVALUE = 3\n@end\n@say Again."})
    second = wait_for(api, run["id"], {"idle", "failed"})
    assert second["error"] is None and second["draftPullRequest"]["number"] == 1
    (put,) = [r for r in githost.requests if r["method"] == "PUT" and r["path"].endswith("/merge_requests/1")]
    assert put["json"]["title"] == "Draft: Tune it." and "Again." in put["json"]["description"]
    assert githost.merge_requests[("acme/gl", 1)].body == put["json"]["description"]
    git("fetch", "-q", "origin", mr["branch"], cwd=repo)
    assert git("rev-parse", "FETCH_HEAD", cwd=repo) == second["draftPullRequest"]["headSha"] != mr["headSha"]
    # the server-held token (and the Basic credential git sends) never reached the sandbox or the log
    basic = base64.b64encode(f"oauth2:{githost.token}".encode()).decode()
    (container,) = our_containers(run["id"])
    assert sandbox_contains(container, githost.token) == "" and sandbox_contains(container, basic) == ""
    assert sandbox_contains(container, "VALUE = 3") != ""  # the probe finds what is there
    assert api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True}).status_code == 200
    full = api.get(f"{RUNS}/{run['id']}", params={"patch": "1", "events": "1"}).text
    assert githost.token not in full and basic not in full
    log = (gl_server.base / "server.log").read_text()
    assert githost.token not in log and basic not in log
