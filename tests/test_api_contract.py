"""The API contract a client relies on: auth, errors, validation, idempotency, listing,
OpenAPI. Runs created here are real (they execute in the session's server)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.helpers import Server

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"
OK_BODY = {"repository": "acme/web", "prompt": "@say hi"}


def error_of(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert {"code", "message"} <= set(body["error"]) <= {"code", "message", "field"}
    return dict(body["error"])


def count_runs(api: httpx.Client) -> int:
    return len(api.get(RUNS, params={"limit": 100}).json()["data"])


# ---- authentication and isolation ----------------------------------------------------------

@pytest.mark.parametrize("header", [None, "Bearer", "Bearer nope", "Basic abc", "Bearer crt_notavalidkey"])
def test_missing_or_bad_key_is_401(server: Server, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    resp = httpx.get(server.url + RUNS, headers=headers)
    assert resp.status_code == 401
    assert error_of(resp)["code"] == "unauthorized"


def test_missing_scope_is_403(server: Server) -> None:
    reader = server.new_key("reader", scopes="read:builder")
    with server.client(reader) as api:
        assert api.get(RUNS).status_code == 200
        resp = api.post(RUNS, json=OK_BODY)
        assert resp.status_code == 403 and error_of(resp)["code"] == "forbidden"
    writer = server.new_key("writer", scopes="write:builder")
    with server.client(writer) as api:
        assert api.get(RUNS).status_code == 403


def test_revoked_key_is_401(server: Server) -> None:
    key = server.new_key("temp")
    key_id = next(line.split()[0] for line in server.cli("keys", "list", "--user", "temp").stdout.splitlines())
    server.cli("keys", "revoke", key_id)
    assert httpx.get(server.url + RUNS, headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert key not in server.cli("keys", "list").stdout  # only a prefix is ever shown


def test_another_users_run_is_404_everywhere(server: Server, alice: str, bob: str) -> None:
    with server.client(alice) as api:
        run_id = api.post(RUNS, json=OK_BODY).json()["run"]["id"]
    with server.client(bob) as other:
        for path in (f"{RUNS}/{run_id}", f"{RUNS}/{run_id}?patch=1", f"{RUNS}/{run_id}/stream",
                     f"{RUNS}/{run_id}/patch"):
            resp = other.get(path)
            assert resp.status_code == 404 and error_of(resp)["code"] == "run_not_found"
        resp = other.post(f"{RUNS}/{run_id}/messages", json={"prompt": "x"})
        assert resp.status_code == 404
        assert run_id not in [r["id"] for r in other.get(RUNS).json()["data"]]


def test_keys_are_stored_only_as_hashes(server: Server, alice: str) -> None:
    assert alice.encode() not in (server.data_dir / "critique.db").read_bytes()


# ---- validation: each class of invalid input is a 422 that changes nothing -----------------

INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"repository": "acme/web"}, "prompt", "invalid_request"),
    ({"repository": "acme/web", "prompt": ""}, "prompt", "invalid_request"),
    ({"repository": "acme/web", "prompt": "x" * 120_001}, "prompt", "invalid_request"),
    ({"prompt": "x"}, "", "invalid_request"),
    ({"repository": "../etc", "prompt": "x"}, "repository", "invalid_request"),
    ({"repository": "acme/web;rm", "prompt": "x"}, "repository", "invalid_request"),
    ({"repository": "-acme/web", "prompt": "x"}, "repository", "invalid_request"),
    ({**OK_BODY, "unknownField": 1}, "unknownField", "unknown_field"),
    ({**OK_BODY, "taskKind": "deploy"}, "taskKind", "invalid_request"),
    ({**OK_BODY, "tags": ["x"] * 0 + [f"t{i}" for i in range(21)]}, "tags", "invalid_request"),
    ({**OK_BODY, "tags": ["x" * 65]}, "tags", "invalid_request"),
    ({**OK_BODY, "tags": ["  "]}, "tags", "invalid_request"),
    ({**OK_BODY, "metadata": {f"k{i}": "v" for i in range(33)}}, "metadata", "invalid_request"),
    ({**OK_BODY, "metadata": {"k": "v" * 513}}, "metadata", "invalid_request"),
    ({**OK_BODY, "metadata": {"k": 1}}, "metadata.k", "invalid_request"),
    ({**OK_BODY, "title": "t" * 201}, "title", "invalid_request"),
    ({**OK_BODY, "baseRef": "--upload-pack=evil"}, "baseRef", "invalid_request"),
    ({**OK_BODY, "baseRef": "main..HEAD"}, "baseRef", "invalid_request"),
    ({**OK_BODY, "gitCheckoutRef": "HEAD@{1}"}, "gitCheckoutRef", "invalid_request"),
    ({**OK_BODY, "modelId": "nope/never"}, "modelId", "unknown_model"),
    ({**OK_BODY, "publish": {"mode": "none", "branch": "x"}}, "publish.branch", "invalid_request"),
    ({**OK_BODY, "publish": {"mode": "draft_pr", "branch": "master"}}, "publish.branch", "protected_branch"),
    ({**OK_BODY, "publish": {"mode": "draft_pr", "branch": "main"}}, "publish.branch", "protected_branch"),
    ({**OK_BODY, "baseRef": "feature", "publish": {"mode": "draft_pr", "branch": "feature"}}, "publish.branch",
     "protected_branch"),
    ({**OK_BODY, "taskKind": "plan", "publish": {"mode": "draft_pr"}}, "publish.mode", "invalid_request"),
    ({**OK_BODY, "validationMode": "everything"}, "validationMode", "invalid_request"),
    ({**OK_BODY, "billing": {"mode": "managed", "openRouterApiKey": "sk-or-v1-x"}}, "billing.openRouterApiKey",
     "invalid_request"),
    ({**OK_BODY, "safety": {"network": {"mode": "open"}}}, "safety.network.mode", "network_mode_not_allowed"),
    ({**OK_BODY, "safety": {"network": {"mode": "none", "allowlist": ["a.com"]}}}, "safety.network.allowlist",
     "invalid_request"),
    ({**OK_BODY, "safety": {"network": {"mode": "restricted", "allowlist": ["bad host"]}}},
     "safety.network.allowlist", "invalid_request"),
    ({**OK_BODY, "safety": {"network": {"mode": "restricted", "allowlist": ["x.com"] * 101}}},
     "safety.network.allowlist", "invalid_request"),
    ({**OK_BODY, "safety": {"network": {"mode": "sideways"}}}, "safety.network.mode", "invalid_request"),
    ({**OK_BODY, "safety": {"resources": {"maxTurns": 0}}}, "safety.resources.maxTurns", "invalid_request"),
    ({**OK_BODY, "safety": {"resources": {"maxCredits": -1}}}, "safety.resources.maxCredits", "invalid_request"),
    ({**OK_BODY, "publish": {"mode": "sideways"}}, "publish.mode", "invalid_request"),
]


@pytest.mark.parametrize(("body", "field", "code"), INVALID)
def test_invalid_create_is_422_and_changes_nothing(server: Server, body: dict[str, Any], field: str,
                                                   code: str) -> None:
    key = server.new_key("validator")
    with server.client(key) as api:
        resp = api.post(RUNS, json=body)
        assert resp.status_code == 422, resp.text
        err = error_of(resp)
        assert err["code"] == code
        if field:
            assert err["field"] == field
        assert count_runs(api) == 0


def test_unknown_repository_is_404(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        resp = api.post(RUNS, json={"repository": "acme/missing", "prompt": "x"})
        assert resp.status_code == 404
        assert error_of(resp) == {"code": "repository_not_found", "message": "repository acme/missing not found",
                                  "field": "repository"}
        resp = api.post(RUNS, json={"repositoryId": "repo_nope", "prompt": "x"})
        assert resp.status_code == 404 and error_of(resp)["field"] == "repositoryId"


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1,2]", b'"text"'])
def test_non_object_body_is_400(server: Server, alice: str, raw: bytes) -> None:
    with server.client(alice) as api:
        resp = api.post(RUNS, content=raw, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400 and error_of(resp)["code"] == "bad_json"


def test_oversized_body_is_413(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        resp = api.post(RUNS, content=b'{"prompt": "' + b"x" * 2_000_000 + b'"}',
                        headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and error_of(resp)["code"] == "payload_too_large"


@pytest.mark.parametrize("query", [{"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"cursor": "abc"},
                                   {"cursor": "0022508020323246559893628"}, {"cursor": "9" * 19}])
def test_bad_list_query_is_422(server: Server, alice: str, query: dict[str, str]) -> None:
    with server.client(alice) as api:
        resp = api.get(RUNS, params=query)
        assert resp.status_code == 422 and error_of(resp)["code"] == "invalid_request"


@pytest.mark.parametrize(("params", "headers", "field"), [
    ({"after": "9" * 19}, {}, "after"),
    ({}, {"Last-Event-ID": "9" * 19}, "Last-Event-ID"),
    ({}, {"Last-Event-ID": "\u00b2"}, "Last-Event-ID"),  # a digit to str.isdigit, not an event id
])
def test_bad_stream_resume_point_is_422(server: Server, params: dict[str, str], headers: dict[str, str],
                                        field: str) -> None:
    with server.client(server.new_key("resumer")) as api:
        run = api.post(RUNS, json=OK_BODY).json()["run"]
        resp = api.get(f"{RUNS}/{run['id']}/stream", params=params,
                       headers={k: v.encode() for k, v in headers.items()})
        assert resp.status_code == 422 and error_of(resp)["field"] == field, resp.text
        api.post(f"{RUNS}/{run['id']}/cancel")


def test_unknown_route_and_method_use_the_error_envelope(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        resp = api.get("/api/v1/nothing-here")
        assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"
        resp = api.delete(RUNS)
        assert resp.status_code == 405 and error_of(resp)["code"] == "method_not_allowed"


# ---- idempotency ---------------------------------------------------------------------------

def test_same_idempotency_key_and_body_returns_the_original_run(server: Server) -> None:
    key = server.new_key("idem1")
    with server.client(key) as api:
        headers = {"Idempotency-Key": "intake-bug-742"}
        first = api.post(RUNS, json=OK_BODY, headers=headers)
        again = api.post(RUNS, json=OK_BODY, headers=headers)
        assert first.status_code == 201 and again.status_code == 200
        assert first.json()["run"]["id"] == again.json()["run"]["id"]
        changed = api.post(RUNS, json={**OK_BODY, "prompt": "@say other"}, headers=headers)
        assert changed.status_code == 422 and error_of(changed)["code"] == "idempotency_key_reused"
        assert count_runs(api) == 1
    # keys are per user: another user may use the same key
    with server.client(server.new_key("idem2")) as other:
        assert other.post(RUNS, json=OK_BODY, headers=headers).status_code == 201


def test_concurrent_duplicates_create_exactly_one_run(server: Server) -> None:
    key = server.new_key("idem3")

    def post(_: int) -> httpx.Response:
        with server.client(key) as api:
            return api.post(RUNS, json=OK_BODY, headers={"Idempotency-Key": "race"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    assert sorted(r.status_code for r in responses) == [200] * 7 + [201]
    assert len({r.json()["run"]["id"] for r in responses}) == 1
    with server.client(key) as api:
        assert count_runs(api) == 1


# ---- listing ---------------------------------------------------------------------------------

def test_list_is_newest_first_with_a_cursor(server: Server) -> None:
    key = server.new_key("lister")
    with server.client(key) as api:
        ids = [api.post(RUNS, json={**OK_BODY, "title": f"r{i}"}).json()["run"]["id"] for i in range(3)]
        page1 = api.get(RUNS, params={"limit": 2}).json()
        assert [r["id"] for r in page1["data"]] == [ids[2], ids[1]]
        assert page1["nextCursor"]
        page2 = api.get(RUNS, params={"limit": 2, "cursor": page1["nextCursor"]}).json()
        assert [r["id"] for r in page2["data"]] == [ids[0]] and page2["nextCursor"] is None


# ---- discovery -------------------------------------------------------------------------------

def test_models_list_includes_the_scripted_model(server: Server, alice: str) -> None:
    with server.client(alice) as api:
        for path in ("/api/v1/coding-agent/models", "/api/v1/models"):
            ids = [m["id"] for m in api.get(path).json()["data"]]
            assert "critique/scripted" in ids


def test_openapi_covers_every_route_and_model(server: Server) -> None:
    from critique_local.api.openapi import all_routes

    doc = httpx.get(server.url + "/api/v1/openapi.json").json()
    assert doc["openapi"] == "3.1.0"
    for route in all_routes():
        assert route.method.lower() in doc["paths"][route.path], route.path
    schemas = doc["components"]["schemas"]
    create = schemas["CreateRunRequest"]["properties"]
    for field in ("repository", "repositoryFullName", "repositoryId", "prompt", "modelId", "taskKind", "baseRef",
                  "gitCheckoutRef", "validationMode", "publish", "billing", "title", "tags", "metadata", "safety"):
        assert field in create, field
    run = schemas["RunView"]["properties"]
    for field in ("lifecycle", "terminal", "awaitingFollowUp", "canFollowUp", "nextActions", "sessionActive",
                  "sessionExpiresAt", "turnCount", "intent", "diffStats", "statusUrl", "streamUrl", "validation",
                  "draftPullRequest"):
        assert field in run, field
    pr = schemas["DraftPullRequestView"]["properties"]
    assert {"number", "url", "branch", "headSha", "baseRef", "state"} <= set(pr)
    validation = schemas["ValidationView"]["properties"]
    assert {"mode", "command", "exitCode", "passed", "durationMs", "outputTail"} <= set(validation)
    assert {"validation", "publish"} <= set(schemas["TurnView"]["properties"])
    assert "awaiting_follow_up" in doc["info"]["description"]


def test_healthz(server: Server) -> None:
    assert httpx.get(server.url + "/healthz").json()["ok"] is True
