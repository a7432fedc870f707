"""The metered gateway: plans, credits, budgets and BYOK keys that never enter a sandbox.
Upstream models are a loopback stand-in that records what it received."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import SAMPLE_FILES, SHORT_SESSIONS
from tests.helpers import Server, make_repo, wait_for
from tests.upstream_standin import USAGE_IN, USAGE_OUT, UpstreamStandIn

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"
OPERATOR_KEY = "sk-operator-" + "0" * 24
PRICE_IN, PRICE_OUT = 1000.0, 2000.0  # credits per million tokens
CALL_COST = (USAGE_IN * PRICE_IN + USAGE_OUT * PRICE_OUT) / 1_000_000  # 1.2 credits per agent call


@pytest.fixture
def billed(tmp_path: Path, upstream: UpstreamStandIn) -> Iterator[Server]:
    config = tmp_path / "config.toml"
    base = f"http://127.0.0.1:{upstream.port}/v1"
    config.write_text(f"""
[billing]
byok_provider = "byok"
orchestration_credits = 0.5
[providers.standin]
base_url = "{base}"
api_key = "{OPERATOR_KEY}"
[providers.byok]
base_url = "{base}"
[[catalog]]
id = "acme/priced"
provider = "standin"
upstream_id = "priced-v1"
input_price = {PRICE_IN}
output_price = {PRICE_OUT}
[[catalog]]
id = "acme/pro-only"
provider = "standin"
plans = ["pro"]
""")
    srv = Server(tmp_path, extra_env={"CRITIQUE_LOCAL_CONFIG": str(config), **SHORT_SESSIONS})
    make_repo(srv.repos, "acme/web", SAMPLE_FILES)
    srv.start()
    yield srv
    srv.stop()


def balance(server: Server, user: str) -> float:
    out = server.cli("credits", "show", "--user", user).stdout
    return float(out.split("balance ")[1].split()[0])


def test_plans_and_credits_gate_runs(billed: Server) -> None:
    key = billed.new_key("kim")
    with billed.client(key) as api:
        broke = api.post(RUNS, json={"repository": "acme/web", "prompt": "x", "modelId": "acme/priced"})
        assert broke.status_code == 402 and broke.json()["error"]["code"] == "insufficient_credits"
        gated = api.post(RUNS, json={"repository": "acme/web", "prompt": "x", "modelId": "acme/pro-only"})
        assert gated.status_code == 403 and gated.json()["error"]["code"] == "model_not_in_plan"
        assert api.get(RUNS).json()["data"] == []
        ids = {m["id"] for m in api.get("/api/v1/coding-agent/models").json()["data"]}
        assert "acme/pro-only" not in ids and "acme/priced" in ids
        billed.cli("credits", "plan", "--user", "kim", "pro")
        ids = {m["id"] for m in api.get("/api/v1/models").json()["data"]}
        assert "acme/pro-only" in ids
    with pytest.raises(openai.APIStatusError) as err:
        openai.OpenAI(base_url=billed.url + "/api/v1", api_key=key, max_retries=0).chat.completions.create(
            model="acme/priced", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 402


def test_managed_run_is_metered_from_upstream_usage_and_debited(billed: Server, upstream: UpstreamStandIn) -> None:
    key = billed.new_key("lee")
    billed.cli("credits", "grant", "--user", "lee", "100")
    with billed.client(key) as api:
        prompt = "@write a.txt\nA\n@end\n@bash cat a.txt\n@say done"
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": prompt, "modelId": "acme/priced"}).json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"})
        assert done["status"] == "idle", done["error"]
        assert done["summary"] == "done" and done["changedPaths"] == ["a.txt"]
        calls = 3  # write, bash, say: one model call each, through the gateway to the upstream
        assert done["usage"] == {"inputTokens": calls * USAGE_IN, "outputTokens": calls * USAGE_OUT,
                                 "credits": pytest.approx(calls * CALL_COST), "modelCalls": calls}
        assert done["turns"][0]["usage"] == done["usage"]
    assert balance(billed, "lee") == pytest.approx(100 - calls * CALL_COST)
    sent = [r for r in upstream.requests if r["body"].get("model") == "priced-v1" and r["body"].get("tools")]
    assert sent and all(r["authorization"] == f"Bearer {OPERATOR_KEY}" for r in sent[-calls:])
    assert all(key not in json.dumps(r) for r in upstream.requests)

    # the Inference API draws on the same credits
    client = openai.OpenAI(base_url=billed.url + "/api/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(model="acme/priced", messages=[{"role": "user", "content": "hi"}])
    assert reply.usage is not None and reply.usage.prompt_tokens == 11
    assert balance(billed, "lee") == pytest.approx(100 - calls * CALL_COST - (11 * PRICE_IN + 7 * PRICE_OUT) / 1e6)


def test_max_turns_stops_the_agent_loop_and_the_run_stays_usable(billed: Server) -> None:
    key = billed.new_key("max")
    with billed.client(key) as api:
        loop = "\n".join(f"@bash echo step{i}" for i in range(6)) + "\n@say finished"
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": loop,
                                   "safety": {"resources": {"maxTurns": 2}}}).json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"})
        assert done["status"] == "idle"
        assert done["error"]["code"] == "budget_exceeded" and "maxTurns" in done["error"]["message"]
        assert done["usage"]["modelCalls"] == 2
        events = api.get(f"{RUNS}/{run['id']}", params={"events": "1"}).json()["run"]["events"]
        ran = [e for e in events if e["data"].get("tool") == "bash" and e["data"]["status"] == "completed"]
        assert len(ran) == 2
        resp = api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "@say small follow-up"})
        assert resp.status_code == 202
        after = wait_for(api, run["id"], {"idle", "failed"})
        assert after["error"] is None and after["summary"] == "small follow-up"
        assert after["turns"][1]["usage"]["modelCalls"] == 1


def test_max_credits_is_never_exceeded(billed: Server) -> None:
    key = billed.new_key("ned")
    billed.cli("credits", "grant", "--user", "ned", "50")
    with billed.client(key) as api:
        loop = "\n".join(f"@bash echo step{i}" for i in range(8)) + "\n@say finished"
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": loop, "modelId": "acme/priced",
                                   "safety": {"resources": {"maxCredits": 4}}}).json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"})
        assert done["error"]["code"] == "budget_exceeded" and "maxCredits" in done["error"]["message"]
        assert done["usage"]["modelCalls"] in range(1, 9)  # stopped before the script's 9 calls
        assert done["usage"]["credits"] <= 4


def scan_container(run_id: str, needle: str) -> int:
    ids = subprocess.run(["docker", "ps", "-q", "--filter", f"label=critique.run={run_id}"], capture_output=True,
                         text=True, check=True).stdout.split()
    assert len(ids) == 1
    hits = needle in subprocess.run(["docker", "inspect", ids[0]], capture_output=True, text=True, check=True).stdout
    env = subprocess.run(["docker", "exec", ids[0], "sh", "-c", "cat /proc/*/environ 2>/dev/null; env"],
                         capture_output=True, check=True).stdout
    exported = subprocess.run(f"docker export {ids[0]} | grep -a -c -F {needle} || true", shell=True,
                              capture_output=True, text=True, check=True).stdout.strip()
    return int(hits) + int(needle.encode() in env) + int(exported or 0)


def test_byok_key_reaches_only_the_upstream(billed: Server, upstream: UpstreamStandIn) -> None:
    key = billed.new_key("ola")
    billed.cli("credits", "grant", "--user", "ola", "1")
    byok = "sk-or-v1-" + secrets.token_hex(20)
    with billed.client(key) as api:
        prompt = "@write b.txt\nB\n@end\n@bash env | sort > env.txt; cat b.txt\n@say byok done"
        created = api.post(RUNS, json={"repository": "acme/web", "prompt": prompt, "modelId": "acme/priced",
                                       "billing": {"mode": "openrouter", "openRouterApiKey": byok}})
        assert created.status_code == 201 and byok not in created.text
        run = created.json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"})
        assert done["status"] == "idle", done["error"] and done["billingMode"] == "openrouter"
        full = api.get(f"{RUNS}/{run['id']}", params={"patch": "1", "events": "1"})
        assert byok not in full.text  # not in the run, its events or its patch (env.txt is in the patch)
        assert "env.txt" in full.json()["run"]["changedPaths"]
        assert scan_container(run["id"], byok) == 0  # not in the sandbox's environment, config or files
        calls = [r for r in upstream.requests if r["authorization"] == f"Bearer {byok}"]
        assert len(calls) == 3 and all(r["body"]["model"] == "priced-v1" for r in calls)
        # only orchestration was charged; the models were paid with the user's own key
        assert balance(billed, "ola") == pytest.approx(1 - 0.5)
        db = billed.data_dir / "critique.db"
        raw = db.read_bytes() + (db.with_name("critique.db-wal").read_bytes() if db.with_name("critique.db-wal").exists() else b"")
        assert byok.encode() not in raw  # encrypted at rest
        assert api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True}).status_code == 200
    log = (billed.base / "server.log").read_text()
    assert byok not in log
    import sqlite3

    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT byok_key FROM runs WHERE id = ?", (run["id"],)).fetchone()[0] is None


def test_byok_needs_a_key(billed: Server) -> None:
    with billed.client(billed.new_key("pat")) as api:
        resp = api.post(RUNS, json={"repository": "acme/web", "prompt": "x", "billing": {"mode": "openrouter"}})
        assert resp.status_code == 422 and resp.json()["error"]["field"] == "billing.openRouterApiKey"
