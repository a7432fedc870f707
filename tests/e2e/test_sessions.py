"""Sessions that survive (issue 17), with real containers and the real OpenCode: a message to a
run whose sandbox expired, was removed or was lost to a server crash continues the same run id
with the workspace and the agent's transcript restored; forks start from any turn; idle
sessions pause and resume; a follow-up that fails on its own leaves the session usable."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SAMPLE_FILES
from tests.helpers import Server, make_repo, our_containers, wait_for

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"
TURN1 = "@write a.txt\nfrom turn one\n@end\n@say wrote a.txt"
TURN2 = "@bash cat a.txt\n@write b.txt\nfrom turn two\n@end\n@history"


def _server(base: Path, **env: str) -> Server:
    srv = Server(base, extra_env={"CRITIQUE_LOCAL_SANDBOX_REAP_INTERVAL_S": "0.5",
                                  "CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S": "600",
                                  "CRITIQUE_LOCAL_SANDBOX_PAUSE_AFTER_S": "0",
                                  "CRITIQUE_LOCAL_LIMITS_MAX_PATCH_BYTES": "100000", **env})
    srv.repos.mkdir(parents=True)
    make_repo(srv.repos, "acme/web", SAMPLE_FILES)
    return srv


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = _server(tmp_path_factory.mktemp("sessions"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(srv: Server) -> Iterator[httpx.Client]:
    with srv.client(srv.new_key("sam")) as client:
        yield client


def events_of(api: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    return [e["data"] for e in api.get(f"{RUNS}/{run_id}", params={"events": "1"}).json()["run"]["events"]
            if e["event"] == "builder.event"]


def bash_outputs(api: httpx.Client, run_id: str) -> list[str]:
    return [e["output"] for e in events_of(api, run_id) if e.get("tool") == "bash" and "output" in e]


def idle_run(api: httpx.Client, prompt: str = TURN1) -> dict[str, Any]:
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": prompt}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed", "completed"})
    assert done["status"] == "idle", done["error"]
    return done


def follow_up(api: httpx.Client, run_id: str, prompt: str = TURN2, **extra: Any) -> dict[str, Any]:
    resp = api.post(f"{RUNS}/{run_id}/messages", json={"prompt": prompt, **extra})
    assert resp.status_code == 202, resp.text
    assert resp.json()["run"]["id"] == run_id  # the same run, not a chained one
    done = wait_for(api, run_id, {"idle", "failed", "completed"})
    assert done["status"] == "idle", done["error"]
    return done


def assert_restored(api: httpx.Client, run_id: str, done: dict[str, Any], reason: str) -> None:
    assert done["summary"].startswith("history: 2 user messages,"), done["summary"]
    assert done["turnCount"] == 2 and done["chainedToRunId"] is None
    assert "from turn one" in bash_outputs(api, run_id)[-1]
    assert done["changedPaths"] == ["a.txt", "b.txt"]
    patch = api.get(f"{RUNS}/{run_id}/patch").text
    assert "+from turn one" in patch and "+from turn two" in patch
    restored = [e for e in events_of(api, run_id) if e["type"] == "session.restored"]
    assert restored and restored[-1]["reason"] == reason and restored[-1]["fromTurn"] == 1
    assert restored[-1]["totalMs"] >= restored[-1]["importMs"] >= 0


def remove_sandbox(run_id: str) -> None:
    boxes = our_containers(run_id)
    assert boxes
    subprocess.run(["docker", "rm", "-f", *boxes], check=True, capture_output=True)


def test_a_removed_sandbox_is_restored_on_the_same_run(api: httpx.Client) -> None:
    run = idle_run(api)
    remove_sandbox(run["id"])  # the moment the run is idle: its state was kept before
    done = follow_up(api, run["id"])
    assert_restored(api, run["id"], done, "sandbox_lost")
    assert len(our_containers(run["id"])) == 1
    chained = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say x", "fallback": "chain"})
    assert chained.status_code == 202 and chained.json()["run"]["id"] == run["id"]  # live: chain is not needed
    wait_for(api, run["id"], {"idle", "failed"})


def test_fork_of_turn_one_has_turn_one_only(api: httpx.Client, srv: Server) -> None:
    run = idle_run(api)
    two = follow_up(api, run["id"], "@write b.txt\nfrom turn two\n@end\n@say wrote b.txt")
    body = {"turn": 1, "prompt": "@bash ls\n@history", "title": "forked"}
    resp = api.post(f"{RUNS}/{run['id']}/fork", json=body, headers={"Idempotency-Key": "fork-1"})
    assert resp.status_code == 201, resp.text
    fork = resp.json()["run"]
    assert fork["id"] != run["id"] and fork["forkedFrom"] == {"runId": run["id"], "turn": 1}
    again = api.post(f"{RUNS}/{run['id']}/fork", json=body, headers={"Idempotency-Key": "fork-1"})
    assert again.status_code == 200 and again.json()["run"]["id"] == fork["id"]
    done = wait_for(api, fork["id"], {"idle", "failed"})
    assert done["status"] == "idle", done["error"]
    assert done["summary"].startswith("history: 2 user messages,"), done["summary"]  # one earlier, this one
    assert done["changedPaths"] == ["a.txt"] and done["title"] == "forked" and done["turnCount"] == 2
    assert "b.txt" not in bash_outputs(api, fork["id"])[-1] and "a.txt" in bash_outputs(api, fork["id"])[-1]
    original = api.get(f"{RUNS}/{run['id']}").json()["run"]
    assert original["status"] == "idle" and original["turnCount"] == 2
    assert original["changedPaths"] == two["changedPaths"] == ["a.txt", "b.txt"]
    # without a prompt the fork waits idle with turn 1's results
    quiet = api.post(f"{RUNS}/{run['id']}/fork", json={"turn": 1}).json()["run"]
    idle = wait_for(api, quiet["id"], {"idle", "failed"})
    assert idle["status"] == "idle" and idle["changedPaths"] == ["a.txt"] and idle["summary"] == "wrote a.txt"
    assert api.post(f"{RUNS}/{run['id']}/fork", json={"turn": 3}).status_code == 422
    assert api.post(f"{RUNS}/{run['id']}/fork", json={"turn": 1, "x": 1}).status_code == 422
    with srv.client(srv.new_key("other")) as other:
        assert other.post(f"{RUNS}/{run['id']}/fork", json={"turn": 1}).status_code == 404


@pytest.mark.parametrize("failing, code", [
    ("@write c.txt\nnot kept\n@end\n@fail upstream refused", "model_error"),
    ("@bash head -c 300000 /dev/urandom | base64 > big.txt\n@say big", "patch_too_large"),
])
def test_a_failed_follow_up_keeps_the_session(api: httpx.Client, failing: str, code: str) -> None:
    run = idle_run(api)
    box = our_containers(run["id"])
    resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": failing})
    assert resp.status_code == 202
    failed = wait_for(api, run["id"], {"idle", "failed", "completed"})
    assert failed["status"] == "idle" and failed["sessionActive"] is True, failed["error"]
    assert failed["error"]["code"] == code
    assert failed["turns"][1]["status"] == "failed" and failed["turns"][1]["error"]["code"] == code
    assert failed["changedPaths"] == ["a.txt"]
    third = follow_up(api, run["id"], "@bash ls\n@write d.txt\nthree\n@end\n@say three")
    assert our_containers(run["id"]) == box  # the same sandbox
    listing = bash_outputs(api, run["id"])[-1]
    assert "a.txt" in listing and "c.txt" not in listing and "big.txt" not in listing
    assert third["changedPaths"] == ["a.txt", "d.txt"] and third["error"] is None
    patch = api.get(f"{RUNS}/{run['id']}/patch").text
    assert "+from turn one" in patch and "+three" in patch


def test_a_restore_after_a_failed_follow_up_forgets_that_turn(api: httpx.Client) -> None:
    """The failed turn's files went back to the last good tree; after a restore its messages are
    gone from the transcript too. The run's agentReadyAt and firstModelCallAt stay the first
    session's and turn's; the restore's are in its event and turn."""
    run = idle_run(api)
    resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@write c.txt\nnot kept\n@end\n@fail refused"})
    assert resp.status_code == 202
    failed = wait_for(api, run["id"], {"idle", "failed", "completed"})
    assert failed["status"] == "idle" and failed["error"]["code"] == "model_error", failed["error"]
    remove_sandbox(run["id"])
    done = follow_up(api, run["id"], "@bash ls\n@history")
    # turn 1's transcript and this prompt: the failed turn's prompt and answer went with its files
    assert done["summary"].startswith("history: 2 user messages,"), done["summary"]
    listing = bash_outputs(api, run["id"])[-1]
    assert "a.txt" in listing and "c.txt" not in listing
    restored = [e for e in events_of(api, run["id"]) if e["type"] == "session.restored"]
    assert restored[-1]["fromTurn"] == 1 and restored[-1]["reason"] == "sandbox_lost"
    assert done["agentReadyAt"] == run["agentReadyAt"] < restored[-1]["agentReadyAt"]
    first, third = done["turns"][0]["firstModelCallAt"], done["turns"][2]["firstModelCallAt"]
    assert done["firstModelCallAt"] == run["firstModelCallAt"] == first < third


