"""``/api/mcp`` in process (runs stay queued), driven by the official MCP SDK client over HTTP:
the protocol revision, tool schemas taken from the REST models, and every odd input a client can
send (bad arguments, huge prompts, unknown run ids, unknown tools, wrong scopes, another user's
run, malformed requests) answered cleanly: a tool error with our code, or an HTTP error body.
The run-executing half (progress, patch, follow-up, end) is tests/e2e/test_mcp.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from aiohttp.test_utils import TestClient
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import LATEST_PROTOCOL_VERSION, CallToolResult
from mcp_types.version import LATEST_HANDSHAKE_VERSION

from critique_local.api.mcp import TOOLS
from critique_local.api.schemas import CreateRunRequest, ListRunsQuery, MessageRequest, ModelList, RunEnvelope, RunList
from critique_local.appkeys import SERVICES
from critique_local.runs import mcp_servers
from critique_local.store import runs as store
from tests.conftest import SAMPLE_FILES
from tests.helpers import make_repo
from tests.inprocess import app_client, new_key, settings_for

SECRET = "mcp-header-secret-4e7b1d"
BYOK = "sk-or-v1-mcp-byok-0123456789abcdef"


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[TestClient]:
    make_repo(tmp_path / "repos", "acme/web", SAMPLE_FILES)
    async with app_client(settings_for(tmp_path)) as client:
        yield client


@asynccontextmanager
async def connect(app: TestClient, key: str, mode: str = "auto") -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=httpx2.Timeout(30))
    async with http, Client(streamable_http_client(str(app.make_url("/api/mcp")), http_client=http),
                            mode=mode) as client:  # type: ignore[arg-type]
        yield client


def structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None and result.content[0].type == "text"
    return dict(result.structured_content)


def error_of(result: CallToolResult) -> dict[str, Any]:
    """The REST error body of a tool error, checked to be in its text too."""
    assert result.is_error, result
    assert result.structured_content is not None and set(result.structured_content) == {"error"}
    err = dict(result.structured_content["error"])
    assert result.content[0].text == f"{err['code']}: {err['message']}"  # type: ignore[union-attr]
    return err


async def test_the_current_protocol_revision_and_the_2025_handshake(app: TestClient) -> None:
    key = await new_key(app, "alice")
    async with connect(app, key) as client:
        assert client.protocol_version == LATEST_PROTOCOL_VERSION == "2026-07-28"
        assert client.server_info is not None and client.server_info.name == "critique-local"
        assert {t.name for t in (await client.list_tools()).tools} == set(TOOLS)
    async with connect(app, key, mode="legacy") as client:
        assert client.protocol_version == LATEST_HANDSHAKE_VERSION
        assert {t.name for t in (await client.list_tools()).tools} == set(TOOLS)


async def test_tool_schemas_are_the_rest_models(app: TestClient) -> None:
    """Input schemas are the REST request models' plus the tool's own fields; output schemas are
    the REST response models', and every structured result validates against its model."""
    async with connect(app, await new_key(app, "alice")) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}

    def props(model: type[Any], mode: str = "validation") -> dict[str, Any]:
        return dict(model.model_json_schema(by_alias=True, mode=mode)["properties"])

    def inputs(name: str) -> dict[str, Any]:
        return dict(tools[name].input_schema["properties"])

    create = inputs("create_run")
    assert {k: v for k, v in create.items() if k != "waitSeconds"} == props(CreateRunRequest)
    assert tools["create_run"].input_schema["required"] == ["prompt"]
    assert tools["create_run"].input_schema["additionalProperties"] is False
    assert set(inputs("send_message")) == set(props(MessageRequest)) | {"runId", "waitSeconds"}
    assert inputs("send_message")["prompt"] == props(MessageRequest)["prompt"]
    assert inputs("list_runs") == props(ListRunsQuery)
    assert set(inputs("get_run")) == {"runId", "includePatch", "includeEvents", "waitSeconds"}
    assert inputs("create_run")["waitSeconds"]["maximum"] == 1800
    for name, model in {"create_run": RunEnvelope, "get_run": RunEnvelope, "send_message": RunEnvelope,
                        "end_session": RunEnvelope, "cancel_run": RunEnvelope, "list_runs": RunList,
                        "list_models": ModelList}.items():
        assert tools[name].output_schema == model.model_json_schema(by_alias=True, mode="serialization"), name
    read_only = {name for name, t in tools.items() if t.annotations and t.annotations.read_only_hint}
    assert read_only == {"get_run", "list_runs", "list_models"}


