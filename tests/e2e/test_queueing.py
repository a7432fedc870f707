"""Queueing: runs beyond max_concurrent_runs wait queued and start in order; one user cannot
take more than max_concurrent_runs_per_user slots while others wait."""

from __future__ import annotations

import time

import pytest

from tests.helpers import Server, wait_for

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"


def test_global_and_per_user_limits(fresh_server: Server) -> None:
    fresh_server.extra_env.update({"CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS": "2",
                                   "CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS_PER_USER": "1"})
    fresh_server.start()
    ivy, jo = fresh_server.client(fresh_server.new_key("ivy")), fresh_server.client(fresh_server.new_key("jo"))
    slow = {"repository": "acme/web", "prompt": "@sleep 8\n@say slow"}
    ivy1 = ivy.post(RUNS, json=slow).json()["run"]["id"]
    ivy2 = ivy.post(RUNS, json=slow).json()["run"]["id"]
    jo1 = jo.post(RUNS, json=slow).json()["run"]["id"]
    time.sleep(3)
    status = {r: c.get(f"{RUNS}/{r}").json()["run"]["status"] for r, c in ((ivy1, ivy), (ivy2, ivy), (jo1, jo))}
    # ivy's second run waits although a global slot is free for jo's
    assert status == {ivy1: "running", ivy2: "queued", jo1: "running"}
    # a turn ends idle; on a loaded machine its warm session may expire (completed) before a wait sees it
    ended = {"idle", "completed", "failed"}
    first = wait_for(ivy, ivy1, ended)
    second = wait_for(ivy, ivy2, ended)
    third = wait_for(jo, jo1, ended)
    assert all(r["error"] is None and r["summary"] == "slow" for r in (first, second, third))
    assert second["startedAt"] >= first["turns"][0]["finishedAt"]  # started only once ivy's first turn ended
    ivy.close()
    jo.close()
