"""Tokens: API keys (``crt_``) and per-run sandbox tokens (``crs_``).

Only a SHA-256 of a token is stored. The tokens carry 256 bits of randomness, so a fast
hash is enough (no password stretching needed) and lookup stays a single indexed query.
"""

from __future__ import annotations

import hashlib
import secrets

API_KEY_PREFIX = "crt_"
SANDBOX_TOKEN_PREFIX = "crs_"


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"
