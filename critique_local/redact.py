"""Redaction of secrets we know before anything is stored, sent or logged.

Two kinds of match, both chosen so that ordinary code is never rewritten:

- exact known values: provider keys, git host tokens, GitHub App installation tokens, each
  run's sandbox token, BYOK key and repository secrets (values shorter than
  :data:`MIN_SECRET_CHARS` are not registered: they would redact ordinary text);
- token shapes no identifier or prose can have by accident: our own ``crt_``/``crs_`` tokens
  only when their checksum matches (see :mod:`critique_local.tokens`), GitHub tokens of their
  exact length (``ghp_`` and friends: 36 characters; ``github_pat_``: 22 + 59), OpenRouter keys
  (``sk-or-v1-`` + 64 hex digits). A match must not be part of a longer word.

Text is redacted as ``str`` (:meth:`Redactor.text`) or as bytes (:meth:`Redactor.binary`, for
patches, which are not always UTF-8).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from critique_local.tokens import TOKEN_PATTERN, is_token

MIN_SECRET_CHARS = 8
MARK = "[REDACTED]"
_EDGE_L, _EDGE_R = r"(?<![A-Za-z0-9_])", r"(?![A-Za-z0-9_])"
_SHAPES: tuple[tuple[str, Callable[[str], bool] | None], ...] = (
    (TOKEN_PATTERN, is_token),  # our API keys and sandbox tokens (checksummed)
    (_EDGE_L + r"gh[pousr]_[A-Za-z0-9]{36}" + _EDGE_R, None),  # GitHub tokens
    (_EDGE_L + r"github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}" + _EDGE_R, None),
    (_EDGE_L + r"sk-or-v1-[0-9a-f]{64}" + _EDGE_R, None),  # OpenRouter keys
)
PATTERNS = tuple((re.compile(p), check) for p, check in _SHAPES)
BYTE_PATTERNS = tuple((re.compile(p.encode()), check) for p, check in _SHAPES)


class Redactor:
    def __init__(self) -> None:
        self._global: set[str] = set()
        self._per_run: dict[str, set[str]] = {}

    def add(self, secret: str | None, run_id: str | None = None) -> None:
        if not secret or len(secret) < MIN_SECRET_CHARS:
            return
        if run_id is None:
            self._global.add(secret)
        else:
            self._per_run.setdefault(run_id, set()).add(secret)

    def forget_run(self, run_id: str) -> None:
        self._per_run.pop(run_id, None)

    def _secrets(self, run_id: str | None) -> list[str]:
        found = self._global | (self._per_run.get(run_id, set()) if run_id else set())
        return sorted(found, key=len, reverse=True)

    def text(self, value: str, run_id: str | None = None) -> tuple[str, int]:
        """``value`` with every known secret and token shape replaced, and how many were found."""
        found = 0
        for secret in self._secrets(run_id):
            if secret in value:
                found += value.count(secret)
                value = value.replace(secret, MARK)
        for pattern, check in PATTERNS:
            def swap(m: re.Match[str], check: Callable[[str], bool] | None = check) -> str:
                nonlocal found
                if check is not None and not check(m.group(0)):
                    return m.group(0)
                found += 1
                return MARK
            value = pattern.sub(swap, value)
        return value, found

    def binary(self, value: bytes, run_id: str | None = None) -> tuple[bytes, int]:
        """As :meth:`text`, for bytes in any encoding (secrets are matched as UTF-8)."""
        found = 0
        mark = MARK.encode()
        for secret in self._secrets(run_id):
            raw = secret.encode()
            if raw in value:
                found += value.count(raw)
                value = value.replace(raw, mark)
        for pattern, check in BYTE_PATTERNS:
            def swap(m: re.Match[bytes], check: Callable[[str], bool] | None = check) -> bytes:
                nonlocal found
                if check is not None and not check(m.group(0).decode("ascii")):
                    return m.group(0)
                found += 1
                return mark
            value = pattern.sub(swap, value)
        return value, found

    def clean(self, value: str, run_id: str | None = None) -> str:
        return self.text(value, run_id)[0]

    def data(self, value: Any, run_id: str | None = None) -> Any:
        """A JSON-like structure with every string redacted."""
        if isinstance(value, str):
            return self.clean(value, run_id)
        if isinstance(value, dict):
            return {k: self.data(v, run_id) for k, v in value.items()}
        if isinstance(value, list):
            return [self.data(v, run_id) for v in value]
        return value


class RedactingFilter(logging.Filter):
    """Rewrites log records so a secret never reaches a log line."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.redactor.clean(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
