"""Operating a server (README "Operating"): /metrics after scripted runs, parsed by
prometheus-client's own parser; /readyz; request ids; the audit trail; and, on a server of
its own, JSON logs, the separate metrics listener, draining on SIGTERM, ending idle sessions
on stop and `sandbox gc`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from critique_local.hoststate import HostState, default_root
from tests.conftest import METRICS_TOKEN
from tests.helpers import CLI, ROOT, Server, free_port, our_containers, wait_for, wait_lifecycle

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"


def samples(text: str) -> dict[str, float]:
    """Every sample as ``name{label="v",...}`` -> value, labels sorted."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def total(found: dict[str, float], name: str) -> float:
    return sum(v for k, v in found.items() if k == name or k.startswith(name + "{"))


def test_metrics_after_scripted_runs_readyz_request_ids_and_audit(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        created = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say first turn"},
                           headers={"X-Request-Id": "ops-test-1"})
        assert created.status_code == 201, created.text
        assert created.headers["X-Request-Id"] == "ops-test-1"
        assert len(api.get("/healthz").headers["X-Request-Id"]) == 16  # none given: one is made
        run_id = created.json()["run"]["id"]
        assert wait_for(api, run_id, {"idle", "failed"})["status"] == "idle"
        follow = api.post(f"{RUNS}/{run_id}/messages", json={"prompt": "@say second turn"})
        assert follow.status_code == 202, follow.text
        wait_for(api, run_id, {"idle", "failed"})
        assert api.post(f"{RUNS}/{run_id}/messages", json={"endSession": True}).status_code == 200
        refused = api.post(f"{RUNS}/{run_id}/messages", json={"prompt": "@say too late"})
        assert refused.status_code == 409

        ready = api.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == dict.fromkeys(
            ["database", "sandbox_engine", "sandbox_image", "gateway_listener", "egress_proxy"], "ok")

        assert api.get("/metrics").status_code == 401  # an API key is not the operator token
        scraped = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert scraped.status_code == 200 and scraped.headers["Content-Type"].startswith("text/plain")
    found = samples(scraped.text)
    assert total(found, "critique_runs") >= 1 and found['critique_runs{lifecycle="finished",status="completed"}'] >= 1
    assert found["critique_runs_created_total"] >= 1
    assert found["critique_turns_started_total"] >= 2 and found["critique_turns_finished_total"] >= 2
    assert found['critique_gateway_calls_total{model="critique/scripted",outcome="ok"}'] >= 2
    assert found['critique_gateway_tokens_total{direction="output",model="critique/scripted"}'] > 0
    assert total(found, "critique_sandboxes_provisioned_total") >= 1
    assert found['critique_agent_ready_duration_seconds_count{source="new"}'] + \
        found.get('critique_agent_ready_duration_seconds_count{source="pool"}', 0) >= 1
    assert found['critique_turn_duration_seconds_count{outcome="finished"}'] >= 2
    for gauge in ('critique_sandboxes{state="busy"}', 'critique_sandboxes{state="idle"}',
                  'critique_sandboxes{state="paused"}', 'critique_sandboxes{state="pooled"}', "critique_queue_depth",
                  "critique_sse_subscribers"):
        assert gauge in found

    checks = {f["check"]: f for f in map(json.loads, server.cli("doctor", "--json", check=False).stdout.splitlines())}
    assert checks["sandbox engine"]["level"] == "ok" and "OpenCode 1." in checks["sandbox image"]["detail"]
    assert checks["firewall"]["level"] == "ok" and "of the running server present" in checks["firewall"]["detail"]
    assert checks["server"]["level"] == "ok" and checks["server"]["detail"].endswith(" running")
    assert "not running" not in checks["server"]["detail"]
    missing = subprocess.run([*CLI, "doctor"], cwd=ROOT, capture_output=True, text=True,
                             env={**server.env, "CRITIQUE_LOCAL_SANDBOX_IMAGE": "critique-local/sandbox:no-such-tag"})
    assert missing.returncode == 1, missing.stdout
    assert "FAIL  sandbox image: critique-local/sandbox:no-such-tag is missing" in missing.stdout
    assert "fix: run `make image`" in missing.stdout

    trail = [json.loads(line) for line in server.cli("audit", "--run", run_id, "--json").stdout.splitlines()]
    actions = [(e["action"], e["outcome"], e["http_status"]) for e in reversed(trail)]
    assert actions == [("run.create", "ok", 201), ("run.follow_up", "ok", 202), ("run.end_session", "ok", 200),
                       ("run.follow_up", "run_terminal", 409)]
    prefix = trail[0]["key_prefix"]
    assert prefix and alice.startswith(prefix) and {(e["user"], e["key_prefix"]) for e in trail} == {("alice", prefix)}
    assert trail[-1]["detail"]["repository"] == "acme/web"


