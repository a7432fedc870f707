"""Tokens: API keys (``crt_``) and per-run sandbox tokens (``crs_``).

A token is its prefix, 43 random base62 characters (256 bits) and a 6-character base62
CRC-32 of prefix and body, like GitHub's tokens: a string is recognisably one of our tokens
only when its checksum matches, so redaction can find tokens in any text without touching
look-alikes such as the identifier ``crs_transform_to_web_mercator_epsg3857``. Keys made before
the checksum (``crt_`` + 43 URL-safe characters) still authenticate.

Only a SHA-256 of a token is stored. The tokens carry 256 bits of randomness, so a fast
hash is enough (no password stretching needed) and lookup stays a single indexed query.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import zlib

API_KEY_PREFIX = "crt_"
SANDBOX_TOKEN_PREFIX = "crs_"
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
BODY_CHARS = 43
CHECK_CHARS = 6
# a token anywhere in text (not inside a longer word); is_token checks the checksum
TOKEN_PATTERN = r"(?<![A-Za-z0-9_])cr[ts]_[0-9A-Za-z]{" + str(BODY_CHARS + CHECK_CHARS) + r"}(?![A-Za-z0-9_])"


def _base62(number: int, width: int) -> str:
    out = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        out.append(BASE62[digit])
    return "".join(reversed(out))


def checksum(prefix: str, body: str) -> str:
    """6 base62 characters: CRC-32 of ``prefix + body``."""
    return _base62(zlib.crc32((prefix + body).encode()), CHECK_CHARS)


def new_token(prefix: str) -> str:
    body = "".join(secrets.choice(BASE62) for _ in range(BODY_CHARS))
    return prefix + body + checksum(prefix, body)


def is_token(text: str) -> bool:
    """Whether ``text`` is exactly a checksummed ``crt_``/``crs_`` token."""
    prefix, body, check = text[:4], text[4:4 + BODY_CHARS], text[4 + BODY_CHARS:]
    return (prefix in (API_KEY_PREFIX, SANDBOX_TOKEN_PREFIX) and len(body) == BODY_CHARS
            and len(check) == CHECK_CHARS and all(c in BASE62 for c in body + check)
            and checksum(prefix, body) == check)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"
