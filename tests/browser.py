"""Debian's Chromium (``apt-get install chromium``, done by scripts/ensure-system.sh) driven by
Playwright from PyPI, never a downloaded browser: for tests/e2e/test_web_ui.py and
bench/ui_bench.py. Every page records Content-Security-Policy violations and JavaScript errors,
so a test can assert that nothing injected ever ran."""

from __future__ import annotations

import os
import shutil
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