def test_a_follow_up_that_loses_its_sandbox_leaves_the_run_idle_for_a_restore(api: httpx.Client) -> None:
    run = idle_run(api)
    resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@sleep 600\n@say never"})
    assert resp.status_code == 202
    deadline = time.monotonic() + 300
    while api.get(f"{RUNS}/{run['id']}").json()["run"]["turns"][1]["firstModelCallAt"] is None:  # in the sleep
        assert time.monotonic() < deadline, "turn 2 never called the model"
        time.sleep(0.2)
    remove_sandbox(run["id"])  # mid-turn, from outside
    lost = wait_for(api, run["id"], {"idle", "failed", "completed"})
    assert lost["status"] == "idle" and lost["error"]["code"] == "sandbox_gone", lost["error"]
    assert lost["sessionActive"] is False and lost["sessionEndReason"] == "sandbox_lost"
    assert lost["sessionExpiresAt"] is None and "send_message" in lost["nextActions"]
    assert lost["turns"][1]["status"] == "failed" and lost["turns"][1]["error"]["code"] == "sandbox_gone"
    assert lost["changedPaths"] == ["a.txt"] and lost["summary"] == "wrote a.txt"
    assert "+from turn one" in api.get(f"{RUNS}/{run['id']}/patch").text
    assert our_containers(run["id"]) == []
    third = follow_up(api, run["id"], "@bash cat a.txt\n@history")  # the same run id, restored
    assert "from turn one" in bash_outputs(api, run["id"])[-1]
    # turn 1's transcript and this prompt: turn 2's went with its sandbox
    assert third["summary"].startswith("history: 2 user messages,"), third["summary"]
    assert third["turnCount"] == 3 and third["turns"][2]["status"] == "completed" and third["error"] is None
    assert third["sessionActive"] is True and third["sessionEndReason"] is None
    assert third["changedPaths"] == ["a.txt"] and len(our_containers(run["id"])) == 1
    restored = [e for e in events_of(api, run["id"]) if e["type"] == "session.restored"]
    assert restored and restored[-1]["reason"] == "sandbox_lost" and restored[-1]["fromTurn"] == 1


