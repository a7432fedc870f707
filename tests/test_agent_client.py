"""The OpenCode client against a hostile server on loopback (what an agent can put in place of
OpenCode): replies too large, too slow, of the wrong shape, nested too deep or compressed, and
event streams with oversized, malformed and endless events. Each ends in a bounded AgentError
or a skipped event, never unbounded memory, a hang or a crash."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from critique_local.agent.opencode.client import HEALTH_CALL_S, MAX_EVENT_BYTES, MAX_REPLY_BYTES, OpenCodeClient
from critique_local.errors import AgentError


@pytest.fixture
async def hostile() -> AsyncIterator[tuple[OpenCodeClient, dict[str, object]]]:
    mode: dict[str, object] = {}
    stop = asyncio.Event()

    async def message(request: web.Request) -> web.StreamResponse:
        kind = mode["message"]
        if kind == "huge":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(b'{"parts": [{"type": "text", "text": "')
            chunk = b"x" * 1_000_000
            for _ in range(MAX_REPLY_BYTES // len(chunk) * 4):
                await resp.write(chunk)
            return resp
        if kind == "trickle":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            while not stop.is_set():
                await resp.write(b" ")
                await asyncio.sleep(0.2)
            return resp
        if kind == "deep":
            return web.Response(text="[" * 100_000 + "]" * 100_000, content_type="application/json")
        if kind == "list":
            return web.json_response([1, 2, 3])
        if kind == "gzip":
            bomb = gzip.compress(b" " * 200_000_000)
            return web.Response(body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        return web.json_response({"info": {}, "parts": [{"type": "text", "text": "ok"}]})

    async def session(request: web.Request) -> web.Response:
        return web.json_response(mode["session"])

    async def health(request: web.Request) -> web.Response:
        if mode.get("health_hangs", 0):  # opencode serve 1.18 can leave a check sent while it starts unanswered
            mode["health_hangs"] = int(str(mode["health_hangs"])) - 1
            await stop.wait()
        await asyncio.sleep(float(str(mode.get("health_delay_s", 0))))
        return web.json_response(mode["health"])

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"type": "server.connected"}\n\n')
        await resp.write(b"data: " + b"x" * (MAX_EVENT_BYTES + 10) + b"\n\n")  # oversized
        await resp.write(b"data: [1, 2]\n\n")  # not an object
        await resp.write(b"data: " + b"[" * 50_000 + b"]" * 50_000 + b"\n\n")  # nested too deep
        await resp.write(b'data: {"type": "session.idle"}\n\n')
        await resp.write(b"data: " + b"y" * 30_000_000)  # a line that never ends
        await stop.wait()
        return resp

    app = web.Application()
    app.router.add_post("/session/{id}/message", message)
    app.router.add_post("/session", session)
    app.router.add_get("/global/health", health)
    app.router.add_get("/event", events)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    client = OpenCodeClient(f"http://127.0.0.1:{runner.addresses[0][1]}", {})
    yield client, mode
    stop.set()
    await client.aclose()
    await runner.cleanup()


async def _prompt(client: OpenCodeClient, timeout_s: float = 60) -> dict[str, object]:
    return await client.prompt("ses_1", "hi", provider_id="p", model_id="m", agent="build", timeout_s=timeout_s)


async def test_a_reply_larger_than_the_cap_is_an_agent_error(hostile: tuple[OpenCodeClient, dict[str, object]]) -> None:
    client, mode = hostile
    mode["message"] = "huge"
    with pytest.raises(AgentError, match="larger than") as err:
        await _prompt(client)
    assert err.value.code == "agent_error"


async def test_a_reply_that_trickles_forever_ends_at_the_deadline(
        hostile: tuple[OpenCodeClient, dict[str, object]]) -> None:
    client, mode = hostile
    mode["message"] = "trickle"
    started = time.monotonic()
    with pytest.raises(AgentError, match="Timeout") as err:
        await _prompt(client, timeout_s=2)  # bytes keep coming: only a whole-call deadline ends it
    assert err.value.code == "agent_unreachable" and time.monotonic() - started < 30


@pytest.mark.parametrize("kind", ["deep", "list", "gzip"])
async def test_replies_of_the_wrong_shape_are_agent_errors(hostile: tuple[OpenCodeClient, dict[str, object]],
                                                           kind: str) -> None:
    client, mode = hostile
    mode["message"] = kind
    with pytest.raises(AgentError):
        await _prompt(client)


async def test_sessions_and_health_of_the_wrong_shape(hostile: tuple[OpenCodeClient, dict[str, object]]) -> None:
    client, mode = hostile
    for bad in ([], {"id": 5}, {"id": "x" * 1000}, "ses"):
        mode["session"] = bad
        with pytest.raises(AgentError, match="session id"):
            await client.create_session("t")
    for bad in ([], {"healthy": "yes"}, None):
        mode["health"] = bad
        with pytest.raises(AgentError) as err:
            await client.wait_healthy(1.0)
        assert err.value.code == "agent_start_timeout"
    mode["session"] = {"id": "ses_ok"}
    assert await client.create_session("t") == "ses_ok"


async def test_the_event_stream_skips_what_it_cannot_bound(hostile: tuple[OpenCodeClient, dict[str, object]]) -> None:
    client, _ = hostile
    seen: list[object] = []
    idle = asyncio.Event()

    async def read() -> None:
        async for event in client.events():
            seen.append(event.get("type"))
            if event.get("type") == "session.idle":
                idle.set()

    task = asyncio.create_task(read())
    await asyncio.wait_for(idle.wait(), 30)
    await asyncio.sleep(1)  # the endless line is being read meanwhile
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["server.connected", "session.idle"]
    assert client.dropped_events == 3
    assert json.dumps(seen)  # nothing odd was yielded


async def test_a_health_check_left_unanswered_is_retried_without_waiting_out_the_long_limit(
        hostile: tuple[OpenCodeClient, dict[str, object]]) -> None:
    """The first check hangs forever, as OpenCode's can when sent during its start; the next is
    answered. The wait must not sit out HEALTH_CALL_S (10 s) on the hung one."""
    client, mode = hostile
    mode["health"], mode["health_hangs"] = {"healthy": True}, 1
    started = time.monotonic()
    await client.wait_healthy(60)
    assert time.monotonic() - started < HEALTH_CALL_S
    assert mode["health_hangs"] == 0


async def test_a_slow_health_answer_still_counts(hostile: tuple[OpenCodeClient, dict[str, object]]) -> None:
    """A loaded machine may take seconds to answer; a check is not abandoned for a newer one."""
    client, mode = hostile
    mode["health"], mode["health_delay_s"] = {"healthy": True}, 2.0
    await client.wait_healthy(30)


async def test_health_checks_that_always_hang_end_at_the_deadline(
        hostile: tuple[OpenCodeClient, dict[str, object]]) -> None:
    client, mode = hostile
    mode["health"], mode["health_hangs"] = {"healthy": True}, 1000
    with pytest.raises(AgentError) as err:
        await client.wait_healthy(3)
    assert err.value.code == "agent_start_timeout"
