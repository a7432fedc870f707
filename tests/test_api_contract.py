"""The API contract a client relies on: auth, errors, validation, idempotency, listing,
OpenAPI, and the lifecycle of runs that need no sandbox (queued, cancelled). In process: the
real application from ``create_app`` on loopback, without the half that executes runs (no
Docker), so runs created here stay queued; running them is end-to-end (tests/e2e/)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient

from critique_local.api.routes import PUBLIC_ROUTES
from tests.conftest import SAMPLE_FILES
from tests.helpers import ROOT, make_repo
from tests.inprocess import app_client, new_key, settings_for

pytestmark = pytest.mark.asyncio(loop_scope="module")
RUNS = "/api/v1/coding-agent/runs"
OK_BODY = {"repository": "acme/web", "prompt": "@say hi"}


@dataclass
class Contract:
    """One application for the module, like a server clients share."""

    app_client: TestClient
    base: Path

    @property
    def url(self) -> str:
        return str(self.app_client.make_url("")).rstrip("/")

    def client(self, key: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)

    async def new_key(self, user: str, scopes: str | None = None) -> str:
        wanted = tuple(scopes.split(",")) if scopes else ("read:builder", "write:builder", "inference")
        return await new_key(self.app_client, user, wanted)

    async def cli(self, *args: str) -> str:
        """``critique-local ARGS`` on this application's database, as an operator runs it."""
        env = {**os.environ, "CRITIQUE_LOCAL_SERVER_DATA_DIR": str(self.base / "data")}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "critique_local", *args, cwd=ROOT, env=env,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Contract]:
    base = tmp_path_factory.mktemp("contract")
    make_repo(base / "repos", "acme/web", SAMPLE_FILES, branches={"feature": {"FEATURE.md": "on feature\n"}})
    async with app_client(settings_for(base)) as client:
        yield Contract(client, base)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def alice(server: Contract) -> str:
    return await server.new_key("alice")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def bob(server: Contract) -> str:
    return await server.new_key("bob")


