"""Debian's Chromium (``apt-get install chromium``, done by scripts/ensure-system.sh) driven by
Playwright from PyPI, never a downloaded browser: for tests/e2e/test_web_ui.py and
bench/ui_bench.py. Every page records Content-Security-Policy violations and JavaScript errors,
so a test can assert that nothing injected ever ran."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from typing import Any

from playwright.sync_api import Browser, Page, Playwright

# no background traffic: this machine has no network beyond loopback
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage"]
KEY_STORE = "critique-local.apiKey"
WATCH = """
window.__violations = [];
document.addEventListener('securitypolicyviolation', e => window.__violations.push(
    e.violatedDirective + ' ' + e.blockedURI + ' ' + (e.sample || '')));
"""


def chromium_path() -> str:
    found = os.environ.get("CRITIQUE_LOCAL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise RuntimeError("chromium is not installed: run make test (or apt-get install chromium)")
    return found


def launch(pw: Playwright) -> Browser:
    return pw.chromium.launch(executable_path=chromium_path(), args=FLAGS, headless=True)


def new_page(browser: Browser, key: str | None = None) -> tuple[Page, list[str]]:
    """A page in a fresh context (its own session storage), signed in with ``key`` when given;
    the list collects uncaught JavaScript errors."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    if key:
        context.add_init_script(f"sessionStorage.setItem({KEY_STORE!r}, {key!r});")
    context.add_init_script(WATCH)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, errors


def violations(page: Page) -> list[Any]:
    return list(page.evaluate("window.__violations || []"))


class DroppingProxy:
    """A loopback TCP forwarder to ``target_port`` that can cut every open connection at once
    (``drop()``), as a flaky network would: for testing that the page resumes its stream."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, name="dropping-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> DroppingProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self.loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drop(self) -> None:
        def cut() -> None:
            for w in list(self._writers):
                w.transport.abort()
            self._writers.clear()
        self.loop.call_soon_threadsafe(cut)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except asyncio.CancelledError:  # shutting down; asyncio's stream callback would log it
            pass

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
