"""Redaction of secrets we know before anything is stored, sent or logged.

Known values (provider keys, git host tokens, GitHub App installation tokens, each run's BYOK
key and repository secrets) are replaced wherever they appear, plus anything shaped like our
own tokens (``crt_``/``crs_``) or common git host tokens. Values shorter than
:data:`MIN_SECRET_CHARS` are not registered (they would redact ordinary text).
"""

from __future__ import annotations

import logging
import re
from typing import Any

MIN_SECRET_CHARS = 8
MARK = "[REDACTED]"
PATTERNS = (
    re.compile(r"\bcr[ts]_[A-Za-z0-9_\-]{20,}"),  # our API keys and sandbox tokens
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),  # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bsk-or-v1-[A-Za-z0-9]{20,}"),  # OpenRouter keys
)


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

    def text(self, value: str, run_id: str | None = None) -> tuple[str, int]:
        """``value`` with every known secret replaced, and how many were found."""
        found = 0
        secrets = self._global | (self._per_run.get(run_id, set()) if run_id else set())
        for secret in sorted(secrets, key=len, reverse=True):
            if secret in value:
                found += value.count(secret)
                value = value.replace(secret, MARK)
        for pattern in PATTERNS:
            value, n = pattern.subn(MARK, value)
            found += n
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
