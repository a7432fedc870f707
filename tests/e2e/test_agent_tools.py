"""The agent works as on a developer's machine: every OpenCode tool a real model uses, scratch
space outside the workspace, a subagent whose work shows in the run's events, and plan runs that
may explore freely while the server keeps their tree unchanged. Real opencode in real containers,
driven through the scripted model's ``@tool`` step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Server, git, wait_for
from tests.upstream_standin import UpstreamStandIn

pytestmark = pytest.mark.e2e

RUNS = "/api/v1/coding-agent/runs"
REFUSED = "a rule prevents"  # what OpenCode tells the model when a permission rule denies a call


def tool_call(name: str, **args: Any) -> str:
    return f"@tool {name} {json.dumps(args)}"


def events_of(api: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    return [e["data"] for e in api.get(f"{RUNS}/{run_id}", params={"events": "1"}).json()["run"]["events"]]


def finished(rows: list[dict[str, Any]], tool: str, *, child: bool = False) -> list[dict[str, Any]]:
    """The tool's rows that reached a final status, from the run's own session or a subagent's."""
    return [r for r in rows if r.get("type") == "tool" and r["tool"] == tool and r["status"] in ("completed", "error")
            and ("sessionId" in r) == child]


CHILD_SCRIPT = "\n".join([
    "@bash echo from-child > /tmp/child-marker && cat /tmp/marker",
    "@write child.py", "CHILD = 1", "@end",
    "@say child done",
])
TOOLS_SCRIPT = "\n".join([
    "Use every tool.",
    "@bash echo warm > /tmp/marker && mkdir -p ~/.cache/pip ~/.local/share/tool && echo cached > ~/.cache/pip/probe"
    " && cat /tmp/marker ~/.cache/pip/probe && id -u"
    " && git config --global user.email agent@example.com && git config --global user.email",
    tool_call("read", filePath="/workspace/app.py"),
    tool_call("read", filePath="/workspace"),  # OpenCode 1.18 lists directories with read (no list tool)
    tool_call("glob", pattern="**/*.py"),
    tool_call("grep", pattern="def add", include="*.py"),
    tool_call("edit", filePath="/workspace/app.py", oldString="return a + b", newString="return b + a"),
    tool_call("todowrite", todos=[{"content": "swap the operands", "status": "completed", "priority": "high"}]),
    tool_call("write", filePath="/tmp/scratch/notes.txt", content="scratch notes\n"),
    tool_call("read", filePath="/tmp/scratch/notes.txt"),
    tool_call("task", description="child work", subagent_type="general", prompt=CHILD_SCRIPT),
    "@bash cat /tmp/child-marker",
    tool_call("webfetch", url="http://docs.example.invalid/"),  # allowed; the network policy (none) decides
    "@say All tools used.",
])


def test_every_tool_works_outside_the_workspace_too_and_subagents_show_in_the_events(
        server: Server, alice: str, tmp_path: Path) -> None:
    with server.client(alice) as api:
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": TOOLS_SCRIPT}).json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"}, timeout_s=240)
        assert done["status"] == "idle", done["error"]
        assert done["summary"] == "All tools used."  # the run's own text, not the subagent's
        rows = events_of(api, run["id"])
        patch = api.get(f"{RUNS}/{run['id']}", params={"patch": "1"}).json()["run"]["patch"]
    assert not [r for r in rows if REFUSED in json.dumps(r) or r.get("type") == "permission.rejected"], rows

    def output(tool: str, nth: int = 0, child: bool = False) -> str:
        row = finished(rows, tool, child=child)[nth]
        assert row["status"] == "completed", row
        return str(row["output"])

    # scratch space, caches and settings outside /workspace, as the unprivileged sandbox user
    assert output("bash").split() == ["warm", "cached", "1000", "agent@example.com"]
    assert "def add" in output("read", 0)
    assert "app.py" in output("read", 1) and "test_app.py" in output("read", 1)
    assert "app.py" in output("glob") and "test_app.py" in output("glob")
    assert "app.py" in output("grep")
    output("edit")
    assert "swap the operands" in output("todowrite")
    output("write")
    assert "scratch notes" in output("read", 2)
    # the subagent: its own tool calls, in its own session, under the task that started it
    task = finished(rows, "task")[0]
    assert task["status"] == "completed" and "child done" in task["output"]
    child_rows = [r for r in rows if r.get("sessionId") == task["childSessionId"]]
    assert {r["parentSessionId"] for r in child_rows} == {
        r["parentSessionId"] for r in rows if "parentSessionId" in r}
    assert output("bash", child=True).strip() == "warm"  # the child sees the parent's /tmp
    assert finished(rows, "write", child=True)[0]["status"] == "completed"
    assert any(r.get("type") == "text" and r["text"] == "child done" for r in child_rows)
    assert output("bash", 1).strip() == "from-child"  # and the parent sees the child's
    fetch = finished(rows, "webfetch")[0]
    assert fetch["status"] == "error" and REFUSED not in str(fetch["error"])
    # only the tree is the result: scratch files are not, the child's file is
    assert done["changedPaths"] == ["app.py", "child.py"]
    clone = tmp_path / "clone"
    git("clone", "-q", str(server.repos / "acme/web.git"), str(clone))
    (tmp_path / "run.patch").write_text(patch)
    git("apply", "--index", str(tmp_path / "run.patch"), cwd=clone)
    assert "return b + a" in (clone / "app.py").read_text() and (clone / "child.py").read_text() == "CHILD = 1\n"