def error_of(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert {"code", "message"} <= set(body["error"]) <= {"code", "message", "field"}
    return dict(body["error"])


async def count_runs(api: httpx.AsyncClient) -> int:
    return len((await api.get(RUNS, params={"limit": 100})).json()["data"])


# ---- authentication and isolation ----------------------------------------------------------

@pytest.mark.parametrize("header", [None, "Bearer", "Bearer nope", "Basic abc", "Bearer crt_notavalidkey"])
async def test_missing_or_bad_key_is_401(server: Contract, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    async with server.client(None) as anonymous:
        resp = await anonymous.get(RUNS, headers=headers)
    assert resp.status_code == 401
    assert error_of(resp)["code"] == "unauthorized"


async def test_missing_scope_is_403(server: Contract) -> None:
    reader = await server.new_key("reader", scopes="read:builder")
    async with server.client(reader) as api:
        assert (await api.get(RUNS)).status_code == 200
        resp = await api.post(RUNS, json=OK_BODY)
        assert resp.status_code == 403 and error_of(resp)["code"] == "forbidden"
    writer = await server.new_key("writer", scopes="write:builder")
    async with server.client(writer) as api:
        assert (await api.get(RUNS)).status_code == 403


async def test_revoked_key_is_401(server: Contract) -> None:
    key = await server.new_key("temp")
    key_id = next(line.split()[0] for line in (await server.cli("keys", "list", "--user", "temp")).splitlines())
    await server.cli("keys", "revoke", key_id)
    async with server.client(key) as api:
        assert (await api.get(RUNS)).status_code == 401
    assert key not in await server.cli("keys", "list")  # only a prefix is ever shown


async def test_another_users_run_is_404_everywhere(server: Contract, alice: str, bob: str) -> None:
    async with server.client(alice) as api:
        run_id = (await api.post(RUNS, json=OK_BODY)).json()["run"]["id"]
    async with server.client(bob) as other:
        for path in (f"{RUNS}/{run_id}", f"{RUNS}/{run_id}?patch=1", f"{RUNS}/{run_id}/stream",
                     f"{RUNS}/{run_id}/patch"):
            resp = await other.get(path)
            assert resp.status_code == 404 and error_of(resp)["code"] == "run_not_found"
        resp = await other.post(f"{RUNS}/{run_id}/messages", json={"prompt": "x"})
        assert resp.status_code == 404
        assert run_id not in [r["id"] for r in (await other.get(RUNS)).json()["data"]]


async def test_keys_are_stored_only_as_hashes(server: Contract, alice: str) -> None:
    assert alice.encode() not in (server.base / "data" / "critique.db").read_bytes()


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
async def test_invalid_create_is_422_and_changes_nothing(server: Contract, body: dict[str, Any], field: str,
                                                   code: str) -> None:
    key = await server.new_key("validator")
    async with server.client(key) as api:
        resp = await api.post(RUNS, json=body)
        assert resp.status_code == 422, resp.text
        err = error_of(resp)
        assert err["code"] == code
        if field:
            assert err["field"] == field
        assert await count_runs(api) == 0


async def test_unknown_repository_is_404(server: Contract, alice: str) -> None:
    async with server.client(alice) as api:
        resp = await api.post(RUNS, json={"repository": "acme/missing", "prompt": "x"})
        assert resp.status_code == 404
        assert error_of(resp) == {"code": "repository_not_found", "message": "repository acme/missing not found",
                                  "field": "repository"}
        resp = await api.post(RUNS, json={"repositoryId": "repo_nope", "prompt": "x"})
        assert resp.status_code == 404 and error_of(resp)["field"] == "repositoryId"


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1,2]", b'"text"'])
async def test_non_object_body_is_400(server: Contract, alice: str, raw: bytes) -> None:
    async with server.client(alice) as api:
        resp = await api.post(RUNS, content=raw, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400 and error_of(resp)["code"] == "bad_json"


async def test_oversized_body_is_413(server: Contract, alice: str) -> None:
    async with server.client(alice) as api:
        resp = await api.post(RUNS, content=b'{"prompt": "' + b"x" * 2_000_000 + b'"}',
                        headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and error_of(resp)["code"] == "payload_too_large"


@pytest.mark.parametrize("query", [{"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"cursor": "abc"},
                                   {"cursor": "0022508020323246559893628"}, {"cursor": "9" * 19}])
async def test_bad_list_query_is_422(server: Contract, alice: str, query: dict[str, str]) -> None:
    async with server.client(alice) as api:
        resp = await api.get(RUNS, params=query)
        assert resp.status_code == 422 and error_of(resp)["code"] == "invalid_request"


@pytest.mark.parametrize(("params", "headers", "field"), [
    ({"after": "9" * 19}, {}, "after"),
    ({}, {"Last-Event-ID": "9" * 19}, "Last-Event-ID"),
    ({}, {"Last-Event-ID": "\u00b2"}, "Last-Event-ID"),  # a digit to str.isdigit, not an event id
])
async def test_bad_stream_resume_point_is_422(server: Contract, params: dict[str, str], headers: dict[str, str],
                                        field: str) -> None:
    async with server.client(await server.new_key("resumer")) as api:
        run = (await api.post(RUNS, json=OK_BODY)).json()["run"]
        resp = await api.get(f"{RUNS}/{run['id']}/stream", params=params,
                       headers={k: v.encode() for k, v in headers.items()})
        assert resp.status_code == 422 and error_of(resp)["field"] == field, resp.text
        await api.post(f"{RUNS}/{run['id']}/cancel")


async def test_unknown_route_and_method_use_the_error_envelope(server: Contract, alice: str) -> None:
    async with server.client(alice) as api:
        resp = await api.get("/api/v1/nothing-here")
        assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"
        resp = await api.delete(RUNS)
        assert resp.status_code == 405 and error_of(resp)["code"] == "method_not_allowed"
        assert set(resp.headers["Allow"].split(", ")) >= {"GET", "POST"}  # RFC 9110: a 405 says what is


async def test_head_answers_every_get_route_without_a_body(server: Contract, alice: str) -> None:
    async with server.client(alice) as api:
        for path in ("/healthz", RUNS):
            got, head = await api.get(path), await api.request("HEAD", path)
            assert head.status_code == got.status_code == 200 and head.content == b""
            assert head.headers["Content-Type"] == got.headers["Content-Type"]


# ---- idempotency ---------------------------------------------------------------------------

async def test_same_idempotency_key_and_body_returns_the_original_run(server: Contract) -> None:
    key = await server.new_key("idem1")
    async with server.client(key) as api:
        headers = {"Idempotency-Key": "intake-bug-742"}
        first = await api.post(RUNS, json=OK_BODY, headers=headers)
        again = await api.post(RUNS, json=OK_BODY, headers=headers)
        assert first.status_code == 201 and again.status_code == 200
        assert first.json()["run"]["id"] == again.json()["run"]["id"]
        changed = await api.post(RUNS, json={**OK_BODY, "prompt": "@say other"}, headers=headers)
        assert changed.status_code == 422 and error_of(changed)["code"] == "idempotency_key_reused"
        assert await count_runs(api) == 1
    # keys are per user: another user may use the same key
    async with server.client(await server.new_key("idem2")) as other:
        assert (await other.post(RUNS, json=OK_BODY, headers=headers)).status_code == 201


async def test_concurrent_duplicates_create_exactly_one_run(server: Contract) -> None:
    key = await server.new_key("idem3")

    async def post() -> httpx.Response:
        async with server.client(key) as api:
            return await api.post(RUNS, json=OK_BODY, headers={"Idempotency-Key": "race"})

    responses = await asyncio.gather(*(post() for _ in range(8)))
    assert sorted(r.status_code for r in responses) == [200] * 7 + [201]
    assert len({r.json()["run"]["id"] for r in responses}) == 1
    async with server.client(key) as api:
        assert await count_runs(api) == 1


# ---- listing ---------------------------------------------------------------------------------

async def test_list_is_newest_first_with_a_cursor(server: Contract) -> None:
    key = await server.new_key("lister")
    async with server.client(key) as api:
        ids = [(await api.post(RUNS, json={**OK_BODY, "title": f"r{i}"})).json()["run"]["id"] for i in range(3)]
        page1 = (await api.get(RUNS, params={"limit": 2})).json()
        assert [r["id"] for r in page1["data"]] == [ids[2], ids[1]]
        assert page1["nextCursor"]
        page2 = (await api.get(RUNS, params={"limit": 2, "cursor": page1["nextCursor"]})).json()
        assert [r["id"] for r in page2["data"]] == [ids[0]] and page2["nextCursor"] is None


# ---- discovery -------------------------------------------------------------------------------

async def test_models_list_includes_the_scripted_model(server: Contract, alice: str) -> None:
    async with server.client(alice) as api:
        for path in ("/api/v1/coding-agent/models", "/api/v1/models"):
            ids = [m["id"] for m in (await api.get(path)).json()["data"]]
            assert "critique/scripted" in ids


async def test_openapi_covers_every_route_and_model(server: Contract) -> None:
    async with server.client(None) as anonymous:
        doc = (await anonymous.get("/api/v1/openapi.json")).json()
    assert doc["openapi"] == "3.1.0"
    for route in PUBLIC_ROUTES:
        if route.tag == "ui":  # the web page is not API (tests/test_web_ui.py)
            continue
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


async def test_healthz(server: Contract) -> None:
    async with server.client(None) as anonymous:
        assert (await anonymous.get("/healthz")).json()["ok"] is True


# ---- lifecycle without a sandbox: queued and cancelled runs ----------------------------------

async def test_a_new_run_is_queued_and_cancelling_it_is_final(server: Contract) -> None:
    async with server.client(await server.new_key("canceller")) as api:
        created = await api.post(RUNS, json=OK_BODY)
        run = created.json()["run"]
        assert created.status_code == 201 and run["status"] == "queued" and run["lifecycle"] == "queued"
        assert run["statusUrl"] == f"{server.url}{RUNS}/{run['id']}"
        url = f"{RUNS}/{run['id']}"
        busy = await api.post(f"{url}/messages", json={"prompt": "more"})
        assert busy.status_code == 409 and error_of(busy)["code"] == "turn_in_progress"
        busy = await api.post(f"{url}/messages", json={"endSession": True})
        assert busy.status_code == 409 and error_of(busy)["code"] == "turn_in_progress"
        assert error_of(await api.get(f"{url}/patch"))["code"] == "patch_not_found"
        cancelled = await api.post(f"{url}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["run"]["status"] == "cancelled"
        assert cancelled.json()["run"]["terminal"] is True
        again = await api.post(f"{url}/cancel")  # idempotent
        assert again.status_code == 200 and again.json()["run"]["status"] == "cancelled"
        late = await api.post(f"{url}/messages", json={"prompt": "more"})
        assert late.status_code == 409 and error_of(late)["code"] == "run_terminal"
        # the stream of an ended run replays its events and closes
        async with api.stream("GET", f"{url}/stream") as stream:
            assert stream.status_code == 200
            text = (await stream.aread()).decode()
        assert text.count("event: run.status") == 2 and '"status": "cancelled"' in text
        got = (await api.get(url, params={"events": "1"})).json()["run"]
        assert [e["data"]["status"] for e in got["events"] if e["event"] == "run.status"] == ["queued", "cancelled"]


async def test_missing_runs_are_404_on_every_route(server: Contract, alice: str) -> None:
    async with server.client(alice) as api:
        for method, path in (("GET", f"{RUNS}/run_missing"), ("GET", f"{RUNS}/run_missing/patch"),
                             ("GET", f"{RUNS}/run_missing/stream"), ("POST", f"{RUNS}/run_missing/cancel"),
                             ("POST", f"{RUNS}/run_missing/messages")):
            resp = await api.request(method, path, json={"prompt": "x"} if path.endswith("messages") else None)
            assert resp.status_code == 404 and error_of(resp)["code"] == "run_not_found", path
