"""The web page's server side, in process (the page itself is driven in a real browser by
tests/e2e/test_web_ui.py): the shell and its assets with a strict CSP and cache headers, the
list filters the page uses, the CSRF guarantee, and an event stream whose client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from critique_local.appkeys import SERVICES
from critique_local.runs.states import Phase, RunStatus
from critique_local.store import runs as store
from critique_local.ui import web as ui
from tests.helpers import make_repo
from tests.inprocess import app_client, new_key, settings_for

RUNS = "/api/v1/coding-agent/runs"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    make_repo(tmp_path / "repos", "acme/web", {"README.md": "# web\n"})
    make_repo(tmp_path / "repos", "acme/api", {"README.md": "# api\n"})
    async with app_client(settings_for(tmp_path)) as c:  # runs are accepted and stay queued
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_shell_has_a_strict_csp_no_inline_script_and_nothing_from_elsewhere(client: TestClient) -> None:
    resp = await client.get("/ui/")
    assert resp.status == 200 and resp.content_type == "text/html"
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff" and resp.headers["Cache-Control"] == "no-cache"
    html = await resp.text()
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S)
    assert scripts and all(body.strip() == "" for body in scripts)  # every script is a file
    assert not re.search(r"\son[a-z]+\s*=", html)  # no inline event handlers
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing fetched from another host
    assert "sessionStorage" not in html

    redirect = await client.get("/ui", allow_redirects=False)
    assert redirect.status == 302 and redirect.headers["Location"] == "/ui/"


async def test_assets_are_cacheable_by_version_and_revalidate_otherwise(client: TestClient) -> None:
    html = await (await client.get("/ui/")).text()
    links = re.findall(r'(?:src|href)="(/ui/assets/[^"]+)"', html)
    assert {link.split("?")[0].rsplit("/", 1)[1] for link in links} == {"vendor.js", *ui.OWN_SCRIPTS, *ui.OWN_STYLES}
    for link in links:
        resp = await client.get(link)
        assert resp.status == 200, link
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert resp.headers["Content-Security-Policy"] == ui.CSP
        etag = resp.headers["ETag"]
        again = await client.get(link.split("?")[0], headers={"If-None-Match": etag})
        assert again.status == 304 and again.headers["Cache-Control"] == "no-cache"
    vendor = await (await client.get("/ui/assets/vendor.js")).text()
    assert "Prism" in vendor and "diffWordsWithSpace" in vendor  # the pinned npm packages, installed by make
    assert (await client.get("/ui/assets/../web.py")).status == 404
    missing = await client.get("/ui/assets/nope.js")
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "not_found"


async def test_the_page_is_not_part_of_the_api_document(client: TestClient) -> None:
    doc = await (await client.get("/api/v1/openapi.json")).json()
    assert not [p for p in doc["paths"] if p.startswith("/ui")]


async def test_state_changes_need_the_bearer_header_not_an_ambient_credential(client: TestClient) -> None:
    """CSRF: a cross-site form can send cookies and a text/plain body but never an Authorization
    header; the API authenticates only that header, so such a request changes nothing."""
    key = await new_key(client, "alice")
    forged = await client.post(RUNS, data='{"repository": "acme/web", "prompt": "@say hi"}',
                               headers={"Content-Type": "text/plain", "Origin": "https://evil.example",
                                        "Cookie": f"session={key}; key={key}"})
    assert forged.status == 401
    listed = await (await client.get(RUNS, headers=auth(key))).json()
    assert listed["data"] == []


async def test_list_filters_by_status_tag_and_repository(client: TestClient) -> None:
    key = await new_key(client, "alice")
    made = []
    for repo, tags in (("acme/web", ["ci"]), ("acme/api", ["CI", "nightly"]), ("acme/web", [])):
        resp = await client.post(RUNS, json={"repository": repo, "prompt": "@say hi", "tags": tags}, headers=auth(key))
        made.append((await resp.json())["run"]["id"])

    async def ids(**params: str) -> list[str]:
        resp = await client.get(RUNS, params=params, headers=auth(key))
        assert resp.status == 200, await resp.text()
        return [r["id"] for r in (await resp.json())["data"]]

    assert await ids(tag=" Ci ") == [made[1], made[0]]
    assert await ids(tag="nightly", repository="acme/api") == [made[1]]
    assert await ids(repository="acme/web") == [made[2], made[0]]
    assert await ids(status="queued", limit="1") == [made[2]]
    assert await ids(status="completed") == []
    page = await (await client.get(RUNS, params={"repository": "acme/web", "limit": "1"}, headers=auth(key))).json()
    assert await ids(repository="acme/web", cursor=page["nextCursor"]) == [made[0]]
    bad = await client.get(RUNS, params={"status": "bogus"}, headers=auth(key))
    assert bad.status == 422 and (await bad.json())["error"]["field"] == "status"


async def test_a_stream_client_that_goes_away_is_not_an_error(client: TestClient,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Regression: a browser tab closed mid-stream was logged as an unhandled error and
    answered with a 500 on the dead connection."""
    key = await new_key(client, "alice")
    run = (await (await client.post(RUNS, json={"repository": "acme/web", "prompt": "@say hi"},
                                    headers=auth(key))).json())["run"]
    hub = client.app[SERVICES].hub
    await hub.builder(run["id"], {"type": "text", "text": "before"})
    caplog.set_level(logging.INFO)
    for _ in range(3):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(f"GET {RUNS}/{run['id']}/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n"
                     .encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b" 200 " in head.split(b"\r\n")[0]
        await asyncio.wait_for(reader.readuntil(b"before"), 10)  # the event before
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.1)
        for n in range(3):  # wakes the stream: its next write meets the closed connection
            await hub.builder(run["id"], {"type": "text", "text": f"after close {n}"})
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert not [r for r in caplog.records if " 500 " in r.getMessage()]
    # the server is fine: a new stream still reads every event
    resp = await client.get(f"{RUNS}/{run['id']}/stream", headers=auth(key), params={"after": "0"})
    first = await asyncio.wait_for(resp.content.readuntil(b"before"), 10)
    assert b"id: 1" in first
    resp.close()


async def test_a_stream_of_an_ended_turn_waits_for_its_closing_status_event(client: TestClient) -> None:
    """Regression: the run's row turns idle a moment before its run.status event is appended;
    a stream that looked in that moment ended without the event (the page then lacked its last
    row until a reload)."""
    key = await new_key(client, "alice")
    run = (await (await client.post(RUNS, json={"repository": "acme/web", "prompt": "@say hi"},
                                    headers=auth(key))).json())["run"]
    s = client.app[SERVICES]
    await store.transition(s.db, run["id"], RunStatus.RUNNING, Phase.AGENT_RUNNING)
    await store.transition(s.db, run["id"], RunStatus.IDLE, Phase.AWAITING_FOLLOW_UP)  # the row, no event yet

    async def announce_later() -> None:
        await asyncio.sleep(0.5)
        row = await store.get_run(s.db, run["id"])
        assert row is not None
        await s.hub.status(row)

    later = asyncio.create_task(announce_later())
    resp = await client.get(f"{RUNS}/{run['id']}/stream", headers=auth(key))
    body = await asyncio.wait_for(resp.text(), 10)  # the stream ends by itself
    await later
    statuses = [json.loads(line[5:])["status"] for line in body.splitlines() if line.startswith("data:")
                and '"status"' in line]
    assert statuses and statuses[-1] == "idle", body