def test_gpt_models_edit_with_apply_patch(server: Server, alice: str, upstream: UpstreamStandIn) -> None:
    """OpenCode gives models named gpt-* apply_patch instead of edit and write."""
    patch_text = "\n".join([
        "*** Begin Patch",
        "*** Update File: app.py", "@@", "-    return a + b", "+    return a + b  # patched",
        "*** Add File: docs/NOTES.md", "+added by apply_patch",
        "*** Delete File: README.md",
        "*** End Patch",
    ])
    prompt = tool_call("apply_patch", patchText=patch_text) + "\n@say patched"
    with server.client(alice) as api:
        run = api.post(RUNS, json={"repository": "acme/web", "modelId": "acme/gpt-5-coder", "prompt": prompt}).json()
        done = wait_for(api, run["run"]["id"], {"idle", "failed"})
        assert done["status"] == "idle", done["error"]
        rows = events_of(api, done["id"])
        patch = api.get(f"{RUNS}/{done['id']}", params={"patch": "1"}).json()["run"]["patch"]
    assert finished(rows, "apply_patch")[0]["status"] == "completed"
    assert done["changedPaths"] == ["README.md", "app.py", "docs/NOTES.md"]
    assert "+added by apply_patch" in patch and "# patched" in patch
    offered = [r["body"] for r in upstream.requests if r["body"].get("model") == "gpt-5-coder"]
    names = {t["function"]["name"] for t in offered[0]["tools"]}
    assert "apply_patch" in names and not names & {"edit", "write"}


PLAN_SCRIPT = "\n".join([
    "Plan a change; look around first.",
    "@bash echo plan-scratch > /tmp/plan-marker && git log --oneline | wc -l",
    "@bash echo changed >> app.py && rm README.md && mkdir -p new/deep && echo n > new/deep/f.txt"
    " && printf 'hidden.txt\\n' > .gitignore && echo h > hidden.txt && git init -q tools/scaffold",
    tool_call("edit", filePath="/workspace/test_app.py", oldString="add", newString="sub"),
    tool_call("task", description="explore", subagent_type="general",
              prompt="@write from-subagent.txt\nsub\n@end\n@say wrote it"),
    "@say The plan: swap nothing.",
])


def test_plan_runs_explore_freely_and_the_server_keeps_the_tree_unchanged(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        run = api.post(RUNS, json={"repository": "acme/web", "taskKind": "plan", "prompt": PLAN_SCRIPT}).json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"}, timeout_s=180)
        assert done["status"] == "idle", done["error"]
        assert done["summary"] == "The plan: swap nothing."
        assert done["changedPaths"] == [] and done["diffStats"] == {"filesChanged": 0, "additions": 0, "deletions": 0}
        assert api.get(f"{RUNS}/{run['id']}", params={"patch": "1"}).json()["run"]["patch"] is None
        rows = events_of(api, run["id"])
        bash = finished(rows, "bash")
        assert [r["status"] for r in bash] == ["completed", "completed"]  # the shell is not refused
        assert bash[0]["output"].strip() == "1"  # git log works
        assert finished(rows, "task")[0]["status"] == "completed"
        assert finished(rows, "write", child=True)[0]["status"] == "completed"  # the subagent wrote a file
        assert all(r["status"] != "completed" for r in rows if r.get("type") == "tool" and r["tool"] == "edit")
        warning = next(r for r in rows if r.get("type") == "warning")
        assert warning["code"] == "plan_changes_discarded"
        assert set(warning["paths"]) == {"app.py", "README.md", "new/", ".gitignore", "hidden.txt", "tools/",
                                         "from-subagent.txt"}

        # the sandbox's tree really is back; what lies outside it (scratch space) is not touched
        follow = api.post(f"{RUNS}/{run['id']}/messages", json={
            "prompt": "@bash git status --porcelain --untracked-files=all; git diff --stat; cat /tmp/plan-marker\n"
                      "@say checked"})
        assert follow.status_code == 202, follow.text
        again = wait_for(api, run["id"], {"idle", "failed"})
        assert again["status"] == "idle", again["error"]
        rows = events_of(api, run["id"])
        assert finished(rows, "bash")[-1]["output"].strip() == "plan-scratch"
        assert [r for r in rows if r.get("type") == "warning"] == [warning]  # nothing changed this time


def test_a_plan_turn_whose_changes_cannot_be_put_back_fails(server: Server, alice: str) -> None:
    prompt = "@bash mkdir locked && echo x > locked/f && chmod 555 locked\n@say done"
    with server.client(alice) as api:
        run = api.post(RUNS, json={"repository": "acme/web", "taskKind": "plan", "prompt": prompt}).json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"})
        assert done["status"] == "failed"
        assert done["error"]["code"] == "plan_changed_tree", done["error"]
        assert "could not" in done["error"]["message"]
