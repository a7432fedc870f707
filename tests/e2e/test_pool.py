"""The warm pool and the mirror cache: runs take pre-started sandboxes with OpenCode already
healthy (empty, or already holding the repository's default branch), the pool refills, and a
restart never keeps pooled sandboxes whose secrets were only in memory."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest

from tests.helpers import Server, git, wait_for

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"


def wait_warm(server: Server, count: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{server.url}/healthz").json()["warmSandboxes"] < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the pool never reached {count} warm sandboxes")
        time.sleep(0.2)


def sandbox_event(api: httpx.Client, run_id: str) -> dict[str, object]:
    events = api.get(f"{RUNS}/{run_id}", params={"events": "1"}).json()["run"]["events"]
    found = next(e["data"] for e in events if e["data"].get("type") == "sandbox.ready")
    assert all(isinstance(found[k], int) for k in ("checkoutMs", "sandboxMs", "uploadMs"))
    return {k: v for k, v in found.items() if not k.endswith("Ms")}


def names_of_ours(server: Server) -> list[str]:
    instance = (server.data_dir / "instance_id").read_text().strip()
    out = subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}", "--filter",
                          f"label=critique.instance={instance}"], capture_output=True, text=True, check=True)
    return sorted(out.stdout.split())


def test_runs_take_warm_sandboxes_and_the_pool_refills(fresh_server: Server) -> None:
    fresh_server.extra_env.update({"CRITIQUE_LOCAL_POOL_SIZE": "1",
                                   "CRITIQUE_LOCAL_POOL_REPOSITORIES": '{"acme/web": 1}'})
    fresh_server.start()
    wait_warm(fresh_server, 2)
    api = fresh_server.client(fresh_server.new_key("hasty"))

    # on the default branch: the sandbox already holds the checkout, nothing is uploaded
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@write a.txt\nA\n@end\n@say a"}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["status"] == "idle", done["error"]
    assert sandbox_event(api, run["id"]) == {"type": "sandbox.ready", "warm": True, "preloaded": True}
    assert done["changedPaths"] == ["a.txt"] and done["baseRef"] == "main"
    assert f"critique-{run['id']}" in names_of_ours(fresh_server)  # renamed to its run
    # the pool's warm-up turn happened in a session of its own: the run's session holds only the run
    exported = subprocess.run(["docker", "exec", "-w", "/workspace", f"critique-{run['id']}", "opencode", "export",
                               done["agentSessionId"]], capture_output=True, text=True, timeout=120)
    session = json.loads(exported.stdout[exported.stdout.index("{"):])
    users = [p.get("text", "") for m in session["messages"] if m["info"]["role"] == "user" for p in m["parts"]
             if p.get("type") == "text"]
    assert users == ["@write a.txt\nA\n@end\n@say a"], users
    assert done["agentReadyAt"] <= done["firstModelCallAt"]

    # another ref: an empty warm sandbox, with the checkout uploaded
    make_feature = fresh_server.repos / ".work" / "acme" / "web"
    git("checkout", "-q", "-b", "feature", cwd=make_feature)
    (make_feature / "F.md").write_text("feature\n")
    git("add", "-A", cwd=make_feature)
    git("commit", "-qm", "feature", cwd=make_feature)
    git("push", "-q", str(fresh_server.repos / "acme" / "web.git"), "feature", cwd=make_feature)
    other = api.post(RUNS, json={"repository": "acme/web", "baseRef": "feature",
                                 "prompt": "@bash cat F.md\n@say read"}).json()["run"]
    second = wait_for(api, other["id"], {"idle", "failed"})
    assert second["status"] == "idle", second["error"]
    assert sandbox_event(api, other["id"]) == {"type": "sandbox.ready", "warm": True, "preloaded": False}
    assert second["changedPaths"] == [] and second["baseRef"] == "feature"

    # a run the pool cannot serve (another network mode) starts cold
    cold = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say cold",
                                "safety": {"network": {"mode": "restricted", "allowlist": ["pypi.org"]}}}).json()["run"]
    wait_for(api, cold["id"], {"idle", "failed"})
    assert sandbox_event(api, cold["id"])["warm"] is False

    wait_warm(fresh_server, 2)  # refilled: one empty, one holding acme/web main
    for run_id in (run["id"], other["id"], cold["id"]):
        api.post(f"{RUNS}/{run_id}/messages", json={"endSession": True})

    # a new commit on main: the preloaded sandbox is replaced by one holding the new head
    git("checkout", "-q", "main", cwd=make_feature)
    (make_feature / "NEW.md").write_text("new\n")
    git("add", "-A", cwd=make_feature)
    git("commit", "-qm", "new", cwd=make_feature)
    git("push", "-q", str(fresh_server.repos / "acme" / "web.git"), "main", cwd=make_feature)
    fresh = api.post(RUNS, json={"repository": "acme/web", "prompt": "@bash cat NEW.md\n@say new"}).json()["run"]
    third = wait_for(api, fresh["id"], {"idle", "failed"})
    assert third["status"] == "idle" and third["baseCommit"] == git("rev-parse", "HEAD", cwd=make_feature)
    api.post(f"{RUNS}/{fresh['id']}/messages", json={"endSession": True})


def test_pooled_sandboxes_do_not_survive_a_crash_but_idle_runs_do(fresh_server: Server) -> None:
    fresh_server.extra_env["CRITIQUE_LOCAL_POOL_SIZE"] = "2"
    fresh_server.start()
    wait_warm(fresh_server, 2)
    api = fresh_server.client(fresh_server.new_key("crashy"))
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say warm"}).json()["run"]
    assert wait_for(api, run["id"], {"idle", "failed"})["status"] == "idle"
    wait_warm(fresh_server, 2)
    fresh_server.kill()
    fresh_server.extra_env["CRITIQUE_LOCAL_POOL_SIZE"] = "0"
    fresh_server.start()
    assert names_of_ours(fresh_server) == [f"critique-{run['id']}"]  # only the idle run's sandbox is left
    resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say still here"})
    assert resp.status_code == 202
    again = wait_for(api, run["id"], {"idle", "failed"})
    assert again["status"] == "idle" and again["turnCount"] == 2 and again["summary"] == "still here"
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})


def test_stopped_sandboxes_are_swept_whether_pooled_waiting_or_taken(fresh_server: Server) -> None:
    fresh_server.extra_env.update({"CRITIQUE_LOCAL_POOL_SIZE": "1", "CRITIQUE_LOCAL_SANDBOX_SWEEP_INTERVAL_S": "1",
                                   "CRITIQUE_LOCAL_SANDBOX_REAP_INTERVAL_S": "0.5"})
    fresh_server.start()
    wait_warm(fresh_server, 1)
    api = fresh_server.client(fresh_server.new_key("sweep"))
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say warm"}).json()["run"]
    idle = wait_for(api, run["id"], {"idle", "failed"})
    assert idle["status"] == "idle" and sandbox_event(api, run["id"])["warm"] is True
    wait_warm(fresh_server, 1)
    taken = f"critique-{run['id']}"
    waiting = next(n for n in names_of_ours(fresh_server) if n != taken)
    subprocess.run(["docker", "stop", "-t", "0", taken, waiting], check=True, capture_output=True)

    deadline = time.monotonic() + 60  # the idle run's session ends; both stopped containers go
    while {taken, waiting} & set(names_of_ours(fresh_server)):
        assert time.monotonic() < deadline, names_of_ours(fresh_server)
        time.sleep(0.5)
    ended = api.get(f"{RUNS}/{run['id']}").json()["run"]
    assert ended["sessionActive"] is False and ended["status"] == "completed"
    wait_warm(fresh_server, 1)  # the pool replaced its stopped sandbox
    assert len(names_of_ours(fresh_server)) == 1 and waiting not in names_of_ours(fresh_server)
    resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say chained", "fallback": "chain"})
    assert resp.status_code == 202 and resp.json()["run"]["chainedFromRunId"] == run["id"]
    chained = wait_for(api, resp.json()["run"]["id"], {"idle", "failed"})
    assert chained["status"] == "idle" and chained["summary"] == "chained"
    api.post(f"{RUNS}/{chained['id']}/messages", json={"endSession": True})
