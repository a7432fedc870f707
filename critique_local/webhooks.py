"""run.status webhooks, signed the Standard Webhooks way, delivered with retries that survive
restarts (every delivery is a row in ``webhook_deliveries`` before anything is sent).

    webhook-id          the delivery id (stable across retries, for de-duplication)
    webhook-timestamp   Unix seconds of the attempt
    webhook-signature   "v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))
                        where the user's secret is "whsec_" + base64(key)

Retries: ``retry_base_s`` doubling up to ``retry_max_s`` between attempts, until
``retry_window_s`` after the delivery was created; 2xx is success.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from datetime import timedelta
from fnmatch import fnmatch
from typing import Any
from urllib.parse import urlsplit

import httpx

from critique_local.clock import iso, now, now_iso, parse_iso
from critique_local.config import WebhookSettings
from critique_local.crypto import SecretBox
from critique_local.errors import ErrorCode, InvalidRequest
from critique_local.store.db import Database
from critique_local.store.runs import RunRow
from critique_local.tokens import new_id

log = logging.getLogger(__name__)
SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def check_url(settings: WebhookSettings, url: str, field: str = "webhook.url") -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise InvalidRequest("webhook URL must be http(s)://host/... without credentials", field=field)
    host = parts.hostname.lower()
    if not any(fnmatch(host, pattern.lower()) for pattern in settings.allowed_hosts):
        raise InvalidRequest(f"webhook host {host!r} is not allowed by the operator", field=field,
                             code=ErrorCode.WEBHOOK_NOT_ALLOWED)
    return url


async def user_secret(db: Database, box: SecretBox, user_id: str, rotate: bool = False) -> tuple[str, bool]:
    """The user's signing secret (created when missing or rotated); True when it is new."""
    row = await db.one("SELECT webhook_secret FROM users WHERE id = ?", (user_id,))
    if row is not None and row[0] and not rotate:
        return box.open(row[0], user_id), False
    secret = new_secret()
    await db.write("UPDATE users SET webhook_secret = ? WHERE id = ?", (box.seal(secret, user_id), user_id))
    return secret, True


class Webhooks:
    def __init__(self, db: Database, box: SecretBox, settings: WebhookSettings) -> None:
        self._db = db
        self._box = box
        self._settings = settings
        self._http = httpx.AsyncClient(timeout=settings.timeout_s, follow_redirects=False)
        self._wake = asyncio.Event()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def enqueue(self, run: RunRow, payload: dict[str, Any]) -> None:
        """Record one delivery per endpoint of the run (its own URL, then the user's defaults)."""
        urls: list[str] = []
        own = (run.request.get("webhook") or {}).get("url")
        if own:
            urls.append(str(own))
        user = await self._db.one("SELECT name FROM users WHERE id = ?", (run.user_id,))
        if user is not None:
            urls += [u for u in self._settings.user_urls.get(str(user[0]), []) if u not in urls]
        if not urls:
            return
        body = json.dumps({"type": "run.status", "timestamp": now_iso(), "data": payload})
        async with self._db.tx() as conn:
            for url in urls:
                await conn.execute(
                    "INSERT INTO webhook_deliveries (id, run_id, url, event_type, payload, state, next_attempt_at, "
                    "created_at) VALUES (?, ?, ?, 'run.status', ?, 'pending', ?, ?)",
                    (new_id("msg"), run.id, url, body, now_iso(), now_iso()),
                )
        self._wake.set()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.deliver_due()
            except Exception:
                log.exception("webhook delivery loop failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.poll_interval_s)

    async def deliver_due(self) -> None:
        rows = await self._db.all(
            "SELECT d.id, d.url, d.payload, d.attempts, d.created_at, r.user_id FROM webhook_deliveries d "
            "JOIN runs r ON r.id = d.run_id WHERE d.state = 'pending' AND d.next_attempt_at <= ? "
            "ORDER BY d.created_at LIMIT 50", (now_iso(),))
        await asyncio.gather(*(self._attempt(*row) for row in rows))

    async def _attempt(self, msg_id: str, url: str, payload: str, attempts: int, created_at: str,
                       user_id: str) -> None:
        secret, _ = await user_secret(self._db, self._box, user_id)
        body = payload.encode()
        ts = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
                   "webhook-signature": sign(secret, msg_id, ts, body)}
        code: int | None = None
        error: str | None = None
        try:
            # the receiver's answer is never read: only its status counts, within timeout_s in all
            async with asyncio.timeout(self._settings.timeout_s):
                async with self._http.stream("POST", url, content=body, headers=headers) as resp:
                    code = resp.status_code
            if 200 <= code < 300:
                await self._db.write(
                    "UPDATE webhook_deliveries SET state = 'delivered', attempts = ?, last_status_code = ?, "
                    "last_error = NULL, delivered_at = ? WHERE id = ?", (attempts + 1, code, now_iso(), msg_id))
                return
            error = f"HTTP {code}"
        except httpx.HTTPError as exc:
            error = f"{exc.__class__.__name__}: {exc}"[:300]
        except TimeoutError:
            error = f"no answer within webhooks.timeout_s ({self._settings.timeout_s:.0f} s)"
        delay = min(self._settings.retry_base_s * 2 ** attempts, self._settings.retry_max_s)
        next_at = now() + timedelta(seconds=delay)
        gave_up = next_at > parse_iso(created_at) + timedelta(seconds=self._settings.retry_window_s)
        await self._db.write(
            "UPDATE webhook_deliveries SET state = ?, attempts = ?, last_status_code = ?, last_error = ?, "
            "next_attempt_at = ? WHERE id = ?",
            ("failed" if gave_up else "pending", attempts + 1, code, error, iso(next_at), msg_id))

    async def for_run(self, run_id: str) -> list[dict[str, Any]]:
        rows = await self._db.all(
            "SELECT id, url, event_type, state, attempts, last_status_code, last_error, created_at, delivered_at, "
            "next_attempt_at, payload FROM webhook_deliveries WHERE run_id = ? ORDER BY created_at, id", (run_id,))
        return [{"id": r[0], "url": r[1], "eventType": r[2], "state": r[3], "attempts": r[4],
                 "lastStatusCode": r[5], "lastError": r[6], "createdAt": r[7], "deliveredAt": r[8],
                 "nextAttemptAt": r[9] if r[3] == "pending" else None,
                 "status": json.loads(r[10])["data"]["status"]} for r in rows]