async def test_tools_answer_with_structured_content_and_text(app: TestClient) -> None:
    async with connect(app, await new_key(app, "alice")) as client:
        models = await client.call_tool("list_models", {})
        assert "critique/scripted" in [m.id for m in ModelList.model_validate(structured(models)).data]
        assert "critique/scripted: " in models.content[0].text  # type: ignore[union-attr]

        created = await client.call_tool("create_run", {"repository": "acme/web", "prompt": "@say hi",
                                                        "title": "from MCP", "tags": ["MCP"]})
        run = RunEnvelope.model_validate(structured(created)).run
        assert (run.status, run.title, run.tags) == ("queued", "from MCP", ["mcp"])
        assert created.content[0].text.startswith(f"Run {run.id}: queued")  # type: ignore[union-attr]

        listed = await client.call_tool("list_runs", {"limit": 1})
        page = RunList.model_validate(structured(listed))
        assert [r.id for r in page.data] == [run.id] and page.next_cursor is None
        assert listed.content[0].text == f"{run.id}: queued (queued) from MCP"  # type: ignore[union-attr]

        got = RunEnvelope.model_validate(structured(await client.call_tool("get_run", {"runId": run.id})))
        assert got.run.id == run.id and got.run.patch is None

        cancelled = structured(await client.call_tool("cancel_run", {"runId": run.id}))["run"]
        assert cancelled["status"] == "cancelled"
        again = structured(await client.call_tool("cancel_run", {"runId": run.id}))["run"]
        assert again["status"] == "cancelled"  # idempotent, as in REST
        assert error_of(await client.call_tool("end_session", {"runId": run.id}))["code"] == "run_terminal"
        assert error_of(await client.call_tool("send_message", {"runId": run.id, "prompt": "more"}))["code"] \
            == "run_terminal"


ODD: list[tuple[str, dict[str, Any], str, str | None]] = [  # tool, arguments, error code, field
    ("create_run", {"repository": "acme/web"}, "invalid_request", "prompt"),
    ("create_run", {"repository": "acme/web", "prompt": ""}, "invalid_request", "prompt"),
    ("create_run", {"repository": "acme/web", "prompt": "x" * 120_001}, "invalid_request", "prompt"),
    ("create_run", {"repository": "acme/web", "prompt": "hi", "waitSeconds": 1801}, "invalid_request",
     "waitSeconds"),
    ("create_run", {"repository": "acme/web", "prompt": "hi", "waitSeconds": "soon"}, "invalid_request",
     "waitSeconds"),
    ("create_run", {"repository": "acme/web", "prompt": "hi", "surprise": 1}, "unknown_field", "surprise"),
    ("create_run", {"repository": "acme/web", "prompt": ["not", "text"]}, "invalid_request", "prompt"),
    ("create_run", {"repository": "acme/nope", "prompt": "hi"}, "repository_not_found", "repository"),
    ("create_run", {"repository": "acme/web", "prompt": "hi", "modelId": "no/such-model"}, "unknown_model",
     "modelId"),
    ("create_run", {"repository": "acme/web", "prompt": "hi", "mcpServers": {"docs": {"url": "https://x.example/"}}},
     "mcp_servers_need_network", "mcpServers"),
    ("get_run", {}, "invalid_request", "runId"),
    ("get_run", {"runId": ""}, "invalid_request", "runId"),
    ("get_run", {"runId": "run_" + "x" * 200}, "invalid_request", "runId"),
    ("get_run", {"runId": "run_doesnotexist"}, "run_not_found", None),
    ("get_run", {"runId": "run_doesnotexist", "waitSeconds": 5}, "run_not_found", None),
    ("get_run", {"runId": "run_x", "includePatch": "maybe"}, "invalid_request", "includePatch"),
    ("send_message", {"runId": "run_doesnotexist", "prompt": "hi"}, "run_not_found", None),
    ("end_session", {"runId": "run_doesnotexist"}, "run_not_found", None),
    ("cancel_run", {"runId": "run_doesnotexist"}, "run_not_found", None),
    ("list_runs", {"limit": 0}, "invalid_request", "limit"),
    ("list_runs", {"cursor": "abc"}, "invalid_request", "cursor"),
    ("list_models", {"extra": True}, "unknown_field", "extra"),
    ("no_such_tool", {}, "invalid_request", "name"),
]


async def test_odd_arguments_are_tool_errors_with_our_codes(app: TestClient) -> None:
    async with connect(app, await new_key(app, "alice")) as client:
        for tool, arguments, code, field in ODD:
            err = error_of(await client.call_tool(tool, arguments))
            assert (err["code"], err.get("field")) == (code, field), (tool, arguments, err)
            assert "x" * 100 not in err["message"]  # the input is not echoed back at length
        assert structured(await client.call_tool("list_runs", {}))["data"] == []  # nothing was created


