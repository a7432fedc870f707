"""In-process: /readyz answers 503 naming what failed, /metrics stays off the public port
without metrics.token and needs it when set, request ids, and audit rows for refused actions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from critique_local.appkeys import SERVICES
from critique_local.services import Services
from critique_local.store import audit
from tests.inprocess import app_client, new_key, settings_for

RUNS = "/api/v1/coding-agent/runs"


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[tuple[TestClient, Services, str]]:
    """The application in process; its sandbox backend is never started (no engine for /readyz)."""
    async with app_client(settings_for(tmp_path)) as client:
        yield client, client.app[SERVICES], await new_key(client, "alice", ("read:builder", "write:builder"))


async def test_readyz_is_503_and_names_the_engine_that_is_not_there(app: tuple[TestClient, Services, str]) -> None:
    client, _, _ = app
    resp = await client.get("/readyz")
    body = await resp.json()
    assert resp.status == 503
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["sandbox_engine"].startswith("failed: ") and body["checks"]["sandbox_image"].startswith("failed")
    assert body["error"]["code"] == "not_ready" and "sandbox_engine failed" in body["error"]["message"]
    assert "database" not in body["error"]["message"]
    assert (await client.get("/healthz")).status == 200  # liveness is unaffected


async def test_metrics_on_the_public_port_only_with_the_operator_token(app: tuple[TestClient, Services, str]) -> None:
    client, services, key = app
    assert (await client.get("/metrics")).status == 404  # default: not served here
    services.settings.metrics.token = "operator-token-0123"
    assert (await client.get("/metrics", headers={"Authorization": f"Bearer {key}"})).status == 401
    resp = await client.get("/metrics", headers={"Authorization": "Bearer operator-token-0123"})
    assert resp.status == 200
    names = {f.name for f in text_string_to_metric_families(await resp.text())}
    assert {"critique_runs", "critique_turns_started", "critique_gateway_calls", "critique_sandboxes",
            "critique_webhook_deliveries", "critique_egress_decisions"} <= names


async def test_request_ids_and_refused_actions_in_the_audit_trail(app: tuple[TestClient, Services, str]) -> None:
    client, services, key = app
    auth = {"Authorization": f"Bearer {key}"}
    bad = await client.post(RUNS, json={"repository": "acme/web"}, headers={**auth, "X-Request-Id": "abc-123"})
    assert bad.status == 422 and bad.headers["X-Request-Id"] == "abc-123"
    odd = await client.get("/healthz", headers={"X-Request-Id": "no spaces allowed"})
    assert odd.headers["X-Request-Id"] != "no spaces allowed" and len(odd.headers["X-Request-Id"]) == 16
    missing = await client.post(f"{RUNS}/run_nope/cancel", headers=auth)
    assert missing.status == 404
    anonymous = await client.post(RUNS, json={})
    assert anonymous.status == 401
    rows = list(reversed(await audit.entries(services.db)))
    assert [(r.action, r.outcome, r.http_status, r.user, r.run_id) for r in rows] == [
        ("run.create", "invalid_request", 422, "alice", None),
        ("run.cancel", "run_not_found", 404, "alice", "run_nope"),
        ("run.create", "unauthorized", 401, "", None)]
    assert rows[0].key_prefix and key.startswith(rows[0].key_prefix)
