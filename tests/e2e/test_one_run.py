"""One run, end to end, as a client following the reference docs sees it: real opencode in a
real Docker container, driven by the scripted model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import Server, git, our_containers, sse_events, wait_for, wait_lifecycle

pytestmark = pytest.mark.e2e

RUNS = "/api/v1/coding-agent/runs"
SCRIPT = """Add a greeting module and check it.
@write greeting.py
def greet(name):
    return f"Hello, {name}!"
@end
@bash python3 -c "from greeting import greet; print(greet('Ada'))" && whoami && sed -i 's/3/4/' test_app.py
@say Added greeting.py and checked it prints a greeting.
"""


def test_run_with_write_bash_say_completes_with_patch(server: Server, alice: str, tmp_path: Path) -> None:
    with server.client(alice) as api:
        created = api.post(RUNS, json={"repository": "acme/web", "prompt": SCRIPT, "title": "Greeting",
                                       "tags": [" CI ", "ci", "Owner:Platform"], "metadata": {"ticket": "PAY-1"}})
        assert created.status_code == 201, created.text
        run = created.json()["run"]
        assert run["status"] == "queued" and run["lifecycle"] == "queued"
        assert run["tags"] == ["ci", "owner:platform"]
        assert run["intent"] == "feature"
        assert run["statusUrl"].endswith(f"{RUNS}/{run['id']}")

        done = wait_for(api, run["id"], {"idle", "failed"})
        assert done["status"] == "idle", done["error"]
        assert done["terminal"] is False and done["lifecycle"] == "awaiting_follow_up"
        assert done["sessionActive"] is True and done["awaitingFollowUp"] is True
        assert set(done["nextActions"]) == {"send_message", "end_session", "cancel", "get_patch"}
        assert done["summary"] == "Added greeting.py and checked it prints a greeting."
        assert done["changedPaths"] == ["greeting.py", "test_app.py"]
        assert done["diffStats"] == {"filesChanged": 2, "additions": 3, "deletions": 1}
        assert done["turnCount"] == 1 and done["turns"][0]["summary"] == done["summary"]
        assert done["agentReadyAt"] is not None
        # the gateway saw the turn's first model call after the agent was ready, before the turn ended
        assert done["agentReadyAt"] <= done["firstModelCallAt"] <= done["turns"][0]["finishedAt"]
        assert done["turns"][0]["firstModelCallAt"] == done["firstModelCallAt"]
        assert "patch" not in done or done["patch"] is None

        full = api.get(f"{RUNS}/{run['id']}", params={"patch": "1", "events": "1"}).json()["run"]
        tools = [(e["data"]["tool"], e["data"]["status"]) for e in full["events"] if e["data"].get("type") == "tool"]
        assert ("write", "completed") in tools and ("bash", "completed") in tools
        bash_out = next(e["data"]["output"] for e in full["events"]
                        if e["data"].get("tool") == "bash" and e["data"]["status"] == "completed")
        assert "Hello, Ada!" in bash_out and "agent" in bash_out  # ran as the non-root sandbox user

        ended = api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})
        assert ended.status_code == 200
        assert ended.json()["run"]["status"] == "completed" and ended.json()["run"]["nextActions"] == ["get_patch"]

    # the patch applies with `git apply` to a fresh clone of the base
    clone = tmp_path / "clone"
    git("clone", "-q", str(server.repos / "acme/web.git"), str(clone))
    (tmp_path / "run.patch").write_text(full["patch"])
    git("apply", "--index", str(tmp_path / "run.patch"), cwd=clone)
    assert "Hello" in (clone / "greeting.py").read_text()
    assert "add(1, 2) == 4" in (clone / "test_app.py").read_text()
    assert our_containers(run["id"]) == []


def test_stream_shows_tool_events_then_status_and_resumes_without_gaps(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@bash echo streamed\n@say ok"}).json()["run"]
        live = sse_events(api, run["id"])  # follows the live run until it ends
        ids = [i for i, _, _ in live]
        assert ids == list(range(1, len(ids) + 1))
        kinds = [(ev, d.get("type") or d.get("status")) for _, ev, d in live]
        first_tool = kinds.index(("builder.event", "tool"))
        assert any(k == ("run.status", "running") for k in kinds[:first_tool])
        assert kinds[-1] == ("run.status", "idle")  # the stream closes once the turn is over
        assert live[-1][2]["awaitingFollowUp"] is True

        middle = ids[len(ids) // 2]
        after = sse_events(api, run["id"], params={"after": str(middle)})
        assert [i for i, _, _ in after] == ids[middle:]
        resumed = sse_events(api, run["id"], headers={"Last-Event-ID": str(middle)})
        assert [(i, e, d) for i, e, d in resumed] == live[middle:]


def test_checkout_at_a_branch(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        run = api.post(RUNS, json={"repository": "acme/web", "gitCheckoutRef": "feature",
                                   "prompt": "@bash cat FEATURE.md && git branch --show-current\n@say read"}).json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"})
        assert done["status"] == "idle", done["error"]
        assert done["baseRef"] == "feature" and done["changedPaths"] == []
        events = api.get(f"{RUNS}/{run['id']}", params={"events": "1"}).json()["run"]["events"]
        out = next(e["data"]["output"] for e in events if e["data"].get("tool") == "bash" and "output" in e["data"])
        assert "on feature" in out and "feature" in out.splitlines()[-1]


def test_plan_run_leaves_the_tree_unchanged(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        prompt = "Plan how to add logging.\n@write plan-was-here.txt\nnope\n@end\n@bash touch via-bash.txt\n@say The plan."
        run = api.post(RUNS, json={"repository": "acme/web", "taskKind": "plan", "prompt": prompt}).json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"})
        assert done["status"] == "idle", done["error"]
        assert done["taskKind"] == "plan"
        assert done["changedPaths"] == [] and done["diffStats"] == {"filesChanged": 0, "additions": 0, "deletions": 0}
        assert api.get(f"{RUNS}/{run['id']}", params={"patch": "1"}).json()["run"]["patch"] is None
        assert set(done["nextActions"]) == {"send_message", "end_session", "cancel"}


def test_model_failure_fails_the_run_with_a_clear_code(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@fail upstream exploded"}).json()["run"]
        done = wait_for(api, run["id"], {"completed", "failed"})
        assert done["status"] == "failed" and done["lifecycle"] == "failed"
        assert done["error"]["code"] == "model_error"
        assert "upstream exploded" in done["error"]["message"]
        assert our_containers(run["id"]) == []


def test_default_prompt_makes_a_small_edit(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": "Improve the docs"}).json()["run"]
        assert run["intent"] == "docs"
        done = wait_for(api, run["id"], {"idle", "failed"})
        assert done["status"] == "idle", done["error"]
        assert done["changedPaths"] == ["CRITIQUE_SCRIPTED.md"]


def test_server_killed_during_a_run_does_not_leave_it_running(fresh_server: Server) -> None:
    fresh_server.start()
    key = fresh_server.new_key("carol")
    with fresh_server.client(key) as api:
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@sleep 60\n@say late"}).json()["run"]
        wait_lifecycle(api, run["id"], "agent_running")
        assert len(our_containers(run["id"])) == 1
    fresh_server.kill()
    fresh_server.start()
    with fresh_server.client(key) as api:
        after = api.get(f"{RUNS}/{run['id']}").json()["run"]
        assert after["status"] == "failed"
        assert after["error"]["code"] == "server_restarted"
        # the acknowledged run is still listed, and its container was reconciled away
        assert [r["id"] for r in api.get(RUNS).json()["data"]] == [run["id"]]
    assert our_containers(run["id"]) == []


def test_queued_runs_survive_a_crash(fresh_server: Server) -> None:
    fresh_server.extra_env["CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS"] = "1"
    fresh_server.start()
    key = fresh_server.new_key("dave")
    with fresh_server.client(key) as api:
        blocker = api.post(RUNS, json={"repository": "acme/web", "prompt": "@sleep 60\n@say late"}).json()["run"]
        waiting = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say queued one"}).json()["run"]
        time.sleep(1)
        assert api.get(f"{RUNS}/{waiting['id']}").json()["run"]["status"] == "queued"
    fresh_server.kill()
    fresh_server.start()
    with fresh_server.client(key) as api:
        assert api.get(f"{RUNS}/{blocker['id']}").json()["run"]["error"]["code"] == "server_restarted"
        done = wait_for(api, waiting["id"], {"idle", "failed"})
        assert done["status"] == "idle" and done["summary"] == "queued one"


def test_cli_watch_prints_a_readable_log(server: Server, alice: str) -> None:
    res = server.cli("runs", "create", "--url", server.url, "--key", alice, "--repo", "acme/web",
                     "--prompt", "@bash echo from-cli\n@say cli done", "--watch")
    assert "tool bash completed" in res.stdout
    assert "says: cli done" in res.stdout
    assert res.stdout.rstrip().splitlines()[-1].startswith("== idle [awaiting_follow_up]")
    run_id = res.stdout.split()[0]
    listed = server.cli("runs", "list", "--url", server.url, "--key", alice).stdout
    assert run_id in listed
    sent = server.cli("runs", "send", run_id, "--url", server.url, "--key", alice, "--prompt", "@say more", "--watch")
    assert "says: more" in sent.stdout
    ended = server.cli("runs", "end", run_id, "--url", server.url, "--key", alice)
    assert "completed  [finished]  turns=2" in ended.stdout
    refused = server.cli("runs", "cancel", run_id, "--url", server.url, "--key", alice, check=False)
    assert refused.returncode != 0 and "409 run_terminal" in refused.stderr
