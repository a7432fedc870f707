"""Listener limits in process, on loopback: the connection budget (total and per peer), the
request-head deadline (slowloris) that never cuts a request being handled, and the rate limit
on repeated log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from critique_local.api.ratelimit import RateLimiter
from critique_local.app import claim_instance, create_app, runner_for
from critique_local.appkeys import DB, GUARD
from critique_local.config import Settings
from critique_local.listeners import ConnectionBudget, ConnectionGuard, GuardedSite
from critique_local.logfilter import RepeatFilter
from critique_local.store.keys import create_key
from tests.inprocess import settings_for

HEAD_TIMEOUT_S = 1.0
CLOSE_BOUND_S = 20.0  # generous: the deadline is 1 s; this only bounds a loaded machine


class Listener:
    def __init__(self, url: str, key: str, budget: ConnectionBudget) -> None:
        self.url = url
        self.key = key
        self.budget = budget
        host, _, port = url.removeprefix("http://").rpartition(":")
        self.host, self.port = host, int(port)


@pytest.fixture
async def listener(tmp_path: Path) -> AsyncIterator[Listener]:
    settings: Settings = settings_for(tmp_path, CRITIQUE_LOCAL_LIMITS_REQUEST_HEAD_TIMEOUT_S=str(HEAD_TIMEOUT_S))
    claim = await asyncio.to_thread(claim_instance, settings)
    app = create_app(settings, claim, execute_runs=False)
    guard = app[GUARD]
    budget = guard.budget = ConnectionBudget("test", total=60, per_peer=40)  # small, to reach in a test
    runner = runner_for(app, settings)
    await runner.setup()
    site = GuardedSite(runner, "127.0.0.1", 0, guard)
    await site.start()
    port = runner.addresses[0][1]
    key, _ = await create_key(app[DB], "alice", ("read:builder", "inference"))
    yield Listener(f"http://127.0.0.1:{port}", key, budget)
    await runner.cleanup()
    claim.release()


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection (EOF or reset) within the bound."""
    try:
        while await asyncio.wait_for(reader.read(65536), CLOSE_BOUND_S):
            pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def test_partial_heads_are_closed_while_the_api_keeps_answering(listener: Listener) -> None:
    conns = [await asyncio.open_connection(listener.host, listener.port) for _ in range(30)]
    for _, writer in conns:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
        await writer.drain()
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=listener.url) as client:
        assert (await client.get("/healthz")).status_code == 200  # others are served meanwhile
    results = await asyncio.gather(*(_closed(reader) for reader, _ in conns))
    assert all(results), results.count(False)
    assert time.monotonic() - started < CLOSE_BOUND_S
    for _, writer in conns:
        writer.close()
    await asyncio.sleep(0.2)
    assert listener.budget.open <= 1  # every slot came back


async def test_idle_connections_that_send_nothing_are_closed_too(listener: Listener) -> None:
    reader, writer = await asyncio.open_connection(listener.host, listener.port)
    assert await _closed(reader)
    writer.close()


async def test_a_request_being_handled_outlives_the_head_deadline(listener: Listener) -> None:
    async with httpx.AsyncClient(base_url=listener.url, headers={"Authorization": f"Bearer {listener.key}"},
                                 timeout=30) as client:
        started = time.monotonic()
        resp = await client.post("/api/v1/chat/completions", json={
            "model": "critique/scripted", "messages": [{"role": "user", "content": "@sleep 3\n@say late"}],
            "tools": [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]})
        assert resp.status_code == 200, resp.text
        assert time.monotonic() - started >= 3 * HEAD_TIMEOUT_S  # the model stalled past the deadline
        assert resp.json()["choices"][0]["message"]["content"] == "late"
        # keep-alive: the same connection takes the next request
        assert (await client.get("/healthz")).status_code == 200