async def test_scopes_and_ownership(app: TestClient) -> None:
    alice, bob = await new_key(app, "alice"), await new_key(app, "bob")
    reader = await new_key(app, "alice", ("read:builder",))
    async with connect(app, alice) as client:
        run = structured(await client.call_tool("create_run", {"repository": "acme/web", "prompt": "hi"}))["run"]

    async with connect(app, reader) as client:
        for tool, args in [("create_run", {"repository": "acme/web", "prompt": "hi"}),
                           ("send_message", {"runId": run["id"], "prompt": "more"}),
                           ("end_session", {"runId": run["id"]}), ("cancel_run", {"runId": run["id"]})]:
            err = error_of(await client.call_tool(tool, args))
            assert err["code"] == "forbidden" and "write:builder" in err["message"], tool
        assert structured(await client.call_tool("get_run", {"runId": run["id"]}))["run"]["status"] == "queued"
        assert structured(await client.call_tool("list_models", {}))["data"]

    async with connect(app, bob) as client:  # alice's run does not exist for bob
        for tool, args in [("get_run", {"runId": run["id"], "includePatch": True}),
                           ("send_message", {"runId": run["id"], "prompt": "more"}),
                           ("end_session", {"runId": run["id"]}), ("cancel_run", {"runId": run["id"]})]:
            assert error_of(await client.call_tool(tool, args)) == {"code": "run_not_found",
                                                                     "message": "run not found"}, tool
        assert structured(await client.call_tool("list_runs", {}))["data"] == []

    async with connect(app, alice) as client:
        assert structured(await client.call_tool("get_run", {"runId": run["id"]}))["run"]["status"] == "queued"


async def test_auth_failures_and_malformed_requests_are_http_errors(app: TestClient) -> None:
    url = str(app.make_url("/api/mcp"))
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    accept = {"Accept": "application/json, text/event-stream"}
    inference = await new_key(app, "alice", ("inference",))
    alice = await new_key(app, "alice")
    as_alice = {**accept, "Authorization": f"Bearer {alice}"}
    async with httpx.AsyncClient(timeout=30) as http:
        for headers, status, code in [(accept, 401, "unauthorized"),
                                      ({**accept, "Authorization": "Bearer crt_nope"}, 401, "unauthorized"),
                                      ({**accept, "Authorization": f"Bearer {inference}"}, 403, "forbidden"),
                                      ({"Accept": "application/json", "Authorization": f"Bearer {alice}"}, 406,
                                       "not_acceptable")]:
            resp = await http.post(url, json=listing, headers=headers)
            assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), resp.text
        resp = await http.post(url, content=b"{", headers={**as_alice, "Content-Type": "application/json"})
        assert (resp.status_code, resp.json()["error"]["code"]) == (400, "bad_json")
        resp = await http.post(url, json=[listing], headers=as_alice)
        assert (resp.status_code, resp.json()["error"]["code"]) == (400, "bad_json")
        resp = await http.post(url, content=b"x", headers={**as_alice, "Content-Type": "text/plain"})
        assert (resp.status_code, resp.json()["error"]["code"]) == (415, "unsupported_media_type")
        resp = await http.post(url, content=b" " * 2_000_000, headers={**as_alice, "Content-Type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
        resp = await http.get(url, headers=as_alice)
        assert resp.status_code == 405 and "POST" in resp.headers["Allow"]

    # through the SDK client: a body over limits.max_body_bytes is the HTTP 413 above, which the
    # client raises as an error of its own (no hang, no half-created run)
    async with connect(app, alice) as client:
        with pytest.raises(MCPError):
            await client.call_tool("create_run", {"repository": "acme/web", "prompt": "x" * 2_000_000})
        assert structured(await client.call_tool("list_runs", {}))["data"] == []


async def test_create_run_keeps_secrets_as_sent(app: TestClient) -> None:
    """A BYOK key and mcpServers headers given to create_run are sealed as sent (a JSON dump of
    the tool's arguments would turn them into "**********"), shown nowhere, and deleted when the
    run ends."""
    async with connect(app, await new_key(app, "alice")) as client:
        result = await client.call_tool("create_run", {
            "repository": "acme/web", "prompt": "@say hi", "billing": {"mode": "openrouter", "openRouterApiKey": BYOK},
            "safety": {"network": {"mode": "restricted", "allowlist": ["mcp.example.com"]}},
            "mcpServers": {"docs": {"url": "https://mcp.example.com/mcp",
                                    "headers": {"Authorization": f"Bearer {SECRET}"}}}})
        run = structured(result)["run"]
        shown = str(result.content) + str(result.structured_content)
        shown += str((await client.call_tool("get_run", {"runId": run["id"], "includeEvents": True})).content)
    assert SECRET not in shown and BYOK not in shown
    s = app.app[SERVICES]
    sealed = await store.mcp_headers(s.db, run["id"])
    assert sealed is not None and SECRET not in sealed
    assert mcp_servers.open_headers(s.box, run["id"], sealed) == {"docs": {"Authorization": f"Bearer {SECRET}"}}
    byok = await store.byok_key(s.db, run["id"])
    assert byok is not None and s.box.open(byok, run["id"]) == BYOK

    async with connect(app, await new_key(app, "alice")) as client:  # the run ends: its secrets go with it
        ended = await client.call_tool("cancel_run", {"runId": run["id"]})
    assert structured(ended)["run"]["status"] == "cancelled"
    assert await store.mcp_headers(s.db, run["id"]) is None and await store.byok_key(s.db, run["id"]) is None
