"""The E2B backend, end to end: the real server and the real OpenCode, with the ``e2b`` SDK
replaced at its boundary by a stand-in that follows E2B's documented behaviour (each sandbox a
local container on a network the stand-in creates). A live test against E2B's cloud runs only
when E2B_API_KEY is set."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SAMPLE_FILES
from tests.e2b_standin import LABEL, network_gateway
from tests.helpers import Server, free_port, make_repo, wait_for

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"


def calls(server: Server) -> list[dict[str, Any]]:
    log = server.base / "e2b-calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def live_boxes() -> list[str]:
    out = subprocess.run(["docker", "ps", "-q", "--no-trunc", "--filter", f"label={LABEL}"], capture_output=True,
                         text=True, check=True)
    return out.stdout.split()


@pytest.fixture
def e2b_server(tmp_path: Path) -> Iterator[Server]:
    gateway = network_gateway()
    srv = Server(tmp_path, module="tests.e2b_serve")
    srv.port = free_port()
    srv.extra_env.update({
        "CRITIQUE_LOCAL_SANDBOX_BACKEND": "e2b", "E2B_API_KEY": "e2b_standin_key",
        "CRITIQUE_LOCAL_SERVER_HOST": "0.0.0.0",  # the stand-in's sandboxes reach us at their network's gateway
        "CRITIQUE_LOCAL_E2B_GATEWAY_URL": f"http://{gateway}:{srv.port}/api/v1",
        "E2B_STANDIN_LOG": str(tmp_path / "e2b-calls.jsonl"),
        "CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S": "60", "CRITIQUE_LOCAL_SANDBOX_REAP_INTERVAL_S": "0.5",
    })
    make_repo(srv.repos, "acme/web", SAMPLE_FILES)
    yield srv
    srv.stop()
    for sid in {c["sandbox_id"] for c in calls(srv) if c.get("sandbox_id")}:
        subprocess.run(["docker", "rm", "-f", sid], capture_output=True)


def test_runs_follow_ups_and_end_session_on_e2b(e2b_server: Server) -> None:
    e2b_server.start()
    api = e2b_server.client(e2b_server.new_key("cloud"))
    prompt = "@write hello.py\nprint('hi')\n@end\n@bash python3 hello.py\n@say wrote hello.py"
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": prompt, "publish": {"mode": "draft_pr"}}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["status"] == "idle", done["error"]
    assert done["changedPaths"] == ["hello.py"] and done["summary"] == "wrote hello.py"
    assert done["draftPullRequest"]["host"] == "local"  # the changes came out through files.read

    made = [c for c in calls(e2b_server) if c["call"] == "create"]
    assert len(made) == 1
    create = made[0]
    assert create["template"] == "critique-local-opencode" and create["secure"] is True
    assert create["metadata"]["critique.run"] == run["id"] and create["metadata"]["critique.user"]
    gateway_host = e2b_server.extra_env["CRITIQUE_LOCAL_E2B_GATEWAY_URL"].split("//")[1].split(":")[0]
    assert create["network"]["allow_out"] == [gateway_host] and create["network"]["deny_out"] == ["0.0.0.0/0"]
    assert create["allow_internet_access"] is False
    spawned = [c for c in calls(e2b_server) if c["call"] == "commands.run" and c["background"]]
    assert spawned and all(c["timeout"] == 0 for c in spawned)  # else E2B kills opencode after 60 s
    assert any(c["call"] == "files.write" for c in calls(e2b_server))  # the checkout went in as a file
    idle_timeouts = [c["timeout"] for c in calls(e2b_server) if c["call"] == "set_timeout"]
    assert idle_timeouts and 60 <= idle_timeouts[-1] <= 200  # the warm session's lifetime

    box = create_id = next(c["sandbox_id"] for c in calls(e2b_server) if c["call"] == "files.write")
    resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@bash cat hello.py\n@say again"})
    assert resp.status_code == 202
    second = wait_for(api, run["id"], {"idle", "failed"})
    assert second["status"] == "idle" and second["turnCount"] == 2
    assert len([c for c in calls(e2b_server) if c["call"] == "create"]) == 1  # same sandbox
    assert box in live_boxes()

    # a restart reconnects to the live sandbox by its persisted id
    e2b_server.kill()
    e2b_server.start()
    assert any(c["call"] == "connect" and c["sandbox_id"] == create_id for c in calls(e2b_server))
    resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say after restart"})
    assert resp.status_code == 202
    third = wait_for(api, run["id"], {"idle", "failed"})
    assert third["status"] == "idle" and third["summary"] == "after restart"

    ended = api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True}).json()["run"]
    assert ended["status"] == "completed"
    assert any(c["call"] == "kill" and c["sandbox_id"] == box for c in calls(e2b_server))
    assert box not in live_boxes()


def test_restricted_networking_is_refused_on_e2b_rather_than_weakened(e2b_server: Server) -> None:
    e2b_server.start()
    api = e2b_server.client(e2b_server.new_key("strict"))
    resp = api.post(RUNS, json={"repository": "acme/web", "prompt": "x",
                                "safety": {"network": {"mode": "restricted", "allowlist": ["pypi.org"]}}})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "network_mode_not_supported"
    assert [c for c in calls(e2b_server) if c["call"] == "create"] == []


def test_an_expired_e2b_sandbox_chains_the_next_message(e2b_server: Server) -> None:
    e2b_server.start()
    api = e2b_server.client(e2b_server.new_key("expiry"))
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say first"}).json()["run"]
    assert wait_for(api, run["id"], {"idle", "failed"})["status"] == "idle"
    box = next(c["sandbox_id"] for c in calls(e2b_server) if c["call"] == "files.write")
    subprocess.run(["docker", "rm", "-f", box], capture_output=True, check=True)  # E2B ended it (timeout)
    resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say second", "fallback": "chain"})
    assert resp.status_code == 202 and resp.json()["run"]["chainedFromRunId"] == run["id"]
    chained = wait_for(api, resp.json()["run"]["id"], {"idle", "failed"})
    assert chained["status"] == "idle" and chained["summary"] == "second"
    api.post(f"{RUNS}/{chained['id']}/messages", json={"endSession": True})


@pytest.mark.skipif(not os.environ.get("E2B_API_KEY") or not os.environ.get("CRITIQUE_LOCAL_E2B_LIVE_GATEWAY_URL"),
                    reason="live E2B test: set E2B_API_KEY and CRITIQUE_LOCAL_E2B_LIVE_GATEWAY_URL (this server's "
                           "public /api/v1 URL) to run it against E2B's cloud")
def test_live_e2b_run(tmp_path: Path) -> None:  # pragma: no cover - needs E2B's cloud
    srv = Server(tmp_path, extra_env={"CRITIQUE_LOCAL_SANDBOX_BACKEND": "e2b", "CRITIQUE_LOCAL_SERVER_HOST": "0.0.0.0",
                                      "CRITIQUE_LOCAL_E2B_GATEWAY_URL": os.environ["CRITIQUE_LOCAL_E2B_LIVE_GATEWAY_URL"]})
    make_repo(srv.repos, "acme/web", SAMPLE_FILES)
    srv.start()
    try:
        api = srv.client(srv.new_key("live"))
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@write live.txt\nlive\n@end\n@say ok"}).json()
        done = wait_for(api, run["run"]["id"], {"idle", "failed"}, timeout_s=300)
        assert done["status"] == "idle" and done["changedPaths"] == ["live.txt"]
        api.post(f"{RUNS}/{done['id']}/messages", json={"endSession": True})
    finally:
        srv.stop()


def test_an_e2b_sandbox_ending_mid_turn_fails_the_run_clearly(e2b_server: Server) -> None:
    e2b_server.start()
    api = e2b_server.client(e2b_server.new_key("gone"))
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@sleep 600\n@say late"}).json()["run"]
    deadline = time.monotonic() + 300
    while api.get(f"{RUNS}/{run['id']}").json()["run"]["lifecycle"] != "agent_running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    box = next(c["sandbox_id"] for c in calls(e2b_server) if c["call"] == "files.write")
    while not any(c["call"] == "get_info" and c["sandbox_id"] == box for c in calls(e2b_server)):
        assert time.monotonic() < deadline, "the watchdog never looked at the sandbox"
        time.sleep(0.2)
    subprocess.run(["docker", "rm", "-f", box], capture_output=True, check=True)  # E2B ended it
    failed = wait_for(api, run["id"], {"idle", "failed"})
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "sandbox_gone", failed["error"]


def test_pause_resume_and_restore_on_e2b(e2b_server: Server) -> None:
    """An idle session pauses with E2B's own pause, resumes when the next message connects, and a
    sandbox E2B lost is restored on the same run id."""
    e2b_server.extra_env["CRITIQUE_LOCAL_SANDBOX_PAUSE_AFTER_S"] = "1"
    e2b_server.start()
    api = e2b_server.client(e2b_server.new_key("pauser"))
    run = api.post(RUNS, json={"repository": "acme/web",
                               "prompt": "@write a.txt\nfrom turn one\n@end\n@say one"}).json()["run"]
    assert wait_for(api, run["id"], {"idle", "failed"})["status"] == "idle"
    box = next(c["sandbox_id"] for c in calls(e2b_server) if c["call"] == "files.write")
    deadline = time.monotonic() + 60
    while not (api.get(f"{RUNS}/{run['id']}").json()["run"]["pausedAt"]
               and any(c["call"] == "pause" and c["sandbox_id"] == box for c in calls(e2b_server))):
        assert time.monotonic() < deadline, "the idle session was not paused"
        time.sleep(0.3)
    resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@bash cat a.txt\n@history"})
    assert resp.status_code == 202 and resp.json()["run"]["id"] == run["id"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["status"] == "idle", done["error"]
    assert done["summary"].startswith("history: 2 user messages,")
    assert any(c["call"] == "resume" and c["sandbox_id"] == box for c in calls(e2b_server))
    events = [e["data"] for e in api.get(f"{RUNS}/{run['id']}", params={"events": "1"}).json()["run"]["events"]]
    assert any(e.get("type") == "session.resumed" for e in events)
    subprocess.run(["docker", "rm", "-f", box], capture_output=True, check=True)  # E2B lost it
    resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@bash cat a.txt\n@history"})
    assert resp.status_code == 202 and resp.json()["run"]["id"] == run["id"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["status"] == "idle", done["error"]
    assert done["summary"].startswith("history: 3 user messages,")
    events = [e["data"] for e in api.get(f"{RUNS}/{run['id']}", params={"events": "1"}).json()["run"]["events"]]
    assert any(e.get("type") == "session.restored" for e in events)
    outputs = [e["output"] for e in events if e.get("tool") == "bash" and "output" in e]
    assert "from turn one" in outputs[-1]
    assert sum(1 for c in calls(e2b_server) if c["call"] == "create") == 2  # the first, and the restored one
