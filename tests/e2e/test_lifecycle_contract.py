"""Property-style walk over every status: the lifecycle fields agree with what the API then
accepts. For each state, every action in ``nextActions`` is accepted and every other one is
refused without changing anything."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.helpers import Server, wait_for, wait_lifecycle

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"
MUTATING = ("send_message", "end_session", "cancel")


def attempt(api: httpx.Client, run_id: str, action: str) -> httpx.Response:
    if action == "send_message":
        return api.post(f"{RUNS}/{run_id}/messages", json={"prompt": "@say again", "fallback": "chain"})
    if action == "end_session":
        return api.post(f"{RUNS}/{run_id}/messages", json={"endSession": True})
    return api.post(f"{RUNS}/{run_id}/cancel")


def check_state(api: httpx.Client, run_id: str, expect_status: str) -> dict[str, Any]:
    """Refused actions are refused with 409 and change nothing; get_patch agrees with the patch."""
    run = api.get(f"{RUNS}/{run_id}").json()["run"]
    assert run["status"] == expect_status
    allowed = set(run["nextActions"])
    assert run["terminal"] == (expect_status in ("completed", "failed", "cancelled"))
    assert run["awaitingFollowUp"] == (expect_status == "idle") == run["sessionActive"]
    assert run["canFollowUp"] == ("send_message" in allowed)
    for action in MUTATING:
        if action in allowed or (action == "cancel" and expect_status == "cancelled"):
            continue  # accepted ones are exercised by the caller; cancel on cancelled is an idempotent no-op
        resp = attempt(api, run_id, action)
        assert resp.status_code == 409, (expect_status, action, resp.text)
        after = api.get(f"{RUNS}/{run_id}").json()["run"]
        assert (after["status"], after["turnCount"]) == (run["status"], run["turnCount"])
    patch = api.get(f"{RUNS}/{run_id}", params={"patch": "1"}).json()["run"]["patch"]
    assert ("get_patch" in allowed) == (patch is not None)
    return dict(run)


def test_every_status_agrees_with_what_the_api_accepts(fresh_server: Server) -> None:
    fresh_server.extra_env.update({"CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS": "1",
                                   "CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S": "30"})
    fresh_server.start()
    api = fresh_server.client(fresh_server.new_key("prop"))
    edit = "@write f.txt\nx\n@end\n@say edited"

    # running and queued: only cancel
    running = api.post(RUNS, json={"repository": "acme/web", "prompt": "@sleep 60\n@say late"}).json()["run"]["id"]
    queued = api.post(RUNS, json={"repository": "acme/web", "prompt": edit}).json()["run"]["id"]
    wait_lifecycle(api, running, "agent_running")
    assert set(check_state(api, running, "running")["nextActions"]) == {"cancel"}
    assert set(check_state(api, queued, "queued")["nextActions"]) == {"cancel"}
    assert attempt(api, queued, "cancel").status_code == 200
    assert attempt(api, running, "cancel").status_code == 200
    for run_id in (running, queued):
        assert check_state(api, run_id, "cancelled")["nextActions"] == []

    # idle: send_message, end_session, cancel (and get_patch once there is a patch)
    a = api.post(RUNS, json={"repository": "acme/web", "prompt": edit}).json()["run"]["id"]
    wait_for(api, a, {"idle"})
    assert set(check_state(api, a, "idle")["nextActions"]) == {"send_message", "end_session", "cancel", "get_patch"}
    assert attempt(api, a, "send_message").status_code == 202
    wait_for(api, a, {"idle"})
    assert attempt(api, a, "end_session").status_code == 200
    assert check_state(api, a, "completed")["nextActions"] == ["get_patch"]

    b = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say nothing changed"}).json()["run"]["id"]
    wait_for(api, b, {"idle"})
    assert set(check_state(api, b, "idle")["nextActions"]) == {"send_message", "end_session", "cancel"}
    assert attempt(api, b, "cancel").status_code == 200
    check_state(api, b, "cancelled")

    # failed: nothing
    c = api.post(RUNS, json={"repository": "acme/web", "prompt": "@fail broken"}).json()["run"]["id"]
    wait_for(api, c, {"failed"})
    assert check_state(api, c, "failed")["nextActions"] == []

    # expired: a message chains
    d = api.post(RUNS, json={"repository": "acme/web", "prompt": edit}).json()["run"]["id"]
    wait_for(api, d, {"idle"})
    wait_for(api, d, {"completed"}, timeout_s=120)
    assert set(check_state(api, d, "completed")["nextActions"]) == {"send_message", "get_patch"}
    resp = attempt(api, d, "send_message")
    assert resp.status_code == 202 and resp.json()["run"]["chainedFromRunId"] == d
    assert check_state(api, d, "completed")["nextActions"] == ["get_patch"]
    api.close()