async def test_the_budget_caps_connections_per_peer_and_answers_503(listener: Listener) -> None:
    held = [await asyncio.open_connection(listener.host, listener.port) for _ in range(40)]  # per_peer = 40
    await asyncio.sleep(0.2)
    reader, writer = await asyncio.open_connection(listener.host, listener.port)
    reply = await asyncio.wait_for(reader.read(), CLOSE_BOUND_S)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and json.loads(body)["error"]["code"] == "too_many_connections"
    writer.close()
    for _, w in held:
        w.close()
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(base_url=listener.url) as client:
        assert (await client.get("/healthz")).status_code == 200  # slots are released


async def test_the_total_cap_holds_for_many_peers() -> None:
    budget = ConnectionBudget("test", total=3, per_peer=0)
    assert [budget.take(f"10.0.0.{i}") for i in range(3)] == [None, None, None]
    assert budget.take("10.0.0.9") is not None and budget.open == 3
    budget.release("10.0.0.0")
    assert budget.take("10.0.0.9") is None and budget.from_peer("10.0.0.9") == 1


def test_repeated_log_lines_are_rate_limited() -> None:
    now = [0.0]
    repeat = RepeatFilter(burst=3, window_s=60, clock=lambda: now[0])

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, args, None)

    passed = [repeat.filter(record("socket.accept() out of system resource")) for _ in range(10_000)]
    assert passed.count(True) == 3
    assert repeat.filter(record("a different error %s", 1))  # other kinds are not affected
    assert [repeat.filter(record("refused %s", f"10.0.0.{i}")) for i in range(5)].count(True) == 3  # one template
    now[0] = 61.0
    again = record("socket.accept() out of system resource")
    assert repeat.filter(again) and "9997 similar messages suppressed" in again.getMessage()


async def test_guarded_site_serves_plain_apps() -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    guard = ConnectionGuard(ConnectionBudget("plain", total=10), HEAD_TIMEOUT_S)
    app = web.Application(middlewares=[guard.middleware])
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await GuardedSite(runner, "127.0.0.1", 0, guard).start()
    try:
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{runner.addresses[0][1]}/")).text == "hi"
    finally:
        await runner.cleanup()


def test_connection_caps_fit_the_open_files_limit() -> None:
    code = ("import resource; from critique_local.listeners import fit_to_open_files, FD_RESERVE\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
            "public, sandbox = fit_to_open_files(1024, 1024)\n"
            "print(public, sandbox, resource.getrlimit(resource.RLIMIT_NOFILE)[0], FD_RESERVE)")

    def run(soft: int, hard: int) -> list[int]:
        out = subprocess.run([sys.executable, "-c", code.format(soft=soft, hard=hard)], capture_output=True,
                             text=True, check=True).stdout
        return [int(x) for x in out.split()]

    public, sandbox, soft, reserve = run(1024, 8192)  # raised to fit
    assert (public, sandbox) == (1024, 1024) and soft >= public + 2 * sandbox + reserve
    public, sandbox, soft, reserve = run(900, 900)  # cannot be raised: the caps shrink instead
    assert public < 1024 and sandbox < 1024 and public + 2 * sandbox + reserve <= soft == 900


async def test_requests_per_peer_are_rate_limited_before_the_handler_runs() -> None:
    calls = 0

    async def hello(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(text="hi")

    guard = ConnectionGuard(ConnectionBudget("sandbox-facing", total=10, per_peer=5), HEAD_TIMEOUT_S,
                            RateLimiter(per_minute=60, burst=3))
    app = web.Application(middlewares=[guard.middleware])
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await GuardedSite(runner, "127.0.0.1", 0, guard).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runner.addresses[0][1]}") as client:
            statuses = [(await client.get("/")).status_code for _ in range(5)]
            limited = await client.get("/")
    finally:
        await runner.cleanup()
    assert statuses[:3] == [200, 200, 200] and set(statuses[3:]) == {429} and calls == 3
    assert limited.json()["error"]["code"] == "rate_limited" and "Retry-After" in limited.headers
