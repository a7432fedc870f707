"""Hostile clients and hostile sandboxes against a real server on loopback, with the real
OpenCode in real containers: slowloris on the public port, one sandbox address flooding the
gateway listener, an agent that replaces OpenCode with its own server between turns (huge
replies, event floods, endless lines, a reply that trickles forever), a sandbox writing to
PID 1's stdout, a full /tmp, and the idle session caps."""

from __future__ import annotations

import json
import selectors
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import Server, our_containers, wait_for

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"
HEAD_TIMEOUT_S = 3
CLOSE_MARGIN_S = 60  # generous: the deadline is HEAD_TIMEOUT_S; this only bounds a loaded machine


def gateway_address(server: Server) -> tuple[str, int]:
    """Where the sandbox-facing listener is (from the server's ready line)."""
    for line in reversed((server.base / "server.log").read_text().splitlines()):
        if '"event": "ready"' in line:
            url = urlsplit(json.loads(line)["gateway"])
            assert url.hostname and url.port
            return url.hostname, url.port
    raise AssertionError("no ready line in the server log")


def peak_rss_kb(server: Server) -> int:
    assert server.proc is not None
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def test_slowloris_connections_to_the_public_port_are_closed_within_a_bound(fresh_server: Server) -> None:
    fresh_server.extra_env["CRITIQUE_LOCAL_LIMITS_REQUEST_HEAD_TIMEOUT_S"] = str(HEAD_TIMEOUT_S)
    fresh_server.start()
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(400):
        sock = socket.create_connection(("127.0.0.1", fresh_server.port), timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        socks.append(sock)
    started = time.monotonic()
    assert httpx.get(f"{fresh_server.url}/healthz", timeout=10).status_code == 200  # answered meanwhile
    open_ = set(socks)
    replies: list[bytes] = []
    while open_ and time.monotonic() - started < HEAD_TIMEOUT_S + CLOSE_MARGIN_S:
        for sock in list(open_):  # keep trickling header bytes: activity does not extend the deadline
            try:
                sock.send(b"a")
            except OSError:
                open_.discard(sock)
                sel.unregister(sock)
        for key, _ in sel.select(timeout=0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                replies.append(data)
            else:
                open_.discard(sock)
                sel.unregister(sock)
    assert not open_, f"{len(open_)} of 400 slow connections still open"
    assert not replies  # closed, not answered (no head ever completed)
    for sock in socks:
        sock.close()
    assert httpx.get(f"{fresh_server.url}/healthz", timeout=10).status_code == 200


def test_one_sandbox_address_flooding_the_gateway_gets_only_its_share(fresh_server: Server) -> None:
    per_sandbox = 16
    fresh_server.extra_env.update({"CRITIQUE_LOCAL_LIMITS_CONNECTIONS_PER_SANDBOX": str(per_sandbox),
                                   "CRITIQUE_LOCAL_LIMITS_REQUEST_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S)})
    fresh_server.start()
    host, port = gateway_address(fresh_server)  # from the host, our address on the bridge is one peer
    refused = 0
    held = 0
    stop = threading.Event()
    lock = threading.Lock()

    def flood() -> None:
        nonlocal refused, held
        while not stop.is_set():
            try:
                sock = socket.create_connection((host, port), timeout=5)
                sock.sendall(b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and never more
                sock.settimeout(0.5)
                data = sock.recv(4096)
            except TimeoutError:  # accepted and waiting for the rest of the head: held open
                with lock:
                    held += 1
                threading.Thread(target=_hold, args=(sock,), daemon=True).start()
                continue
            except OSError:
                continue
            with lock:
                refused += data.startswith(b"HTTP/1.1 503")
            sock.close()

    def _hold(sock: socket.socket) -> None:
        sock.settimeout(HEAD_TIMEOUT_S + CLOSE_MARGIN_S)
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
        sock.close()

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        api = fresh_server.client(fresh_server.new_key("neighbour"))
        # another sandbox (another address) runs a whole turn with model calls through the gateway
        run = api.post(RUNS, json={"repository": "acme/web",
                                   "prompt": "@bash echo through\n@write n.txt\nok\n@end\n@say fine"}).json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"}, timeout_s=180)
        assert done["status"] == "idle" and done["summary"] == "fine", done["error"]
        assert httpx.get(f"{fresh_server.url}/healthz", timeout=10).status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert refused > 0 and held >= per_sandbox, (refused, held)
    # the held connections were closed at their head deadline: the address gets connections again
    time.sleep(HEAD_TIMEOUT_S + 2)
    resp = httpx.get(f"http://{host}:{port}/api/v1/models", timeout=10)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})


# The agent's replacement for OpenCode: it waits until the turn is over, kills OpenCode and
# serves its port. Prompt 1 gets 30,000 events, an oversized event, an endless line and an
# 8 MB summary; prompt 2 a reply that trickles a byte a second forever. (No line starts with an
# at sign: that would end the scripted model's @write.)
EVIL = r'''
import json, subprocess, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

state = {"prompts": 0, "session": ""}
flooded = threading.Event()

class Evil(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def reply(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/global/health"):
            return self.reply({"healthy": True, "version": "evil"})
        if not self.path.startswith("/event"):
            return self.reply({})
        seen = state["prompts"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        w = self.wfile
        w.write(b'data: {"type": "server.connected", "properties": {}}\n\n')
        w.flush()
        while state["prompts"] == seen:
            time.sleep(0.05)
        if state["prompts"] == 1:
            sid = state["session"]
            text = "t" * 1000
            for i in range(30000):
                ev = {"type": "message.part.updated", "properties": {"part": {
                    "id": "prt_%d" % i, "sessionID": sid, "type": "text", "text": text, "time": {"end": 1}}}}
                w.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
            w.write(b"data: " + b"x" * 6000000 + b"\n\n")
            w.write(b'data: {"type": "session.idle", "properties": {"sessionID": "' + sid.encode() + b'"}}\n\n')
            w.flush()
            flooded.set()
            w.write(b"data: " + b"y" * 50000000)
            w.flush()
        time.sleep(3600)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.path.endswith("/message"):
            return self.reply(True)
        state["session"] = self.path.split("/")[2]
        state["prompts"] += 1
        if state["prompts"] == 1:
            flooded.wait(600)
            return self.reply({"info": {"role": "assistant"}, "parts": [{"type": "text", "text": "S" * 8000000}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        while True:
            self.wfile.write(b" ")
            self.wfile.flush()
            time.sleep(1)

time.sleep(8)
subprocess.run(["pkill", "-f", "opencode serve"])
while True:
    try:
        server = ThreadingHTTPServer(("0.0.0.0", 4096), Evil)
        break
    except OSError:
        time.sleep(0.2)
open("/tmp/evil-up", "w").close()
server.serve_forever()
'''


def test_an_agent_replacing_opencode_cannot_flood_or_stall_the_server(fresh_server: Server) -> None:
    max_events = 500
    fresh_server.extra_env.update({"CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S": "600",
                                   "CRITIQUE_LOCAL_SANDBOX_TURN_TIMEOUT_S": "40",
                                   "CRITIQUE_LOCAL_LIMITS_MAX_EVENTS_PER_TURN": str(max_events)})
    fresh_server.start()
    api = fresh_server.client(fresh_server.new_key("mallory"))
    prompt = (f"@write evil.py\n{EVIL.strip()}\n@end\n"
              "@bash setsid nohup python3 evil.py > /dev/null 2>&1 < /dev/null &\n@say armed")
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": prompt}).json()["run"]
    assert wait_for(api, run["id"], {"idle", "failed"}, timeout_s=180)["status"] == "idle"
    (container,) = our_containers(run["id"])
    deadline = time.monotonic() + 120
    while subprocess.run(["docker", "exec", container, "test", "-f", "/tmp/evil-up"]).returncode != 0:
        assert time.monotonic() < deadline, "the replacement server did not come up"
        time.sleep(0.5)
    db = fresh_server.data_dir / "critique.db"
    db_before = sum(p.stat().st_size for p in db.parent.glob("critique.db*"))
    rss_before = peak_rss_kb(fresh_server)

    assert api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "anything"}).status_code == 202
    after = wait_for(api, run["id"], {"idle", "failed"}, timeout_s=300)
    assert after["status"] == "idle", after["error"]
    limit = 20_000  # limits.max_summary_chars
    assert after["summary"].startswith("S" * 100) and after["summary"].endswith("more characters]")
    assert len(after["summary"]) < limit + 100
    events = api.get(f"{RUNS}/{run['id']}", params={"events": "1"}).json()["run"]["events"]
    turn2 = [e["data"] for e in events if e["event"] == "builder.event" and e["data"].get("type") == "text"
             and e["data"]["text"].startswith("t")]
    assert len(turn2) == max_events
    clipped = [e["data"] for e in events if e["data"].get("type") == "events.clipped"]
    assert clipped and clipped[-1]["dropped"] >= 30_000 - max_events + 1  # + the oversized one
    assert all(len(json.dumps(e)) <= 33_000 for e in events)

    sizes = {"get": len(api.get(f"{RUNS}/{run['id']}").content),
             "list": len(api.get(RUNS, params={"limit": 100}).content),
             "events": len(api.get(f"{RUNS}/{run['id']}", params={"events": "1"}).content)}
    assert sizes["get"] < 200_000 and sizes["list"] < 20_000 and sizes["events"] < 3_000_000, sizes
    db_growth = sum(p.stat().st_size for p in db.parent.glob("critique.db*")) - db_before
    rss_growth_mb = (peak_rss_kb(fresh_server) - rss_before) / 1024
    print(f"hostile agent: responses {sizes}, db +{db_growth / 1e6:.1f} MB, peak RSS +{rss_growth_mb:.0f} MB")
    assert db_growth < 20_000_000, db_growth
    assert rss_growth_mb < 300, rss_growth_mb

    # a reply that trickles a byte a second forever ends at sandbox.turn_timeout_s
    started = time.monotonic()
    assert api.post(f"{RUNS}/{run['id']}/messages", json={"prompt": "again"}).status_code == 202
    stalled = wait_for(api, run["id"], {"idle", "failed"}, timeout_s=240)
    assert stalled["status"] == "failed" and stalled["error"]["code"] == "turn_timeout", stalled["error"]
    assert time.monotonic() - started >= 40
    assert httpx.get(f"{fresh_server.url}/healthz", timeout=10).status_code == 200
    assert our_containers(run["id"]) == []


def test_pid1_output_of_a_sandbox_is_not_kept_on_the_host(server: Server, alice: str) -> None:
    api = server.client(alice)
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": (
        "@bash head -c 100000000 /dev/zero | tr '\\0' x > /proc/1/fd/1; echo wrote=$?\n@say flooded")}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"}, timeout_s=180)
    assert done["status"] == "idle", done["error"]
    (container,) = our_containers(run["id"])
    info = json.loads(subprocess.run(["docker", "inspect", container], capture_output=True, text=True,
                                     check=True).stdout)[0]
    assert info["HostConfig"]["LogConfig"]["Type"] == "none" and not info["LogPath"]
    root = subprocess.run(["docker", "info", "-f", "{{.DockerRootDir}}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    used = subprocess.run(["du", "-sb", f"{root}/containers/{info['Id']}"], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    assert int(used) < 1_000_000, used  # 100 MB were written to PID 1's stdout
    api.post(f"{RUNS}/{run['id']}/messages", json={"endSession": True})


def test_a_full_tmp_ends_the_run_as_sandbox_storage_full(server: Server, alice: str) -> None:
    api = server.client(alice)
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": (
        "@bash dd if=/dev/zero of=/tmp/fill bs=1M count=2000 2>&1 | tail -1; echo dd-done\n@say filled")}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"}, timeout_s=180)
    assert done["status"] == "failed" and done["error"]["code"] == "sandbox_storage_full", done["error"]
    assert "/tmp" in done["error"]["message"]
    assert our_containers(run["id"]) == []