def test_an_expired_session_is_restored(tmp_path: Path) -> None:
    server = _server(tmp_path, CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S="3")
    server.start()
    try:
        with server.client(server.new_key("exp")) as api:
            run = api.post(RUNS, json={"repository": "acme/web", "prompt": TURN1}).json()["run"]
            expired = wait_for(api, run["id"], {"completed", "failed"}, timeout_s=300)
            assert expired["sessionEndReason"] == "expired", expired["error"]
            assert our_containers(run["id"]) == []
            assert expired["sessionActive"] is False and "send_message" in expired["nextActions"]
            resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": TURN2})
            assert resp.status_code == 202 and resp.json()["run"]["id"] == run["id"]
            done = wait_for(api, run["id"], {"idle", "failed", "completed"}, timeout_s=300)
            assert done["status"] in ("idle", "completed") and done["turns"][1]["status"] == "completed", done
            assert_restored(api, run["id"], done, "expired")
    finally:
        server.stop()


# turn 1 of a paused run: besides a.txt (untracked in the workspace), files a restore would not
# bring back (they are outside the tree): only the kept sandbox has them after a resume
PAUSED_TURN1 = ("@write a.txt\nfrom turn one\n@end\n@bash echo from the home > ~/note.txt && echo scratch > "
                "/tmp/scratch.txt\n@say wrote a.txt")
RESUMED_TURN2 = "@bash cat a.txt ~/note.txt /tmp/scratch.txt\n@write b.txt\nfrom turn two\n@end\n@history"


def agent_processes(box: str) -> list[str]:
    """The agent's processes in a container, as the host sees them (``docker top``)."""
    res = subprocess.run(["docker", "top", box, "-eo", "pid,args"], capture_output=True, text=True, check=True)
    return [line for line in res.stdout.splitlines()[1:] if "opencode" in line]


