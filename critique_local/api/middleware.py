"""The one place errors become HTTP responses, and where API keys are checked."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from critique_local.api.ratelimit import RateLimiter
from critique_local.api.registry import Handler, Route
from critique_local.errors import (
    ApiError,
    ErrorCode,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
)
from critique_local.store.db import Database
from critique_local.store.keys import Principal, principal_for_key
from critique_local.tokens import API_KEY_PREFIX, token_hash

log = logging.getLogger(__name__)
ANONYMOUS = Principal("", "", frozenset())
PRINCIPAL = web.RequestKey("principal", Principal)  # who called, for the audit trail


# what an HTTP error aiohttp raises (not one of ours) says, as one of our codes
_STATUS_CODES = {400: ErrorCode.BAD_REQUEST, 401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN,
                 404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED, 406: ErrorCode.NOT_ACCEPTABLE,
                 408: ErrorCode.REQUEST_TIMEOUT, 409: ErrorCode.CONFLICT, 413: ErrorCode.PAYLOAD_TOO_LARGE,
                 415: ErrorCode.UNSUPPORTED_MEDIA_TYPE, 429: ErrorCode.RATE_LIMITED}


def code_for_status(status: int) -> ErrorCode:
    """The code of an HTTP error status (400-599) that none of our errors produced: its own
    where we have one, else ``bad_request`` (4xx) or ``internal_error`` (5xx)."""
    return _STATUS_CODES.get(status, ErrorCode.BAD_REQUEST if status < 500 else ErrorCode.INTERNAL_ERROR)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers())
    except web.HTTPRequestEntityTooLarge:
        err: ApiError = PayloadTooLarge("request body is too large")
        return web.json_response(err.body(), status=err.status)
    except web.HTTPNotFound:
        err = NotFound(f"no route for {request.path}")
        return web.json_response(err.body(), status=err.status)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        err = MethodNotAllowed(f"{request.method} is not allowed on {request.path} (allowed: {allowed})")
        return web.json_response(err.body(), status=err.status, headers={"Allow": allowed})
    except web.HTTPException as exc:
        if exc.status >= 400:
            return web.json_response({"error": {"code": code_for_status(exc.status).value,
                                                "message": exc.text or exc.reason}}, status=exc.status)
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response({"error": {"code": ErrorCode.INTERNAL_ERROR.value, "message": "internal server error"}},
                                 status=500)


MAX_TOKEN_CHARS = 512


def bearer(request: web.Request) -> str | None:
    """The bearer token, or None when the header is missing or malformed (a token must be
    printable ASCII: bytes that are not UTF-8 arrive as surrogates and are refused here)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
        return None
    if not (token.isascii() and token.isprintable()):
        return None
    return token


class KeyCache:
    """API keys verified within the last ``ttl_s`` seconds: a client polling a run costs no key
    lookup per request. Keys are revoked by the CLI (another process), so a revoked key keeps
    working for at most ``ttl_s``; unknown keys are never cached (a new key works at once)."""

    def __init__(self, ttl_s: float = 1.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_entries, self.clock = ttl_s, max_entries, clock
        self._verified: dict[str, tuple[Principal, float]] = {}

    async def principal(self, db: Database, token: str) -> Principal | None:
        """The key's principal, or None for an unknown or revoked key."""
        now, key = self.clock(), token_hash(token)  # plain keys are not kept
        hit = self._verified.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        principal = await principal_for_key(db, token)
        if principal is None:
            self._verified.pop(key, None)
            return None
        if len(self._verified) >= self.max_entries:  # bounded under key churn
            self._verified.clear()
        self._verified[key] = (principal, now + self.ttl_s)
        return principal


def authenticated(route: Route, db_key: web.AppKey[Database], limiter: RateLimiter | None = None,
                  keys: KeyCache | None = None) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    handler: Handler = route.handler
    cache = keys or KeyCache(ttl_s=0)

    async def wrapped(request: web.Request) -> web.StreamResponse:
        if route.scope is None:
            return await handler(request, ANONYMOUS)
        token = bearer(request)
        if token is None or not token.startswith(API_KEY_PREFIX):
            raise Unauthorized("missing or malformed API key: send Authorization: Bearer crt_...")
        principal = await cache.principal(request.app[db_key], token)
        if principal is None:
            raise Unauthorized("invalid or revoked API key")
        request[PRINCIPAL] = principal
        if limiter is not None:
            limiter.check(principal.key_id)
        if route.scope not in principal.scopes:
            raise Forbidden(f"this key lacks the {route.scope} scope")
        return await handler(request, principal)

    return wrapped
