"""Faults with real processes: the server killed with SIGKILL while 20 runs are queued, running
and idle; a sandbox killed from outside; OpenCode crashing inside its sandbox."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Any

import pytest

from tests.helpers import ROOT, Server, sse_events, wait_for

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"


def ours(server: Server) -> set[str]:
    instance = (server.data_dir / "instance_id").read_text().strip()
    out = subprocess.run(["docker", "ps", "-aq", "--no-trunc", "--filter", f"label=critique.instance={instance}"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_sigkill_with_20_runs_in_mixed_states_loses_nothing(fresh_server: Server) -> None:
    fresh_server.extra_env.update({"CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS": "4",
                                   "CRITIQUE_LOCAL_SCHEDULER_MAX_CONCURRENT_RUNS_PER_USER": "20",
                                   "CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S": "1800",  # idle ones stay idle
                                   "CRITIQUE_LOCAL_SCHEDULER_MAX_IDLE_SESSIONS_PER_USER": "20"})
    fresh_server.start()
    api = fresh_server.client(fresh_server.new_key("crash"))
    idle = [api.post(RUNS, json={"repository": "acme/web", "prompt": f"@write i{i}.txt\n{i}\n@end\n@say idle {i}"})
            .json()["run"]["id"] for i in range(6)]
    for run_id in idle:
        assert wait_for(api, run_id, {"idle", "failed"})["status"] == "idle"
    running = [api.post(RUNS, json={"repository": "acme/web", "prompt": "@bash echo started\n@sleep 600\n@say late"})
               .json()["run"]["id"] for _ in range(4)]
    for run_id in running:
        deadline = time.monotonic() + 300
        while api.get(f"{RUNS}/{run_id}").json()["run"]["lifecycle"] != "agent_running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    queued = [api.post(RUNS, json={"repository": "acme/web", "prompt": f"@say queued {i}"}).json()["run"]["id"]
              for i in range(10)]
    assert {api.get(f"{RUNS}/{r}").json()["run"]["status"] for r in queued} == {"queued"}

    # an SSE client on a running run, interrupted by the crash
    seen: list[tuple[int, str, dict[str, Any]]] = []

    def listen() -> None:
        try:
            seen.extend(sse_events(api, running[0]))
        except Exception:
            pass  # the server dies under it

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(1.5)
    fresh_server.kill()
    listener.join(10)
    fresh_server.start()

    everything = idle + running + queued
    listed = {r["id"] for r in api.get(RUNS, params={"limit": 100}).json()["data"]}
    assert set(everything) <= listed  # nothing accepted is lost
    final = {r: wait_for(api, r, {"idle", "failed", "completed"}, timeout_s=300) for r in everything}
    assert all(final[r]["status"] == "failed" and final[r]["error"]["code"] == "server_restarted" for r in running)
    assert all(final[r]["status"] == "idle" for r in queued), [final[r]["error"] for r in queued]
    assert all(final[r]["status"] == "idle" for r in idle)

    # the reconnecting SSE client sees every event exactly once
    last = seen[-1][0] if seen else 0
    rest = sse_events(api, running[0], headers={"Last-Event-ID": str(last)})
    ids = [e[0] for e in seen] + [e[0] for e in rest]
    stored = [e["id"] for e in api.get(f"{RUNS}/{running[0]}", params={"events": "1"}).json()["run"]["events"]]
    assert ids == stored and len(ids) == len(set(ids))

    # idle sessions are still usable, in the same sandbox; no orphan containers
    resp = api.post(f"{RUNS}/{idle[0]}/messages", json={"prompt": "@bash cat i0.txt\n@say still warm"})
    assert resp.status_code == 202
    again = wait_for(api, idle[0], {"idle", "failed"})
    assert again["status"] == "idle" and again["agentSessionId"] == final[idle[0]]["agentSessionId"]
    for run_id in everything:
        api.post(f"{RUNS}/{run_id}/messages", json={"endSession": True})
    deadline = time.monotonic() + 60
    while ours(fresh_server):
        assert time.monotonic() < deadline, ours(fresh_server)
        time.sleep(0.5)


def test_a_sandbox_killed_from_outside_fails_its_run_and_spares_the_neighbour(server: Server, alice: str) -> None:
    api = server.client(alice)
    victim = api.post(RUNS, json={"repository": "acme/web", "prompt": "@sleep 600\n@say never"}).json()["run"]
    neighbour = api.post(RUNS, json={"repository": "acme/web", "prompt": "@sleep 3\n@say fine"}).json()["run"]
    deadline = time.monotonic() + 300
    while api.get(f"{RUNS}/{victim['id']}").json()["run"]["lifecycle"] != "agent_running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    subprocess.run(["docker", "kill", f"critique-{victim['id']}"], capture_output=True, check=True)
    failed = wait_for(api, victim["id"], {"idle", "failed"})
    assert failed["status"] == "failed" and failed["error"]["code"] == "sandbox_gone", failed
    assert wait_for(api, neighbour["id"], {"idle", "failed"})["status"] == "idle"
    api.post(f"{RUNS}/{neighbour['id']}/messages", json={"endSession": True})


def test_opencode_crashing_inside_the_sandbox_is_a_clear_failure(server: Server, alice: str) -> None:
    api = server.client(alice)
    run = api.post(RUNS, json={"repository": "acme/web",
                               "prompt": "@bash pkill -9 -f 'opencode serve'; sleep 5\n@say unreachable"}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["status"] == "failed" and done["error"]["code"] in ("agent_unreachable", "agent_error"), done["error"]
    assert subprocess.run(["docker", "ps", "-aq", "--filter", f"label=critique.run={run['id']}"],
                          capture_output=True, text=True).stdout.split() == []


def _containers(run_id: str) -> list[str]:
    return subprocess.run(["docker", "ps", "-aq", "--filter", f"label=critique.run={run_id}"],
                          capture_output=True, text=True).stdout.split()


def _docker_up() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.mark.exclusive  # takes the engine away from everything else on the host: runs alone
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="restarting dockerd needs root")
def test_docker_daemon_restart_fails_running_runs_and_chains_idle_ones(fresh_server: Server) -> None:
    fresh_server.start()
    api = fresh_server.client(fresh_server.new_key("daemon"))
    idle = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say idle"}).json()["run"]
    assert wait_for(api, idle["id"], {"idle", "failed"})["status"] == "idle"
    running = api.post(RUNS, json={"repository": "acme/web", "prompt": "@sleep 600\n@say late"}).json()["run"]
    deadline = time.monotonic() + 300
    while api.get(f"{RUNS}/{running['id']}").json()["run"]["lifecycle"] != "agent_running":
        assert time.monotonic() < deadline
        time.sleep(0.2)

    subprocess.run(["pkill", "-TERM", "-x", "dockerd"], check=True)
    deadline = time.monotonic() + 60
    while subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "dockerd did not stop"
        time.sleep(0.5)
    assert not _docker_up()
    subprocess.run(["bash", str(ROOT / "scripts" / "ensure-system.sh")], check=True, capture_output=True)
    assert _docker_up()

    failed = wait_for(api, running["id"], {"idle", "failed"})
    assert failed["status"] == "failed"
    assert failed["error"]["code"] in ("sandbox_gone", "agent_unreachable", "sandbox_error"), failed["error"]
    resp = api.post(f"{RUNS}/{idle['id']}/messages", json={"prompt": "@say after the daemon came back",
                                                            "fallback": "chain"})
    assert resp.status_code == 202 and resp.json()["run"]["chainedFromRunId"] == idle["id"]
    chained = wait_for(api, resp.json()["run"]["id"], {"idle", "failed"})
    assert chained["status"] == "idle" and chained["summary"] == "after the daemon came back"
    assert api.get(f"{RUNS}/{idle['id']}").json()["run"]["sessionActive"] is False
    api.post(f"{RUNS}/{chained['id']}/messages", json={"endSession": True})
    deadline = time.monotonic() + 90  # left-overs go with the run's teardown or the orphan sweep
    while _containers(idle["id"]) or _containers(running["id"]):
        assert time.monotonic() < deadline, "containers of ended runs remain"
        time.sleep(1)
