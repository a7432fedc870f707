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
from collections.abc import Callable
from datetime import timedelta
from fnmatch import fnmatch
from typing import Any
from urllib.parse import urlsplit

import httpx

from critique_local.clock import iso, now, now_iso, parse_iso
from critique_local.config import WebhookSettings
from critique_local.crypto import SecretBox
from critique_local.errors import ErrorCode, InvalidRequest
from critique_local.store import deliveries as store
from critique_local.store.db import Database
from critique_local.store.runs import RunRow

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
    sealed = await store.sealed_secret(db, user_id)
    if sealed is not None and not rotate:
        return box.open(sealed, user_id), False
    secret = new_secret()
    await store.set_sealed_secret(db, user_id, box.seal(secret, user_id))
    return secret, True


class Webhooks:
    """Deliveries of one server. ``on_attempt`` is told each attempt's outcome: ``delivered``,
    ``retry`` or ``gave_up`` (the metrics count them)."""

    def __init__(self, db: Database, box: SecretBox, settings: WebhookSettings,
                 on_attempt: Callable[[str], None] = lambda outcome: None) -> None:
        self._db = db
        self._on_attempt = on_attempt
        self._box = box
        self._settings = settings
        self._http = httpx.AsyncClient(timeout=settings.timeout_s, follow_redirects=False)
        self._wake = asyncio.Event()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def enqueue(self, run: RunRow, payload: dict[str, Any]) -> None:
        """Record one delivery per endpoint of the run (its own URL, then the user's defaults)."""
        urls: list[str] = []
        own = run.spec.webhook_url
        if own:
            urls.append(str(own))
        user = await store.user_name(self._db, run.user_id)
        if user is not None:
            urls += [u for u in self._settings.user_urls.get(user, []) if u not in urls]
        if not urls:
            return
        body = json.dumps({"type": "run.status", "timestamp": now_iso(), "data": payload})
        await store.add(self._db, run.id, urls, body)
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
        rows = await store.due(self._db, now_iso())
        await asyncio.gather(*(self._attempt(row) for row in rows))

    async def _attempt(self, due: store.DueDelivery) -> None:
        msg_id, url, attempts = due.id, due.url, due.attempts
        secret, _ = await user_secret(self._db, self._box, due.user_id)
        body = due.payload.encode()
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
                await store.delivered(self._db, msg_id, attempts + 1, code)
                self._on_attempt("delivered")
                return
            error = f"HTTP {code}"
        except httpx.HTTPError as exc:
            error = f"{exc.__class__.__name__}: {exc}"[:300]
        except TimeoutError:
            error = f"no answer within webhooks.timeout_s ({self._settings.timeout_s:.0f} s)"
        delay = min(self._settings.retry_base_s * 2 ** attempts, self._settings.retry_max_s)
        next_at = now() + timedelta(seconds=delay)
        gave_up = next_at > parse_iso(due.created_at) + timedelta(seconds=self._settings.retry_window_s)
        await store.attempt_failed(self._db, msg_id, gave_up=gave_up, attempts=attempts + 1, status_code=code,
                                   error=error, next_attempt_at=iso(next_at))
        self._on_attempt("gave_up" if gave_up else "retry")

    async def for_run(self, run_id: str) -> list[dict[str, Any]]:
        return [{"id": r.id, "url": r.url, "eventType": r.event_type, "state": r.state, "attempts": r.attempts,
                 "lastStatusCode": r.last_status_code, "lastError": r.last_error, "createdAt": r.created_at,
                 "deliveredAt": r.delivered_at, "nextAttemptAt": r.next_attempt_at if r.state == "pending" else None,
                 "status": json.loads(r.payload)["data"]["status"]} for r in await store.of_run(self._db, run_id)]
