"""In-process: the audit trail has the MCP endpoint's tool calls that start or change runs
(whatever their outcome) and forks, attributed to the key's user; and /readyz names a database
that cannot answer (the other checks' failures: tests/e2e/test_readiness.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest
from aiohttp.test_utils import TestClient
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult

from critique_local.appkeys import SERVICES
from critique_local.services import Services
from critique_local.store import audit
from tests.helpers import make_repo
from tests.inprocess import app_client, new_key, settings_for

RUNS = "/api/v1/coding-agent/runs"


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[tuple[TestClient, Services, str]]:
    """The application in process (runs are accepted and stay queued), alice's key."""
    make_repo(tmp_path / "repos", "acme/web", {"README.md": "# web\n"})
    async with app_client(settings_for(tmp_path)) as client:
        yield client, client.app[SERVICES], await new_key(client, "alice", ("read:builder", "write:builder"))


async def test_mcp_tools_and_forks_are_in_the_audit_trail(app: tuple[TestClient, Services, str]) -> None:
    client, services, key = app
    reader = await new_key(client, "bob", ("read:builder",))
    url = str(client.make_url("/api/mcp"))

    async def call(api_key: str, tool: str, args: dict[str, object]) -> CallToolResult:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
        async with http, Client(streamable_http_client(url, http_client=http)) as mcp:  # type: ignore[arg-type]
            return await mcp.call_tool(tool, args)

    created = await call(key, "create_run", {"repository": "acme/web", "prompt": "@say hi"})
    assert not created.is_error, created.content
    run_id = (created.structured_content or {})["run"]["id"]
    assert not (await call(key, "cancel_run", {"runId": run_id})).is_error
    assert (await call(key, "send_message", {"runId": "run_nope", "prompt": "more"})).is_error
    assert (await call(reader, "create_run", {"repository": "acme/web", "prompt": "@say hi"})).is_error
    assert not (await call(key, "get_run", {"runId": run_id})).is_error  # reads are not audited
    fork = await client.post(f"{RUNS}/{run_id}/fork", json={"turn": 1}, headers={"Authorization": f"Bearer {key}"})
    assert fork.status in (409, 422), await fork.text()  # the run never ran a turn: nothing to fork
    rows = list(reversed(await audit.entries(services.db)))
    assert [(r.action, r.outcome, r.http_status, r.user, r.run_id, r.detail.get("via")) for r in rows] == [
        ("run.create", "ok", 200, "alice", run_id, "mcp"),
        ("run.cancel", "ok", 200, "alice", run_id, "mcp"),
        ("run.follow_up", "run_not_found", 404, "alice", "run_nope", "mcp"),
        ("run.create", "forbidden", 403, "bob", None, "mcp"),
        ("run.fork", (await fork.json())["error"]["code"], fork.status, "alice", run_id, None)]
    assert rows[0].detail == {"via": "mcp", "repository": "acme/web", "modelId": "critique/scripted"}
    assert rows[0].key_prefix and key.startswith(rows[0].key_prefix)


async def test_readyz_names_a_database_that_cannot_answer(app: tuple[TestClient, Services, str]) -> None:
    client, services, _ = app
    await services.db.close()  # the connection is gone
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 503 and body["checks"]["database"].startswith("failed: ")
    assert body["error"]["message"].startswith("database failed: ")
    assert (await client.get("/healthz")).status == 200