def _json_lines(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"event": "ready"' not in line:  # the CLI's start-up line is not a log line
            out.append(json.loads(line))
    return out


def test_drain_on_sigterm_ends_idle_sessions_json_logs_metrics_listener_and_gc(fresh_server: Server) -> None:
    metrics_port = free_port()
    fresh_server.extra_env.update({
        "CRITIQUE_LOCAL_SERVER_LOG_FORMAT": "json", "CRITIQUE_LOCAL_SERVER_END_IDLE_SESSIONS_ON_STOP": "true",
        "CRITIQUE_LOCAL_SERVER_DRAIN_TIMEOUT_S": "300", "CRITIQUE_LOCAL_METRICS_ENABLED": "true",
        "CRITIQUE_LOCAL_METRICS_PORT": str(metrics_port)})
    fresh_server.start()
    key = fresh_server.new_key("carol")
    with fresh_server.client(key) as api:
        slow = api.post(RUNS, json={"repository": "acme/web", "prompt": "@sleep 3\n@say drained"}).json()["run"]["id"]
        wait_lifecycle(api, slow, "agent_running")
        assert api.get("/metrics").status_code == 404  # no metrics.token: not on the public port
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert scraped.status_code == 200
        found = samples(scraped.text)
        assert found["critique_turns_started_total"] == 1 and found['critique_sandboxes{state="busy"}'] == 1
        # gc given another host_state_dir than the server's still sees it running (its data dir's
        # lock): its firewall chain and its run's sandbox stay
        instance = (fresh_server.data_dir / "instance_id").read_text().strip()
        elsewhere = subprocess.run([*CLI, "sandbox", "gc", "--apply"], cwd=ROOT, capture_output=True, text=True,
                                   env={**fresh_server.env,
                                        "CRITIQUE_LOCAL_SERVER_HOST_STATE_DIR": str(fresh_server.base / "elsewhere")})
        assert elsewhere.returncode == 0, elsewhere.stderr
        assert not {"removed sandbox", "removed firewall", "removed network"} & {
            " ".join(line.split()[:2]) for line in elsewhere.stdout.splitlines()}, elsewhere.stdout
        assert _chain(instance) and len(our_containers(slow)) == 1
        assert fresh_server.proc is not None
        fresh_server.proc.terminate()  # SIGTERM while the slow turn runs
        assert fresh_server.proc.wait(240) == 0
    fresh_server.proc = None

    db = sqlite3.connect(fresh_server.data_dir / "critique.db")
    try:
        status, reason, summary = db.execute("SELECT status, session_end_reason, summary FROM runs WHERE id = ?",
                                             (slow,)).fetchone()
    finally:
        db.close()
    assert (status, reason, summary) == ("completed", "server_stopped", "drained")  # finished, then ended
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=critique.instance={instance}"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert left == []

    lines = _json_lines(fresh_server.base / "server.log")
    assert lines and all({"time", "level", "logger", "message", "request_id", "run_id"} <= set(x) for x in lines)
    assert any(x["run_id"] == slow for x in lines)  # lines logged while its turn ran
    about = [x for x in lines if slow in str(x["message"])]  # its turn, the drain, ending its session on stop
    assert about and all(x["run_id"] == slow for x in about), [x for x in about if x["run_id"] != slow]

    # gc: a sandbox of this instance that no live run owns goes; another instance's stays
    image = "critique-local/sandbox:latest"
    # (another instance, alive: its chain and sandbox are never touched; held here so that no
    # server's own sweep removes them meanwhile)
    other = HostState(default_root(Path("/run/critique-local"))).claim(OTHER, fresh_server.base / "other", wait_s=0)
    ours = _container(image, {"critique.instance": instance, "critique.run": "run_gone"})
    theirs = _container(image, {"critique.instance": OTHER, "critique.run": "run_other"})
    subprocess.run(["iptables", "-w", "-N", f"CRIT-{OTHER}"], check=True)
    try:
        dry = fresh_server.cli("sandbox", "gc").stdout
        assert f"would remove sandbox {ours[:10]}" in dry and theirs[:10] not in dry and OTHER not in dry
        assert _exists(ours)
        applied = fresh_server.cli("sandbox", "gc", "--apply").stdout
        assert f"removed sandbox {ours[:10]}" in applied
        assert not _exists(ours) and _exists(theirs) and _chain(OTHER)
    finally:
        subprocess.run(["docker", "rm", "-f", ours, theirs], capture_output=True)
        subprocess.run(["iptables", "-w", "-X", f"CRIT-{OTHER}"], capture_output=True)
        other.release()

    # a warm-pool sandbox keeps its labels (critique.run=pool-..., empty critique.user) when a run
    # takes it: whose it is comes from the store. While the instance runs (held here, as its
    # server would), gc keeps a pooled one no run took and removes one that an ended run took.
    claim = HostState(default_root(Path("/run/critique-local"))).claim(instance, fresh_server.data_dir, wait_s=0)
    waiting = _container(image, {"critique.instance": instance, "critique.run": "pool-0123456789ab",
                                 "critique.user": ""})
    taken = _container(image, {"critique.instance": instance, "critique.run": "pool-ba9876543210",
                               "critique.user": ""})
    db = sqlite3.connect(fresh_server.data_dir / "critique.db")
    try:
        with db:
            db.execute("UPDATE runs SET sandbox_id = ? WHERE id = ?", (taken, slow))
    finally:
        db.close()
    try:
        listed = fresh_server.cli("sandbox", "ls").stdout.splitlines()
        assert next(line for line in listed if taken[:12] in line).endswith(f"run {slow} (completed)"), listed
        assert next(line for line in listed if waiting[:12] in line).endswith("pooled"), listed
        dry = fresh_server.cli("sandbox", "gc").stdout
        assert waiting[:10] not in dry, dry
        assert f"would remove sandbox {taken[:10]}" in dry and f"run {slow} is not live" in dry, dry
    finally:
        subprocess.run(["docker", "rm", "-f", waiting, taken], capture_output=True)
        claim.release()


OTHER = "0f1e2d3c4b5a6978"  # an instance id that is not ours


def _chain(instance: str) -> bool:
    return subprocess.run(["iptables", "-w", "-n", "-L", f"CRIT-{instance}"], capture_output=True).returncode == 0


def _container(image: str, labels: dict[str, str]) -> str:
    args = [a for k, v in labels.items() for a in ("--label", f"{k}={v}")]
    return subprocess.run(["docker", "run", "-d", "--network", "none", *args, "--entrypoint", "sleep", image, "300"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _exists(container: str) -> bool:
    return subprocess.run(["docker", "inspect", container], capture_output=True).returncode == 0
