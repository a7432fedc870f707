"""Sandbox tokens reach the model gateway only for their own run, only while it lives, and only
on the sandbox-facing listener (which serves nothing but the gateway)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import Server, wait_for

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"


PROBE = r'''@write probe.py
import json, os, urllib.request, urllib.error
gw = json.loads(os.environ["OPENCODE_CONFIG_CONTENT"])["provider"]["critique"]["options"]["baseURL"]
tok = os.environ["CRITIQUE_GATEWAY_TOKEN"]
def call(path, body=None):
    req = urllib.request.Request(gw + path, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": "Bearer " + tok, "Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=60).status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception as e:
        return type(e).__name__
out = {"models": call("/models"),
       "other_model": call("/chat/completions", {"model": "acme/coder-large", "messages": [{"role": "user", "content": "x"}]}),
       "runs_api": call("/coding-agent/runs"),
       "token_reversed": tok[::-1]}  # the token itself would be redacted from the event
open("probe.json", "w").write(json.dumps(out))
@end
@bash python3 probe.py && cat probe.json && rm probe.py probe.json
@say probed
'''


def test_sandbox_token_is_confined_to_its_run_and_its_lifetime(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": PROBE}).json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"})
        assert done["status"] == "idle", done["error"]
        events = api.get(f"{RUNS}/{run['id']}", params={"events": "1"}).json()["run"]["events"]
        assert api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True}).status_code == 200
    output = next(e["data"]["output"] for e in events if e["data"].get("tool") == "bash" and "output" in e["data"])
    probe = json.loads(output.strip().splitlines()[-1])
    assert probe["models"] == 200
    assert probe["other_model"] == 403  # only the run's own model
    assert probe["runs_api"] == 404  # the sandbox-facing listener serves only the gateway
    token = probe["token_reversed"][::-1]
    assert token.startswith("crs_") and token not in output
    # once the run is over, its token opens nothing
    resp = httpx.post(server.url + "/api/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                      json={"model": "critique/scripted", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 401
    assert done["changedPaths"] == []
