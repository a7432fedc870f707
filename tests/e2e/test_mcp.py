"""``/api/mcp`` driven by the official MCP SDK client over HTTP, as Claude Code or Cursor would:
list the tools, start a scripted run and wait with progress, read the patch, follow up, end the
session; the same keys, scopes and ownership as the REST API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import LATEST_PROTOCOL_VERSION, CallToolResult
from mcp_types.version import LATEST_HANDSHAKE_VERSION

from tests.helpers import Server

pytestmark = pytest.mark.e2e

TOOLS = {"create_run", "get_run", "list_runs", "send_message", "end_session", "cancel_run", "list_models"}


@asynccontextmanager
async def mcp_client(server: Server, key: str, mode: str = "auto") -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=httpx2.Timeout(30, read=600))
    async with http, Client(streamable_http_client(f"{server.url}/api/mcp", http_client=http),
                            mode=mode) as client:  # type: ignore[arg-type]
        yield client


def structured(result: CallToolResult) -> dict[str, Any]:
    assert result.structured_content is not None
    return dict(result.structured_content)


def error_of(result: CallToolResult) -> dict[str, Any]:
    assert result.is_error, result
    err = structured(result)["error"]
    assert f"{err['code']}: " in result.content[0].text  # type: ignore[union-attr]
    return dict(err)


async def test_a_run_through_mcp(server: Server, alice: str) -> None:
    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    async with mcp_client(server, alice) as client:
        assert client.protocol_version == LATEST_PROTOCOL_VERSION  # the current revision (stateless envelope)
        listing = await client.list_tools()
        tools = {t.name: t for t in listing.tools}
        assert set(tools) == TOOLS
        create = tools["create_run"]
        assert {"prompt", "repository", "modelId", "waitSeconds"} <= set(create.input_schema["properties"])
        assert create.output_schema is not None and "run" in create.output_schema["properties"]
        assert "includePatch" in tools["get_run"].input_schema["properties"]

        models = structured(await client.call_tool("list_models", {}))
        assert "critique/scripted" in [m["id"] for m in models["data"]]

        script = "@write mcp_note.txt\nhanded over by MCP\n@end\n@say wrote the note"
        result = await client.call_tool("create_run", {
            "repository": "acme/web", "prompt": script, "modelId": "critique/scripted", "waitSeconds": 600},
            progress_callback=on_progress)
        assert not result.is_error, result.content
        run = structured(result)["run"]
        assert run["status"] == "idle" and run["summary"] == "wrote the note"
        assert f"Run {run['id']}: idle" in result.content[0].text  # type: ignore[union-attr]
        messages = [m for _, m in progress]
        assert "run running (agent_running)" in messages, messages
        assert any(m and m.startswith("run idle (") for m in messages), messages
        assert any(m and m.startswith("tool: write") for m in messages)
        values = [v for v, _ in progress]
        assert values == sorted(values) and len(set(values)) == len(values)  # event ids: increasing

        got = structured(await client.call_tool("get_run", {"runId": run["id"], "includePatch": True}))["run"]
        assert "+handed over by MCP" in got["patch"] and got["patchEncoding"] == "utf-8"

        progress.clear()
        follow = await client.call_tool("send_message", {
            "runId": run["id"], "prompt": "@write second.txt\nturn two\n@end\n@say second turn", "waitSeconds": 600},
            progress_callback=on_progress)
        again = structured(follow)["run"]
        assert again["id"] == run["id"] and again["status"] == "idle" and again["turnCount"] == 2
        assert again["summary"] == "second turn"
        assert progress and all(v > max(e["id"] for e in got.get("events") or [{"id": 0}]) for v, _ in progress)

        listed = structured(await client.call_tool("list_runs", {"limit": 5}))
        assert run["id"] in [r["id"] for r in listed["data"]]

        ended = structured(await client.call_tool("end_session", {"runId": run["id"]}))["run"]
        assert ended["status"] == "completed" and ended["sessionEndReason"] == "end_session"
        assert error_of(await client.call_tool("end_session", {"runId": run["id"]}))["code"] == "run_terminal"


async def test_keys_scopes_and_ownership(server: Server, alice: str, bob: str) -> None:
    endpoint = f"{server.url}/api/mcp"
    init = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {"Accept": "application/json, text/event-stream"}
    inference_only = server.new_key("alice", "inference")
    async with httpx.AsyncClient() as http:
        missing = await http.post(endpoint, json=init, headers=headers)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        bad = await http.post(endpoint, json=init, headers={**headers, "Authorization": "Bearer crt_nope"})
        assert bad.status_code == 401
        denied = await http.post(endpoint, json=init, headers={**headers, "Authorization": f"Bearer {inference_only}"})
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"

    reader = server.new_key("alice", "read:builder")
    async with mcp_client(server, reader) as client:
        refused = error_of(await client.call_tool("create_run", {"repository": "acme/web", "prompt": "hi"}))
        assert refused["code"] == "forbidden" and "write:builder" in refused["message"]

    async with mcp_client(server, alice) as client:
        invalid = error_of(await client.call_tool("create_run", {"repository": "acme/web", "prompt": ""}))
        assert invalid["code"] == "invalid_request" and invalid["field"] == "prompt"
        unknown = error_of(await client.call_tool("create_run", {"repository": "acme/nope", "prompt": "hi"}))
        assert unknown["code"] == "repository_not_found"
        started = structured(await client.call_tool("create_run", {
            "repository": "acme/web", "prompt": "@sleep 30\n@say late", "modelId": "critique/scripted"}))["run"]
        assert started["status"] in ("queued", "running")

    async with mcp_client(server, bob, mode="legacy") as client:  # the 2025 handshake, as most clients speak
        assert client.protocol_version == LATEST_HANDSHAKE_VERSION
        assert {t.name for t in (await client.list_tools()).tools} == TOOLS
        hidden = error_of(await client.call_tool("get_run", {"runId": started["id"]}))
        assert hidden == {"code": "run_not_found", "message": "run not found"}
        assert error_of(await client.call_tool("cancel_run", {"runId": started["id"]}))["code"] == "run_not_found"

    progress: list[str | None] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message)

    async with mcp_client(server, alice, mode="legacy") as client:
        cancelled = structured(await client.call_tool("cancel_run", {"runId": started["id"]}))["run"]
        assert cancelled["status"] == "cancelled"
        # waiting with progress on the 2025 handshake: the call returns once the turn has ended,
        # and the last progress message is that outcome
        quick = structured(await client.call_tool("create_run", {
            "repository": "acme/web", "prompt": "@say quick", "modelId": "critique/scripted"}))["run"]
        waited = structured(await client.call_tool("get_run", {"runId": quick["id"], "waitSeconds": 600},
                                                   progress_callback=on_progress))["run"]
        assert waited["status"] not in ("queued", "running")
        assert progress and progress[-1] == f"run {waited['status']} ({waited['lifecycle']})", progress