def resumed_events(api: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    return [e for e in events_of(api, run_id) if e["type"] in ("session.resumed", "session.restored")]


def test_pause_keeps_the_sandbox_and_resume_relaunches_the_agent(tmp_path: Path) -> None:
    server = _server(tmp_path, CRITIQUE_LOCAL_SANDBOX_PAUSE_AFTER_S="1")
    server.start()
    try:
        key = server.new_key("pat")
        with server.client(key) as api:
            run = idle_run(api, PAUSED_TURN1)
            box = our_containers(run["id"])
            assert len(box) == 1 and agent_processes(box[0])
            paused = wait_paused(api, run["id"])
            assert paused["status"] == "idle" and paused["sessionActive"] is True
            assert paused["nextActions"] == run["nextActions"]
            assert paused["sessionExpiresAt"] == run["sessionExpiresAt"]
            assert our_containers(run["id"]) == box and agent_processes(box[0]) == []  # kept, the agent stopped
            done = follow_up(api, run["id"], RESUMED_TURN2)  # the client does nothing different
            assert our_containers(run["id"]) == box  # the same container
            assert done["summary"].startswith("history: 2 user messages,")
            assert bash_outputs(api, run["id"])[-1].split() == ["from", "turn", "one", "from", "the", "home",
                                                                "scratch"]
            assert done["changedPaths"] == ["a.txt", "b.txt"]
            resumed = resumed_events(api, run["id"])
            assert [e["type"] for e in resumed] == ["session.resumed"] and resumed[0]["relaunched"] is True
            assert done["agentReadyAt"] == run["agentReadyAt"]  # the run's first agent's, also after a resume
            wait_paused(api, run["id"])
        # a crash while paused loses nothing: the next start keeps the paused sandbox
        server.kill()
        server.start()
        with server.client(key) as api:
            other = idle_run(api)
            assert api.get(f"{RUNS}/{run['id']}").json()["run"]["status"] == "idle"
            assert our_containers(run["id"]) == box
            third = follow_up(api, run["id"], "@bash cat b.txt ~/note.txt\n@history")
            assert third["summary"].startswith("history: 3 user messages,")
            assert "from turn two" in bash_outputs(api, run["id"])[-1]
            assert our_containers(run["id"]) == box
            assert [e["type"] for e in resumed_events(api, run["id"])] == ["session.resumed"] * 2
            # a paused sandbox removed from outside: the next message restores the session instead
            wait_paused(api, run["id"])
            remove_sandbox(run["id"])
            fourth = follow_up(api, run["id"], "@bash cat a.txt b.txt\n@history")
            assert fourth["summary"].startswith("history: 4 user messages,")
            assert "from turn two" in bash_outputs(api, run["id"])[-1]
            last = resumed_events(api, run["id"])[-1]
            assert last["type"] == "session.restored" and last["reason"] == "paused"
            assert fourth["agentReadyAt"] == run["agentReadyAt"] < last["agentReadyAt"]  # the restore's: its event
            # endSession on a paused run removes its sandbox and state
            wait_paused(api, other["id"])
            assert len(our_containers(other["id"])) == 1
            state = server.data_dir / "sessions" / f"{other['id']}.state"
            assert state.exists()
            ended = api.post(f"{RUNS}/{other['id']}/messages", json={"endSession": True})
            assert ended.status_code == 200 and ended.json()["run"]["status"] == "completed"
            assert ended.json()["run"]["pausedAt"] is None  # an ended run is not paused
            assert not state.exists() and not (server.data_dir / "runs" / f"{other['id']}.git").exists()
            assert our_containers(other["id"]) == []
    finally:
        server.stop()


def test_a_sandbox_lost_to_a_server_crash_is_restored(tmp_path: Path) -> None:
    server = _server(tmp_path)
    server.start()
    try:
        key = server.new_key("kim")
        with server.client(key) as api:
            run = idle_run(api)
        server.kill()
        remove_sandbox(run["id"])
        server.start()
        with server.client(key) as api:
            lost = api.get(f"{RUNS}/{run['id']}").json()["run"]
            assert lost["sessionEndReason"] == "sandbox_lost"
            done = follow_up(api, run["id"])
            assert_restored(api, run["id"], done, "sandbox_lost")
    finally:
        server.stop()


def wait_paused(api: httpx.Client, run_id: str, timeout_s: float = 120) -> dict[str, Any]:
    """The run once paused: ``pausedAt`` set and the pause done (its ``session.paused`` event)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run: dict[str, Any] = api.get(f"{RUNS}/{run_id}").json()["run"]
        if run["pausedAt"]:
            events = events_of(api, run_id)
            last = max((i for i, e in enumerate(events) if e["type"] == "session.paused"), default=-1)
            if last > max((i for i, e in enumerate(events) if e["type"] == "session.resumed"), default=-1):
                return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} was not paused")


def test_a_restore_takes_a_warm_sandbox_from_the_pool(tmp_path: Path) -> None:
    server = _server(tmp_path, CRITIQUE_LOCAL_POOL_SIZE="1")
    server.start()
    try:
        with server.client(server.new_key("pia")) as api:
            run = idle_run(api)
            deadline = time.monotonic() + 300  # the pool refills after the first run took its sandbox
            while httpx.get(f"{server.url}/healthz").json()["warmSandboxes"] < 1:
                assert time.monotonic() < deadline, "the pool did not refill"
                time.sleep(0.3)
            remove_sandbox(run["id"])
            done = follow_up(api, run["id"])
            assert_restored(api, run["id"], done, "sandbox_lost")
            restored = [e for e in events_of(api, run["id"]) if e["type"] == "session.restored"]
            assert restored[-1]["warm"] is True
    finally:
        server.stop()
