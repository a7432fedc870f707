"""OpenCode events -> ``builder.event`` rows: tool calls (name + status), file edits,
assistant text, step boundaries, model call retries and errors. Catalog noise, deltas and other sessions'
events are dropped; a tool part is reported once per status it reaches.

A run's work includes its subagents: the ``task`` tool runs one in a child session (OpenCode's
``parentID``), which may start children of its own. Their rows are kept and marked with
``sessionId`` (the child's OpenCode session) and ``parentSessionId``; rows of the run's own
session carry neither. The parent's ``task`` row names its child as ``childSessionId``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from critique_local.bounds import clip_json
from critique_local.clock import iso

MAX_FIELD_CHARS = 2000
MAX_SEEN = 100_000
MAX_SUBAGENT_SESSIONS = 1000


def _clip(value: Any) -> Any:
    """Whatever the agent server sent, bounded: strings, lists, objects and nesting clipped."""
    return clip_json(value, max_chars=MAX_FIELD_CHARS, max_items=50, max_depth=6)


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class Normalizer:
    """Stateful per run session: remembers the session's descendants and which tool statuses
    and texts were already reported."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self._parents: dict[str, str] = {}  # descendant session id -> its parent's id
        self._seen: set[tuple[str, str]] = set()

    def owns(self, session_id: Any) -> bool:
        """The run's own session or one of its subagents' sessions."""
        return session_id == self.session_id or session_id in self._parents

    def _adopt(self, child: Any, parent: Any) -> None:
        if (isinstance(child, str) and child and child != self.session_id and self.owns(parent)
                and len(self._parents) < MAX_SUBAGENT_SESSIONS):  # bounded: the agent server is untrusted
            self._parents.setdefault(child[:200], str(parent)[:200])

    def _mark(self, row: dict[str, Any], session_id: Any) -> dict[str, Any]:
        if session_id in self._parents:
            row["sessionId"] = session_id
            row["parentSessionId"] = self._parents[session_id]
        return row

    def __call__(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """The row for one OpenCode event, or None when the event is not reported."""
        kind = event.get("type")
        props = _obj(event.get("properties"))
        if kind in ("session.created", "session.updated"):
            info = _obj(props.get("info"))
            self._adopt(info.get("id"), info.get("parentID"))
            return None
        sid = props.get("sessionID", self.session_id)
        if not self.owns(sid):
            return None
        if kind == "message.part.updated":
            part = _obj(props.get("part"))
            sid = part.get("sessionID", sid)
            if not self.owns(sid):
                return None
            row = self._part(part, sid)
            return self._mark(row, sid) if row is not None else None
        if kind == "file.edited":
            return self._mark({"type": "file.edited", "path": _clip(props.get("file"))}, sid)
        if kind == "session.error":
            err = _obj(props.get("error"))
            data = _obj(err.get("data"))
            return self._mark({"type": "error", "name": _clip(err.get("name")),
                               "message": _clip(data.get("message") or str(_clip(data)))}, sid)
        if kind == "session.status" and _obj(props.get("status")).get("type") == "retry":
            return self._mark(_retry(_obj(props.get("status"))), sid)
        if kind == "permission.asked":
            return self._mark({"type": "permission.rejected", "permission": _clip(props.get("permission")),
                               "patterns": _clip(props.get("patterns"))}, sid)
        return None

    def _part(self, part: dict[str, Any], sid: Any) -> dict[str, Any] | None:
        ptype = part.get("type")
        pid = str(part.get("id"))[:200]
        if ptype == "tool":
            state = _obj(part.get("state"))
            meta = _obj(state.get("metadata"))
            child = meta.get("sessionId") if part.get("tool") == "task" else None
            self._adopt(child, sid)
            status = str(state.get("status"))[:40]
            if (pid, status) in self._seen:
                return None
            if len(self._seen) >= MAX_SEEN:  # bounded memory: at worst a repeat is reported again
                self._seen.clear()
            self._seen.add((pid, status))
            row: dict[str, Any] = {"type": "tool", "tool": _clip(part.get("tool")), "status": status,
                                   "callId": _clip(part.get("callID"))}
            if state.get("input"):
                row["input"] = _clip(state["input"])
            if state.get("title"):
                row["title"] = _clip(state["title"])
            if isinstance(child, str) and child:
                row["childSessionId"] = child
            if status == "completed" and state.get("output") is not None:
                row["output"] = _clip(state["output"])
            if status == "error":
                row["error"] = _clip(state.get("error"))
            return row
        if ptype == "text" and _obj(part.get("time")).get("end") and not part.get("synthetic"):
            if (pid, "text") in self._seen:
                return None
            self._seen.add((pid, "text"))
            return {"type": "text", "text": _clip(part.get("text", ""))}
        if ptype == "step-start":
            return {"type": "step.start"}
        if ptype == "step-finish":
            return {"type": "step.finish", "reason": _clip(part.get("reason")), "tokens": _clip(part.get("tokens"))}
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
