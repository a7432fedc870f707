"""The real application in process, through aiohttp's test client: ``create_app`` with every
resource except the ones that execute runs (no sandbox backend started, so no Docker engine is
needed; runs are accepted and stay queued). Tests that execute runs are end-to-end."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web import AppRunner

from critique_local.app import claim_instance, create_app, runner_for
from critique_local.appkeys import DB, PUBLIC_URL, SETTINGS
from critique_local.config import Settings, load_settings
from critique_local.store.keys import create_key
from tests.helpers import free_port

T = TypeVar("T")


def settings_for(base: Path, config: Path | None = None, **env: str) -> Settings:
    """Settings as ``serve`` loads them (``config``, then CRITIQUE_LOCAL_* variables), every
    path under ``base``."""
    return load_settings(config, environ={
        "CRITIQUE_LOCAL_SERVER_DATA_DIR": str(base / "data"),
        "CRITIQUE_LOCAL_SERVER_HOST_STATE_DIR": str(base / "host"),
        "CRITIQUE_LOCAL_GIT_LOCAL_ROOT": str(base / "repos"),
        **env,
    })


class ServedAsInProduction(TestServer):
    """aiohttp's test server, with the runner options ``serve`` uses: in particular a handler is
    not cancelled when its client disconnects (the test server's default would be)."""

    async def _make_runner(self, **kwargs: Any) -> AppRunner:
        return runner_for(self.app, self.app[SETTINGS])


@asynccontextmanager
async def app_client(settings: Settings, execute_runs: bool = False) -> AsyncIterator[TestClient]:
    """A started application (its cleanup contexts entered) and a client on its loopback port;
    with ``execute_runs`` the sandbox backend and everything that runs turns start too (a Docker
    engine is needed: e2e tests only)."""
    claim = await asyncio.to_thread(claim_instance, settings)
    try:
        app = create_app(settings, claim, execute_runs=execute_runs)
        port = free_port()
        app[PUBLIC_URL] = f"http://127.0.0.1:{port}"
        async with TestClient(ServedAsInProduction(app, host="127.0.0.1", port=port)) as client:
            yield client
    finally:
        claim.release()


async def new_key(client: TestClient, user: str, scopes: tuple[str, ...] = ("read:builder", "write:builder",
                                                                             "inference")) -> str:
    """A fresh API key, as ``critique-local keys create`` makes it."""
    key, _ = await create_key(client.app[DB], user, scopes)
    return key


class AppThread:
    """The application on its own event loop in a thread, for synchronous clients (an SDK,
    schemathesis): ``with AppThread(settings) as srv: srv.url``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._thread = threading.Thread(target=self.loop.run_forever, name="app-under-test", daemon=True)
        self._client: TestClient | None = None
        self._context: AbstractAsyncContextManager[TestClient] | None = None

    def __enter__(self) -> AppThread:
        self._thread.start()
        self._context = app_client(self.settings)
        self._client = self.call(self._context.__aenter__())
        self.url = str(self._client.make_url("")).rstrip("/")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._context is not None:
            self.call(self._context.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the application's loop and wait for its result (at most 120 s)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def new_key(self, user: str, scopes: tuple[str, ...] = ("read:builder", "write:builder", "inference")) -> str:
        assert self._client is not None
        return self.call(new_key(self._client, user, scopes))
