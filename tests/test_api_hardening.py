"""Hostile requests against the real application, in process (no Docker: nothing here starts a
sandbox): bodies whose validation would cost more than linear time, JSON nested too deep,
headers that are not UTF-8, slow bodies, and the rate limit of every route that costs
something. Each is a clean 4xx that changes nothing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from critique_local.appkeys import SERVICES
from critique_local.services import Services
from tests.helpers import make_repo
from tests.inprocess import app_client, new_key, settings_for

RUNS = "/api/v1/coding-agent/runs"
OK_BODY = {"repository": "acme/web", "prompt": "@say hi"}


@dataclass
class Api:
    client: TestClient
    services: Services
    alice: str
    bob: str

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.alice}"}

    async def runs_of(self, key: str) -> int:
        resp = await self.client.get(RUNS, params={"limit": "100"}, headers=self.auth(key))
        return len((await resp.json())["data"])

    async def raw(self, request: bytes, read_timeout_s: float = 30) -> tuple[int, dict[str, Any]]:
        """Send raw bytes (headers that are not UTF-8, say); the status and JSON body."""
        reader, writer = await asyncio.open_connection(self.client.host, self.client.port)
        try:
            writer.write(request)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), read_timeout_s)
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    make_repo(tmp_path / "repos", "acme/web", {"README.md": "# web\n"})
    settings = settings_for(tmp_path, CRITIQUE_LOCAL_LIMITS_REQUESTS_PER_MINUTE="60", CRITIQUE_LOCAL_LIMITS_BURST="8",
                            CRITIQUE_LOCAL_LIMITS_REQUEST_BODY_TIMEOUT_S="1")
    async with app_client(settings) as client:  # runs are accepted and stay queued
        yield Api(client, client.app[SERVICES], await new_key(client, "alice"), await new_key(client, "bob"))


def error_of(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    return dict(body["error"])


async def test_sixty_thousand_tags_are_refused_by_count_before_any_per_tag_work(api: Api) -> None:
    tags = [f"t{i}" for i in range(60_000)]
    body = json.dumps({**OK_BODY, "tags": tags})
    assert len(body) > 400_000  # under limits.max_body_bytes, like the red team's request
    started = time.monotonic()
    resp = await api.client.post(RUNS, data=body, headers={**api.auth(), "Content-Type": "application/json"})
    elapsed = time.monotonic() - started
    err = error_of(await resp.json())
    assert resp.status == 422 and err["field"] == "tags" and "20" in err["message"]
    # quadratic de-duplication took 48 s here; linear validation takes milliseconds (a bound
    # 100x above that, so the machine's speed does not decide the outcome)
    assert elapsed < 10, elapsed
    assert await api.runs_of(api.alice) == 0


async def test_many_metadata_keys_and_duplicate_tags(api: Api) -> None:
    resp = await api.client.post(RUNS, json={**OK_BODY, "metadata": {f"k{i}": "v" for i in range(60_000)}},
                                 headers=api.auth())
    assert resp.status == 422 and error_of(await resp.json())["field"] == "metadata"
    resp = await api.client.post(RUNS, json={**OK_BODY, "tags": [" CI ", "ci", "Owner:Platform", "ci"]},
                                 headers=api.auth())
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["run"]["tags"] == ["ci", "owner:platform"]


@pytest.mark.parametrize("depth", [65, 1000, 100_000])
async def test_json_nested_too_deep_is_400_on_every_body(api: Api, depth: int) -> None:
    created = await api.client.post(RUNS, json=OK_BODY, headers=api.auth())
    run_id = (await created.json())["run"]["id"]
    deep = "[" * depth + "]" * depth
    bodies = {
        RUNS: '{"repository": "acme/web", "prompt": "x", "metadata": ' + deep + "}",
        f"{RUNS}/{run_id}/messages": '{"prompt": ' + deep + "}",
        "/api/v1/chat/completions": '{"model": "critique/scripted", "messages": [{"role": "user", "content": '
                                    + deep + "}]}",
    }
    for path, body in bodies.items():
        resp = await api.client.post(path, data=body, headers={**api.auth(), "Content-Type": "application/json"})
        err = error_of(await resp.json())
        assert resp.status == 400 and err["code"] == "bad_json" and "deep" in err["message"], (path, err)
    assert await api.runs_of(api.alice) == 1


async def test_nesting_within_the_limit_still_works(api: Api) -> None:
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(20):  # a tool schema nested 40 levels deep is fine
        schema = {"type": "object", "properties": {"x": schema}}
    resp = await api.client.post("/api/v1/chat/completions", headers=api.auth(), json={
        "model": "critique/scripted", "messages": [{"role": "user", "content": "@say fine"}],
        "tools": [{"type": "function", "function": {"name": "t", "parameters": schema}}]})
    assert resp.status == 200, await resp.text()


async def test_headers_that_are_not_utf8_are_4xx(api: Api) -> None:
    body = json.dumps(OK_BODY).encode()

    def request(headers: bytes) -> bytes:
        return (b"POST " + RUNS.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
                + headers + b"\r\n" + body)

    status, reply = await api.raw(request(b"Authorization: Bearer crt_\xff\xfe\xc3\x28abcdefghijklmnopqrstuvwxyz\r\n"))
    assert status == 401 and error_of(reply)["code"] == "unauthorized"
    status, reply = await api.raw(request(b"Authorization: Bearer " + api.alice.encode() + b"\r\n"
                                          b"Idempotency-Key: key-\xff\xfe-\xc0\xaf\r\n"))
    assert status == 422 and error_of(reply)["field"] == "Idempotency-Key"
    assert await api.runs_of(api.alice) == 0


async def test_a_body_that_never_finishes_is_408(api: Api) -> None:
    head = (b"POST " + RUNS.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + api.alice.encode() + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"repository\": ")
    status, reply = await api.raw(head, read_timeout_s=30)  # limits.request_body_timeout_s = 1
    assert status == 408 and error_of(reply)["code"] == "request_timeout"
    assert await api.runs_of(api.alice) == 0


@pytest.mark.parametrize("method,path", [("POST", "/api/v1/chat/completions"), ("GET", "/api/v1/models")])
async def test_the_rate_limit_covers_the_gateway_and_the_model_list(api: Api, method: str, path: str) -> None:
    payload = {"model": "critique/scripted", "messages": [{"role": "user", "content": "@say hi"}]}

    async def call(key: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        resp = await api.client.request(method, path, headers=api.auth(key),
                                        json=payload if method == "POST" else None)
        return resp.status, await resp.json(), dict(resp.headers)

    statuses = [(await call(api.alice))[0] for _ in range(8)]  # limits.burst = 8
    assert statuses == [200] * 8
    status, body, headers = await call(api.alice)
    assert status == 429 and error_of(body)["code"] == "rate_limited" and int(headers["Retry-After"]) >= 1
    assert (await call(api.bob))[0] == 200  # per key
