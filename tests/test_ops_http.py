"""In-process: /readyz answers 503 naming what failed, /metrics stays off the public port
without metrics.token and needs it when set, request ids, and audit rows for refused actions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from critique_local.app import make_services, public_app
from critique_local.config import load_settings
from critique_local.gateway.upstream import Upstream
from critique_local.hoststate import HostState
from critique_local.redact import Redactor
from critique_local.runs.scheduler import Scheduler
from critique_local.sandboxes.factory import make_backend
from critique_local.services import Services
from critique_local.store import audit
from critique_local.store.db import Database
from critique_local.store.keys import create_key
from critique_local.webhooks import Webhooks

RUNS = "/api/v1/coding-agent/runs"


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[tuple[TestClient, Services, str]]:
    settings = load_settings(None, environ={"CRITIQUE_LOCAL_SERVER_DATA_DIR": str(tmp_path / "data")})
    db = await Database.open(settings.db_path)
    claim = HostState(tmp_path / "host").claim("0123456789abcdef", tmp_path / "data")
    services = make_services(settings, db, make_backend(settings, claim), Redactor())  # backend never started
    services.hub.observers.append(services.metrics.observe)
    upstream, webhooks = Upstream(), Webhooks(db, services.box, settings.webhooks)
    key, _ = await create_key(db, "alice", ("read:builder", "write:builder"))
    async with TestClient(TestServer(public_app(services, Scheduler(services), upstream, webhooks))) as client:
        yield client, services, key
    await webhooks.aclose()
    await upstream.aclose()
    await services.hosts.aclose()
    await db.close()
    claim.release()


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