def _idle_run(api: httpx.Client, text: str) -> dict[str, Any]:
    run = api.post(RUNS, json={"repository": "acme/web", "prompt": f"@say {text}"}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"}, timeout_s=180)
    assert done["status"] == "idle", done["error"]
    return done


def _ended(api: httpx.Client, run_id: str, timeout_s: float = 60) -> dict[str, Any]:
    run = wait_for(api, run_id, {"completed", "failed", "cancelled"}, timeout_s=timeout_s)
    assert run["status"] == "completed" and run["sessionEndReason"] == "idle_limit", run
    assert run["canFollowUp"] and "send_message" in run["nextActions"]
    return run


def test_idle_sessions_beyond_the_caps_end_least_recently_used_first(fresh_server: Server) -> None:
    fresh_server.extra_env.update({"CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S": "600",
                                   "CRITIQUE_LOCAL_SCHEDULER_MAX_IDLE_SESSIONS_PER_USER": "1",
                                   "CRITIQUE_LOCAL_SCHEDULER_MAX_IDLE_SESSIONS": "2"})
    fresh_server.start()
    alice, bob, carol = (fresh_server.client(fresh_server.new_key(n)) for n in ("alice", "bob", "carol"))
    a1 = _idle_run(alice, "a1")
    a2 = _idle_run(alice, "a2")  # alice's second idle session: her least recently used one ends
    _ended(alice, a1["id"])
    assert our_containers(a1["id"]) == []
    events = alice.get(f"{RUNS}/{a1['id']}", params={"events": "1"}).json()["run"]["events"]
    assert any(e["data"].get("type") == "session.ended" and e["data"]["reason"] == "idle_limit" for e in events)
    b1 = _idle_run(bob, "b1")  # two idle sessions in all: within the global cap
    assert alice.get(f"{RUNS}/{a2['id']}").json()["run"]["status"] == "idle"
    c1 = _idle_run(carol, "c1")  # three: the least recently used of all (alice's a2) ends
    _ended(alice, a2["id"])
    assert bob.get(f"{RUNS}/{b1['id']}").json()["run"]["status"] == "idle"
    assert carol.get(f"{RUNS}/{c1['id']}").json()["run"]["status"] == "idle"
    # an ended session takes follow-ups as a chained run, like an expired one
    resp = alice.post(f"{RUNS}/{a1['id']}/messages", json={"prompt": "@say again", "fallback": "chain"})
    assert resp.status_code == 202 and resp.json()["run"]["chainedFromRunId"] == a1["id"]
    chained = wait_for(alice, resp.json()["run"]["id"], {"idle", "failed"}, timeout_s=180)
    assert chained["status"] == "idle" and chained["summary"] == "again"
    for client, run_id in ((alice, chained["id"]), (bob, b1["id"]), (carol, c1["id"])):
        client.post(f"{RUNS}/{run_id}/messages", json={"endSession": True})
