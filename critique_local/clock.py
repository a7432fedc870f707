"""Time in one format everywhere: UTC ISO-8601 with milliseconds and a ``Z``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def now_iso() -> str:
    return iso(now())


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def ms_between(start: str, end: str) -> int:
    return int((parse_iso(end) - parse_iso(start)) / timedelta(milliseconds=1))
