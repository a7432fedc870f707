"""Warm sessions and the run control plane, as persistent-sessions.txt describes them: the
same run id stays warm between turns; endSession, expiry, chained fallback, cancel, restart."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.helpers import Server, our_containers, wait_for, wait_lifecycle

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"


def container_ids(run_id: str) -> list[str]:
    res = subprocess.run(["docker", "ps", "-q", "--no-trunc", "--filter", f"label=critique.run={run_id}"],
                         capture_output=True, text=True, check=True)
    return res.stdout.split()


def bash_outputs(api, run_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    events = api.get(f"{RUNS}/{run_id}", params={"events": "1"}).json()["run"]["events"]
    return [e["data"]["output"] for e in events if e["data"].get("tool") == "bash" and "output" in e["data"]]


def test_follow_up_runs_on_the_same_sandbox_and_session(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        turn1 = "@write notes/untracked.txt\nfrom turn one\n@end\n@say wrote the note"
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": turn1}).json()["run"]
        first = wait_for(api, run["id"], {"idle", "failed"})
        assert first["status"] == "idle" and first["sessionActive"] is True and first["sessionExpiresAt"]
        box = container_ids(run["id"])
        assert len(box) == 1

        turn2 = "@bash cat notes/untracked.txt && echo more >> README.md\n@say appended"
        resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": turn2})
        assert resp.status_code == 202 and resp.json()["run"]["id"] == run["id"]
        assert resp.json()["run"]["status"] == "running" and resp.json()["run"]["turnCount"] == 2
        busy = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say again"})
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "turn_in_progress"

        second = wait_for(api, run["id"], {"idle", "failed"})
        assert second["status"] == "idle", second["error"]
        assert container_ids(run["id"]) == box  # no new container, no re-clone
        assert second["agentSessionId"] == first["agentSessionId"]
        assert "from turn one" in bash_outputs(api, run["id"])[-1]
        assert second["turnCount"] == 2
        assert second["summary"] == "appended"
        assert second["changedPaths"] == ["README.md", "notes/untracked.txt"]  # cumulative against the base
        assert second["diffStats"] == {"filesChanged": 2, "additions": 2, "deletions": 0}
        turns = second["turns"]
        assert [t["summary"] for t in turns] == ["wrote the note", "appended"]
        assert turns[0]["diffStats"] == {"filesChanged": 1, "additions": 1, "deletions": 0}
        assert turns[1]["diffStats"] == {"filesChanged": 1, "additions": 1, "deletions": 0}
        patch = api.get(f"{RUNS}/{run['id']}", params={"patch": "1"}).json()["run"]["patch"]
        assert "+from turn one" in patch and "+more" in patch
        # the agent saw its earlier conversation: the scripted model counts assistant turns per user message,
        # and OpenCode re-sends the whole history, so turn 2 ran its own script from step one

        # a turn that changes nothing keeps the patch as it was; one that puts the base back leaves none
        api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say nothing to change"})
        third = wait_for(api, run["id"], {"idle", "failed"})
        assert third["status"] == "idle", third["error"]
        assert third["turns"][2]["diffStats"] == {"filesChanged": 0, "additions": 0, "deletions": 0}
        assert third["diffStats"] == second["diffStats"] and third["changedPaths"] == second["changedPaths"]
        assert api.get(f"{RUNS}/{run['id']}", params={"patch": "1"}).json()["run"]["patch"] == patch
        api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@bash git checkout -- README.md && rm -r notes\n"
                                                                 "@say back to the base"})
        fourth = wait_for(api, run["id"], {"idle", "failed"})
        assert fourth["status"] == "idle", fourth["error"]
        assert fourth["turns"][3]["diffStats"] == {"filesChanged": 2, "additions": 0, "deletions": 2}
        assert fourth["changedPaths"] == [] and fourth["diffStats"]["filesChanged"] == 0
        assert not api.get(f"{RUNS}/{run['id']}", params={"patch": "1"}).json()["run"]["patch"]

        ended = api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True}).json()["run"]
        assert ended["status"] == "completed" and ended["terminal"] and not ended["sessionActive"]
        assert container_ids(run["id"]) == []
        late = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say too late"})
        assert late.status_code == 409 and late.json()["error"]["code"] == "run_terminal"
        again = api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})
        assert again.status_code == 409 and again.json()["error"]["code"] == "run_terminal"


@pytest.mark.parametrize("body", [{}, {"prompt": "x", "endSession": True}, {"prompt": "x", "fallback": "maybe"},
                                  {"prompt": "x", "extra": 1}, {"prompt": "x", "publish": {"mode": "draft_pr", "branch": "a..b"}},
                                  {"prompt": "x", "publish": {"mode": "none", "branch": "b"}}])
def test_bad_message_bodies_are_422(server: Server, alice: str, body: dict[str, object]) -> None:
    with server.client(alice) as api:
        run_id = api.get(RUNS, params={"limit": 1}).json()["data"][0]["id"]
        assert api.post(f"{RUNS}/{run_id}/messages", json=body).status_code == 422


def test_cancel_during_a_long_model_call(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@sleep 600\n@say never"}).json()["run"]
        wait_lifecycle(api, run["id"], "agent_running")
        time.sleep(1)
        t0 = time.monotonic()
        resp = api.post(f"{RUNS}/{run['id']}/cancel")
        elapsed = time.monotonic() - t0
        assert resp.status_code == 200, resp.text
        assert resp.json()["run"]["status"] == "cancelled" and resp.json()["run"]["terminal"]
        assert elapsed < 120  # it did not wait for the 600 s model call (nor for its sandbox to end by itself)
        assert our_containers(run["id"]) == []
        assert api.post(f"{RUNS}/{run['id']}/cancel").json()["run"]["status"] == "cancelled"  # idempotent


def test_cancel_queued_and_idle_runs(fresh_server: Server) -> None:
    fresh_server.extra_env["CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS"] = "1"
    fresh_server.start()
    key = fresh_server.new_key("erin")
    with fresh_server.client(key) as api:
        first = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say first"}).json()["run"]
        queued = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say second"}).json()["run"]
        got = api.post(f"{RUNS}/{queued['id']}/cancel").json()["run"]
        assert got["status"] == "cancelled" and got["nextActions"] == []
        idle = wait_for(api, first["id"], {"idle", "failed"})
        assert idle["status"] == "idle"
        assert api.post(f"{RUNS}/{first['id']}/cancel").json()["run"]["status"] == "cancelled"
        assert our_containers(first["id"]) == [] and our_containers(queued["id"]) == []
        time.sleep(1)
        assert api.get(f"{RUNS}/{queued['id']}").json()["run"]["status"] == "cancelled"  # never started
        done = api.post(RUNS, json={"repository": "acme/web", "prompt": "@fail nope"}).json()["run"]
        wait_for(api, done["id"], {"failed"})
        resp = api.post(f"{RUNS}/{done['id']}/cancel")
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "run_terminal"


def test_expiry_completes_the_run_and_a_later_message_chains(fresh_server: Server) -> None:
    fresh_server.extra_env["CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S"] = "2"
    fresh_server.start()
    key = fresh_server.new_key("frank")
    with fresh_server.client(key) as api:
        run = api.post(RUNS, json={"repository": "acme/web",
                                   "prompt": "@write a.txt\nA\n@end\n@say wrote a.txt"}).json()["run"]
        # a 2 s session can end before a poll on a loaded machine sees it idle
        assert wait_for(api, run["id"], {"idle", "failed", "completed"})["status"] != "failed"
        expired = wait_for(api, run["id"], {"completed"}, timeout_s=120)
        assert our_containers(run["id"]) == []
        assert expired["canFollowUp"] is True and expired["nextActions"] == ["send_message", "get_patch"]

        refused = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say x", "fallback": "none"})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "session_expired"

        resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@bash ls\n@say continued",
                                                                  "fallback": "chain"})
        assert resp.status_code == 202
        chained = resp.json()["run"]
        assert chained["id"] != run["id"] and chained["chainedFromRunId"] == run["id"]
        old = api.get(f"{RUNS}/{run['id']}").json()["run"]
        assert old["chainedToRunId"] == chained["id"] and old["canFollowUp"] is False
        done = wait_for(api, chained["id"], {"idle", "failed"})
        assert done["status"] == "idle" and done["summary"] == "continued"
        assert done["repository"] == old["repository"] and done["modelId"] == old["modelId"]
        assert len(our_containers(chained["id"])) == 1  # a new container
        again = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say x"})
        assert again.status_code == 409


def test_restart_keeps_idle_sessions_and_fails_running_ones(fresh_server: Server) -> None:
    fresh_server.extra_env["CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S"] = "600"
    fresh_server.start()
    key = fresh_server.new_key("gina")
    with fresh_server.client(key) as api:
        idle = api.post(RUNS, json={"repository": "acme/web",
                                    "prompt": "@write kept.txt\nkept\n@end\n@say ok"}).json()["run"]
        wait_for(api, idle["id"], {"idle"})
        busy = api.post(RUNS, json={"repository": "acme/web", "prompt": "@sleep 60\n@say late"}).json()["run"]
        wait_lifecycle(api, busy["id"], "agent_running")
        box = container_ids(idle["id"])
    fresh_server.kill()
    fresh_server.start()
    with fresh_server.client(key) as api:
        assert api.get(f"{RUNS}/{busy['id']}").json()["run"]["error"]["code"] == "server_restarted"
        assert our_containers(busy["id"]) == []
        assert api.get(f"{RUNS}/{idle['id']}").json()["run"]["status"] == "idle"
        resp = api.post(f"{RUNS}/{idle['id']}/messages", json={"prompt": "@bash cat kept.txt\n@say still here"})
        assert resp.status_code == 202 and resp.json()["run"]["id"] == idle["id"]
        done = wait_for(api, idle["id"], {"idle", "failed"})
        assert done["status"] == "idle" and done["summary"] == "still here" and done["turnCount"] == 2
        assert container_ids(idle["id"]) == box
        assert "kept" in bash_outputs(api, idle["id"])[-1]


def test_a_dead_sandbox_chains_on_the_next_message(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say first"}).json()["run"]
        wait_for(api, run["id"], {"idle"})
        subprocess.run(["docker", "rm", "-f", *container_ids(run["id"])], check=True, capture_output=True)
        resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say second", "fallback": "chain"})
        assert resp.status_code == 202
        chained = resp.json()["run"]
        assert chained["chainedFromRunId"] == run["id"]
        old = api.get(f"{RUNS}/{run['id']}").json()["run"]
        assert old["status"] == "completed" and old["chainedToRunId"] == chained["id"]
        assert wait_for(api, chained["id"], {"idle", "failed"})["summary"] == "second"
