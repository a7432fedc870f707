"""``mcpServers``: the agent in a restricted sandbox calls a tool of a remote MCP server (the
official SDK's server, started by the test on loopback) through the server's relay, which adds
the credential header; the header value appears nowhere but in that server's requests. The
sandbox itself gains no way to the MCP server's host: the egress proxy refuses it (the host is
on 127.0.0.2, outside the sandbox's NO_PROXY, so a direct attempt goes through the proxy)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from tests.conftest import SAMPLE_FILES, SHORT_SESSIONS
from tests.helpers import Server, free_port, make_repo, our_containers, sandbox_contains, wait_for

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"
SECRET = "mcp-secret-7f3a9c2e51d84b06"
MCP_HOST = "127.0.0.2"


class DocsServer:
    """An MCP server that wants ``Authorization: Bearer SECRET`` and records every request."""

    def __init__(self) -> None:
        docs = MCPServer("docs")

        @docs.tool()
        def lookup(term: str) -> str:
            """Look a term up in the team's docs."""
            return f"{term}: defined in the handbook, page 42"

        self.inner = docs.streamable_http_app(transport_security=TransportSecuritySettings(
            allowed_hosts=[f"{MCP_HOST}:*"], allowed_origins=[f"http://{MCP_HOST}:*"]))
        self.requests: list[dict[str, str]] = []
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=MCP_HOST, port=self.port, log_level="warning",
                                                      interface="asgi3"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            self.requests.append({"method": scope["method"], **headers})
            if headers.get("authorization") != f"Bearer {SECRET}":
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"unauthorized"})
                return
        await self.inner(scope, receive, send)

    def __enter__(self) -> DocsServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def docs_server() -> Iterator[DocsServer]:
    with DocsServer() as docs:
        yield docs


@pytest.fixture(scope="module")
def relay_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # the MCP server is on loopback: the operator allows it as a private range, as for the egress proxy
    srv = Server(tmp_path_factory.mktemp("mcp-relay"),
                 extra_env={**SHORT_SESSIONS, "CRITIQUE_LOCAL_NETWORK_PRIVATE_CIDRS": '["127.0.0.0/8"]'})
    srv.repos.mkdir(parents=True)
    make_repo(srv.repos, "acme/web", SAMPLE_FILES)
    srv.start()
    yield srv
    srv.stop()


def files_holding(root: Path, needle: str) -> list[str]:
    """Every file under ``root`` (the server's data dir: database, WAL, run repositories, kept
    session states) whose bytes hold ``needle``."""
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_the_agent_uses_an_mcp_server_without_seeing_its_credential(
        relay_server: Server, docs_server: DocsServer) -> None:
    api = relay_server.client(relay_server.new_key("alice"))
    docs = {"url": f"http://{MCP_HOST}:{docs_server.port}/mcp", "headers": {"Authorization": f"Bearer {SECRET}"}}
    refused = api.post(RUNS, json={"repository": "acme/web", "prompt": "hi", "mcpServers": {"docs": docs},
                                   "safety": {"network": {"mode": "none"}}})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "mcp_servers_need_network"
    assert not docs_server.requests

    # the agent uses the server's tool, then tries the server's host itself (through the proxy)
    direct = (f"python3 -c \"import urllib.request as r; r.urlopen('http://{MCP_HOST}:{docs_server.port}/mcp', "
              "timeout=30)\"; echo direct-exit=$?")
    script = f'@tool docs_lookup {{"term": "relay"}}\n@bash {direct}\n@say looked it up'
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": script, "modelId": "critique/scripted",
                               "mcpServers": {"docs": docs},
                               "safety": {"network": {"mode": "restricted", "allowlist": ["pypi.org"]}}}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"})
    assert done["status"] == "idle", done["error"]
    events = [e["data"] for e in api.get(f"{RUNS}/{run['id']}", params={"events": "1"}).json()["run"]["events"]]
    calls = [e for e in events if e.get("type") == "tool" and e.get("tool") == "docs_lookup"]
    assert calls and calls[-1]["status"] == "completed", (
        [e for e in events if e.get("type") in ("tool", "mcp.request", "error")], docs_server.requests)
    assert "page 42" in json.dumps(calls[-1])
    relayed = [e for e in events if e.get("type") == "mcp.request"]
    assert relayed and all(e["server"] == "docs" and e.get("status") for e in relayed)
    # restricted mode did not put the MCP server's host on the sandbox's allowlist: only the relay reaches it
    attempts = [e["output"] for e in events if e.get("tool") == "bash" and "output" in e]
    assert attempts, events
    attempt = attempts[-1]
    assert "HTTP Error 403" in attempt and "direct-exit=1" in attempt, attempt
    decisions = [(e["decision"], e["host"]) for e in events if e.get("type") == "network"]
    assert ("denied", MCP_HOST) in decisions and ("allowed", MCP_HOST) not in decisions, decisions
    # the agent's requests reached the MCP server with the credential, added by the relay
    assert docs_server.requests and all(r["authorization"] == f"Bearer {SECRET}" for r in docs_server.requests)
    assert any(r["method"] == "POST" for r in docs_server.requests)
    # nowhere else: not in the run's JSON or events, the server's log, the sandbox's processes or files
    full = api.get(f"{RUNS}/{run['id']}", params={"patch": "1", "events": "1"}).text
    assert SECRET not in full and "mcp-relay/docs" not in full
    assert SECRET not in Path(relay_server.base / "server.log").read_text()
    assert files_holding(relay_server.data_dir, SECRET) == []  # stored sealed: not in the database file's bytes
    (container,) = our_containers(run["id"])
    assert sandbox_contains(container, SECRET) == ""
    assert sandbox_contains(container, "mcp-relay/docs") != ""  # the probe finds what is there

    # a follow-up turn on the warm session uses the server again
    api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": '@tool docs_lookup {"term": "again"}\n@say twice'})
    second = wait_for(api, run["id"], {"idle", "failed"})
    assert second["status"] == "idle" and second["turnCount"] == 2, second["error"]
    events = [e["data"] for e in api.get(f"{RUNS}/{run['id']}", params={"events": "1"}).json()["run"]["events"]]
    again = [e for e in events if e.get("type") == "tool" and e.get("tool") == "docs_lookup"
             and e.get("status") == "completed"]
    assert len(again) == 2 and "again: defined in the handbook" in json.dumps(again[-1])

    ended = api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})
    assert ended.status_code == 200
    with closing(sqlite3.connect(f"file:{relay_server.data_dir / 'critique.db'}?mode=ro", uri=True)) as db:
        (sealed,) = db.execute("SELECT mcp_headers FROM runs WHERE id = ?", (run["id"],)).fetchone()
    assert sealed is None  # the sealed headers went with the session
    assert files_holding(relay_server.data_dir, SECRET) == []
    assert SECRET not in Path(relay_server.base / "server.log").read_text()
    assert files_holding(relay_server.data_dir, f"{MCP_HOST}:{docs_server.port}/mcp") != []  # the probe works
