"""``/readyz`` on the real application with the Docker backend (in process, so each piece can be
taken away on its own): 200 while everything answers, then 503 naming each check that fails as
the sandbox image, the egress proxy, the gateway listener and the Docker engine go away one by
one (the database's own failure is in tests/test_ops_audit.py). The engine is reached through a
relay socket this test owns, so cutting it off touches no other server; the image is a tag this
test made, so removing it removes nothing else."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from critique_local.appkeys import EGRESS, GATEWAY_RUNNER
from critique_local.ops.readiness import CACHE_S, CHECKS
from tests.inprocess import app_client, settings_for

pytestmark = pytest.mark.e2e
IMAGE = "critique-local/sandbox:latest"


class EngineRelay:
    """A unix socket forwarding every connection to the Docker engine's socket; :meth:`cut`
    closes the socket and every connection through it (the engine is gone for whoever uses the
    relay), :meth:`start` opens it again. Threads: the application may call the engine from
    its event loop's worker threads at any time."""

    def __init__(self, path: Path, engine: str) -> None:
        self.path, self.engine = path, engine
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(self.path))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            try:
                upstream.connect(self.engine)
            except OSError:
                client.close()
                continue
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def cut(self) -> None:
        if self._listener is not None:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            self._listener.close()
            self._listener = None
        for s in self._open:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._open.clear()
        self.path.unlink(missing_ok=True)


def _pump(a: socket.socket, b: socket.socket) -> None:
    try:
        while data := a.recv(65536):
            b.sendall(data)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass


async def _ready(client: TestClient) -> tuple[int, dict[str, Any]]:
    await asyncio.sleep(CACHE_S + 0.1)  # a new round of checks (they are shared for CACHE_S)
    resp = await client.get("/readyz")
    return resp.status, await resp.json()


def _failed(body: dict[str, Any]) -> set[str]:
    return {name for name, result in body["checks"].items() if result.startswith("failed: ")}


async def test_readyz_names_the_image_proxy_gateway_and_engine_as_each_goes(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    engine = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").removeprefix("unix://")
    short = Path(tempfile.mkdtemp(prefix="readyz-"))  # a unix socket's path has at most 107 bytes
    relay = EngineRelay(short / "engine.sock", engine)
    relay.start()
    own = dict(os.environ)  # the docker CLI of this test talks to the engine directly

    def docker(*args: str, check: bool = True) -> None:
        subprocess.run(["docker", *args], check=check, capture_output=True, env=own)

    monkeypatch.setenv("DOCKER_HOST", f"unix://{relay.path}")  # the application's engine client: the relay
    tag = f"critique-local/sandbox:readyz-{secrets.token_hex(4)}"
    docker("tag", IMAGE, tag)
    settings = settings_for(tmp_path, CRITIQUE_LOCAL_SANDBOX_IMAGE=tag, CRITIQUE_LOCAL_POOL_SIZE="0",
                            CRITIQUE_LOCAL_DOCKER_GATEWAY_PORT="0",
                            CRITIQUE_LOCAL_SERVER_HOST_STATE_DIR="/run/critique-local")  # seen by other servers
    try:
        async with app_client(settings, execute_runs=True) as client:
            status, body = await _ready(client)
            assert (status, body["checks"]) == (200, dict.fromkeys(CHECKS, "ok")) and body["ready"] is True

            docker("rmi", tag)  # only our tag goes: the image stays under its other tags
            status, body = await _ready(client)
            assert status == 503 and _failed(body) == {"sandbox_image"}, body
            assert body["error"]["code"] == "not_ready" and body["error"]["message"].startswith("sandbox_image failed")
            assert "ImageNotFound" in body["checks"]["sandbox_image"]
            docker("tag", IMAGE, tag)
            assert (await _ready(client))[0] == 200

            await client.app[EGRESS].stop()
            status, body = await _ready(client)
            assert status == 503 and _failed(body) == {"egress_proxy"}, body
            assert "egress_proxy failed" in body["error"]["message"]

            for site in list(client.app[GATEWAY_RUNNER].sites):
                await site.stop()
            status, body = await _ready(client)
            assert status == 503 and _failed(body) == {"egress_proxy", "gateway_listener"}, body
            assert "gateway_listener failed" in body["error"]["message"]

            relay.cut()
            status, body = await _ready(client)
            assert status == 503 and {"sandbox_engine", "sandbox_image"} <= _failed(body), body
            assert "sandbox_engine failed" in body["error"]["message"] and body["checks"]["database"] == "ok"
            relay.start()  # the application shuts down through the engine again
            assert (await client.get("/healthz")).status == 200  # liveness never depended on any of it
    finally:
        relay.cut()
        docker("rmi", tag, check=False)
        shutil.rmtree(short, ignore_errors=True)
