"""OpenCode events -> ``builder.event`` rows: tool calls (name + status), file edits,
assistant text, step boundaries, model call retries and errors. Catalog noise, deltas and other sessions'
events are dropped; a tool part is reported once per status it reaches."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from critique_local.clock import iso

MAX_FIELD_CHARS = 2000


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return value[:MAX_FIELD_CHARS] + f"... [{len(value) - MAX_FIELD_CHARS} more chars]"
    if isinstance(value, dict):
        return {k: _clip(v) for k, v in value.items()}
    return value


class Normalizer:
    """Stateful per session: remembers which tool statuses and texts were already reported."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, event: dict[str, Any]) -> dict[str, Any] | None:
        kind = event.get("type")
        props = event.get("properties") or {}
        if props.get("sessionID", self.session_id) != self.session_id:
            return None
        if kind == "message.part.updated":
            return self._part(props.get("part") or {})
        if kind == "file.edited":
            return {"type": "file.edited", "path": props.get("file")}
        if kind == "session.error":
            err = props.get("error") or {}
            data = err.get("data") or {}
            return {"type": "error", "name": err.get("name"), "message": _clip(data.get("message") or str(data))}
        if kind == "session.status" and (props.get("status") or {}).get("type") == "retry":
            return _retry(props["status"])
        if kind == "permission.asked":
            return {"type": "permission.rejected", "permission": props.get("permission"),
                    "patterns": props.get("patterns")}
        return None

    def _part(self, part: dict[str, Any]) -> dict[str, Any] | None:
        if part.get("sessionID") not in (None, self.session_id):
            return None
        ptype = part.get("type")
        pid = str(part.get("id"))
        if ptype == "tool":
            state = part.get("state") or {}
            status = str(state.get("status"))
            if (pid, status) in self._seen:
                return None
            self._seen.add((pid, status))
            row: dict[str, Any] = {"type": "tool", "tool": part.get("tool"), "status": status,
                                   "callId": part.get("callID")}
            if state.get("input"):
                row["input"] = _clip(state["input"])
            if state.get("title"):
                row["title"] = _clip(state["title"])
            if status == "completed" and state.get("output") is not None:
                row["output"] = _clip(state["output"])
            if status == "error":
                row["error"] = _clip(state.get("error"))
            return row
        if ptype == "text" and (part.get("time") or {}).get("end") and not part.get("synthetic"):
            if (pid, "text") in self._seen:
                return None
            self._seen.add((pid, "text"))
            return {"type": "text", "text": _clip(part.get("text", ""))}
        if ptype == "step-start":
            return {"type": "step.start"}
        if ptype == "step-finish":
            return {"type": "step.finish", "reason": part.get("reason"), "tokens": part.get("tokens")}
        return None


def _retry(status: dict[str, Any]) -> dict[str, Any]:
    """OpenCode retries a failed model call: ``attempt`` (1, 2, ...), OpenCode's ``message`` and
    when it tries again (``retryAt``, when it said)."""
    row: dict[str, Any] = {"type": "retry", "attempt": status.get("attempt"),
                           "message": _clip(str(status.get("message") or ""))}
    at = status.get("next")
    if isinstance(at, int | float) and 0 < at < 1e14:
        row["retryAt"] = iso(datetime.fromtimestamp(at / 1000, UTC))
    return row
