"""Secrets the server knows never leave it in output: redacted in events, patches and
validation output, refused for publishing; repository secrets reach validation commands only;
per-key rate limits."""

from __future__ import annotations

import time

import pytest

from critique_local.tokens import API_KEY_PREFIX, new_token
from tests.conftest import UPSTREAM_KEY
from tests.helpers import Server, make_repo, wait_for

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"
TOKEN_LIKE = new_token(API_KEY_PREFIX)  # one of our API keys (checksummed), unknown to the server
DEPLOY_TOKEN = "deploy-token-8f2e61c0a4b7"


def test_known_secrets_are_redacted_from_events_patch_and_validation(server: Server, alice: str) -> None:
    make_repo(server.repos, "acme/leaky", {
        ".env": f"OPENAI_KEY={UPSTREAM_KEY}\nOTHER={TOKEN_LIKE}\n",
        ".critique/test": 'echo "deploying with $DEPLOY_TOKEN"; test -n "$DEPLOY_TOKEN"\n',
    })
    server.cli("secrets", "set", "acme/leaky", "DEPLOY_TOKEN", input_text=DEPLOY_TOKEN)
    assert "DEPLOY_TOKEN" in server.cli("secrets", "list").stdout and DEPLOY_TOKEN not in server.cli(
        "secrets", "list").stdout
    api = server.client(alice)
    prompt = "@bash cat .env && cp .env leaked.txt && echo agent-env-token=${DEPLOY_TOKEN:-unset}\n@say copied"
    run = api.post(RUNS, json={"repository": "acme/leaky", "prompt": prompt, "validationMode": "tests",
                               "publish": {"mode": "draft_pr", "branch": "critique-agent/leak"}}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["status"] == "idle"
    full = api.get(f"{RUNS}/{run['id']}", params={"events": "1", "patch": "1"})
    text = full.text
    for secret in (UPSTREAM_KEY, TOKEN_LIKE, DEPLOY_TOKEN):
        assert secret not in text
    view = full.json()["run"]
    assert "+OPENAI_KEY=[REDACTED]" in view["patch"] and "+OTHER=[REDACTED]" in view["patch"]
    outputs = [e["data"]["output"] for e in view["events"] if e["data"].get("tool") == "bash" and "output" in e["data"]]
    assert "OPENAI_KEY=[REDACTED]" in outputs[-1]
    assert "agent-env-token=unset" in outputs[-1]  # repository secrets are not in the agent's environment
    # ... but validation commands get them, and their output is redacted too
    v = view["validation"]
    assert v["status"] == "passed" and "deploying with [REDACTED]" in v["outputTail"]
    # a patch carrying a secret is never pushed
    assert view["error"]["code"] == "publish_failed" and "secret" in view["error"]["message"]
    assert view["draftPullRequest"] is None
    assert UPSTREAM_KEY not in (server.base / "server.log").read_text()
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})


def test_per_key_rate_limit_answers_429_with_retry_after(fresh_server: Server) -> None:
    fresh_server.extra_env.update({"CRITIQUE_LOCAL_LIMITS_REQUESTS_PER_MINUTE": "60",
                                   "CRITIQUE_LOCAL_LIMITS_BURST": "3"})
    fresh_server.start()
    busy = fresh_server.client(fresh_server.new_key("busy"))
    calm = fresh_server.client(fresh_server.new_key("calm"))
    assert [busy.get(RUNS).status_code for _ in range(3)] == [200, 200, 200]
    limited = busy.get(RUNS)
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    retry = int(limited.headers["Retry-After"])
    assert 1 <= retry <= 60
    assert calm.get(RUNS).status_code == 200  # per key, not global
    created = busy.post(RUNS, json={"repository": "acme/web", "prompt": "x"})
    assert created.status_code == 429  # refused before anything is created
    time.sleep(retry)
    again = busy.get(RUNS)
    assert again.status_code == 200 and again.json()["data"] == []
