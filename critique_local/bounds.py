"""Bounds on untrusted data: JSON nesting, and clipping of text and JSON values before they are
stored or sent.

Everything a client or a sandbox sends is parsed with a depth limit (deep nesting would
otherwise exhaust Python's recursion limit in the parser, in pydantic, in redaction or when
serialising) and everything read out of a sandbox is clipped to a size before it is stored.
A clipped value says so with :func:`clip_mark`, so a reader never mistakes it for the whole.
"""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_DEPTH = 64  # arrays and objects inside each other; OpenAI tool schemas need well under 20


class TooDeep(ValueError):
    """A JSON document nests deeper than allowed."""


def depth_within(value: Any, max_depth: int) -> bool:
    """Whether ``value`` (parsed JSON) nests at most ``max_depth`` arrays/objects deep.
    Iterative, so it cannot itself run out of stack; linear in the number of values."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return False
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return True


def loads(raw: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses documents nested deeper than ``max_depth``.

    Raises ``ValueError`` for invalid JSON (including invalid UTF-8) and :class:`TooDeep`
    (a ``ValueError``) for nesting beyond the limit, never ``RecursionError``."""
    try:
        value = json.loads(raw)
    except RecursionError as exc:
        raise TooDeep(f"JSON nested deeper than {max_depth} levels") from exc
    if not depth_within(value, max_depth):
        raise TooDeep(f"JSON nested deeper than {max_depth} levels")
    return value


def clip_mark(dropped: int, unit: str = "characters") -> str:
    return f"… [clipped: {dropped} more {unit}]"


def clip_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, plus a marker saying how many were dropped."""
    if len(text) <= limit:
        return text
    return text[:limit] + clip_mark(len(text) - limit)


def clip_json(value: Any, *, max_chars: int = 2000, max_items: int = 100, max_depth: int = 8) -> Any:
    """A JSON-like value with every string clipped to ``max_chars``, every list and object to
    ``max_items`` entries (a marker entry says how many were dropped) and nesting cut at
    ``max_depth`` (deeper values become a marker string). Keys are clipped like strings."""
    if isinstance(value, str):
        return clip_text(value, max_chars)
    if not isinstance(value, dict | list):
        return value if value is None or isinstance(value, bool | int | float) else clip_text(str(value), max_chars)
    if max_depth <= 0:
        return "[clipped: nested too deep]"
    inner = {"max_chars": max_chars, "max_items": max_items, "max_depth": max_depth - 1}
    if isinstance(value, list):
        out = [clip_json(v, **inner) for v in value[:max_items]]
        if len(value) > max_items:
            out.append(clip_mark(len(value) - max_items, "items"))
        return out
    clipped: dict[str, Any] = {}
    for i, (key, val) in enumerate(value.items()):
        if i >= max_items:
            clipped["…"] = clip_mark(len(value) - max_items, "keys")
            break
        clipped[clip_text(str(key), max_chars)] = clip_json(val, **inner)
    return clipped


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON."""
    return len(json.dumps(value, separators=(",", ":")).encode())
