"""run.status webhooks: Standard Webhooks signatures, retries after receiver failures, and
deliveries that survive a server crash."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Server, wait_for

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"


class Receiver:
    """A loopback webhook endpoint that answers 500 until ``healthy`` is set."""

    def __init__(self) -> None:
        self.healthy = False
        self.received: list[dict[str, Any]] = []
        self.failures = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            if not self.healthy:
                self.failures += 1
                return web.Response(status=500)
            self.received.append({"headers": dict(request.headers), "body": body})
            return web.Response(status=204)

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            app = web.Application()
            app.router.add_post("/hook", hook)
            runner = web.AppRunner(app)
            self._runner = runner
            self._loop.run_until_complete(runner.setup())
            self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
            self.port = runner.addresses[0][1]
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The Standard Webhooks check, written from the spec (not with our own signing code)."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(sig.split(",", 1)[1] == expected for sig in headers["webhook-signature"].split())


def deliveries(api: httpx.Client, run_id: str, done: Callable[[list[dict[str, Any]]], bool],
               timeout_s: float = 120) -> list[dict[str, Any]]:
    """The run's webhook deliveries, once ``done`` holds for them."""
    deadline = time.monotonic() + timeout_s
    while not done(found := api.get(f"{RUNS}/{run_id}/webhook-deliveries").json()["data"]):
        assert time.monotonic() < deadline, found
        time.sleep(0.1)
    return list(found)


METRICS = "webhook-test-metrics-token-0123"


def scrape(server: Server) -> dict[str, float]:
    """/metrics through prometheus-client's own parser: ``name{label="v"}`` -> value."""
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {METRICS}"}).text
    return {s.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_signed_deliveries_retry_and_survive_a_crash(fresh_server: Server) -> None:
    receiver = Receiver()
    fresh_server.extra_env.update({
        "CRITIQUE_LOCAL_WEBHOOKS_ALLOWED_HOSTS": '["127.0.0.1"]',
        "CRITIQUE_LOCAL_WEBHOOKS_RETRY_BASE_S": "0.3", "CRITIQUE_LOCAL_WEBHOOKS_RETRY_MAX_S": "1",
        "CRITIQUE_LOCAL_WEBHOOKS_POLL_INTERVAL_S": "0.2", "CRITIQUE_LOCAL_METRICS_TOKEN": METRICS})
    fresh_server.start()
    key = fresh_server.new_key("hank")
    secret = fresh_server.cli("webhooks", "secret", "--user", "hank").stdout.strip().splitlines()[-1]
    assert secret.startswith("whsec_")
    url = f"http://127.0.0.1:{receiver.port}/hook"
    with fresh_server.client(key) as api:
        refused = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say x",
                                       "webhook": {"url": "http://example.invalid/hook"}})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "webhook_not_allowed"
        run = api.post(RUNS, json={"repository": "acme/web", "prompt": "@say hooked",
                                   "webhook": {"url": url}}).json()["run"]
        wait_for(api, run["id"], {"idle"})
        # every status so far is delivered, refused (500) and retried: wait for it, however slow the machine
        pending = deliveries(api, run["id"], lambda ds: [d["status"] for d in ds] == ["queued", "running", "idle"]
                             and all(d["lastStatusCode"] == 500 and d["attempts"] >= 2 for d in ds))
        assert all(d["state"] == "pending" for d in pending) and receiver.failures >= 6
        found = scrape(fresh_server)
        assert found['critique_webhook_delivery_attempts_total{outcome="retry"}'] >= 6
        assert found['critique_webhook_deliveries{state="pending"}'] >= 3
    fresh_server.kill()  # deliveries are rows in SQLite: nothing is lost
    receiver.healthy = True
    fresh_server.start()
    with fresh_server.client(key) as api:
        delivered = deliveries(api, run["id"], lambda ds: len(ds) >= 3 and all(d["state"] == "delivered" for d in ds))
        assert all(d["attempts"] >= 2 for d in delivered) and len(receiver.received) >= 3
        api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})  # (or its session expired already)
        deliveries(api, run["id"], lambda ds: len(ds) == 4 and all(d["state"] == "delivered" for d in ds))
        found = scrape(fresh_server)  # counters of this server's life; gauges from the database
        assert found['critique_webhook_delivery_attempts_total{outcome="delivered"}'] == 4
        assert found['critique_webhook_deliveries{state="delivered"}'] == 4
    assert len(receiver.received) == 4
    statuses = []
    for got in receiver.received:
        headers = {k.lower(): v for k, v in got["headers"].items()}
        assert verify(secret, headers, got["body"])
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 600  # seconds, of the attempt
        body = json.loads(got["body"])
        assert body["type"] == "run.status" and body["data"]["runId"] == run["id"]
        statuses.append(body["data"]["status"])
    assert sorted(statuses) == sorted(["queued", "running", "idle", "completed"])
    assert not verify("whsec_" + base64.b64encode(b"x" * 24).decode(), headers, got["body"])
    receiver.stop()
