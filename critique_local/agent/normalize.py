"""OpenCode events -> ``builder.event`` rows: tool calls (name + status), file edits,
assistant text, step boundaries and errors. Catalog noise, deltas and other sessions'
events are dropped; a tool part is reported once per status it reaches."""

from __future__ import annotations

from typing import Any

from critique_local.bounds import clip_json

MAX_FIELD_CHARS = 2000
MAX_SEEN = 100_000


def _clip(value: Any) -> Any:
    """Whatever the agent server sent, bounded: strings, lists, objects and nesting clipped."""
    return clip_json(value, max_chars=MAX_FIELD_CHARS, max_items=50, max_depth=6)


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class Normalizer:
    """Stateful per session: remembers which tool statuses and texts were already reported."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, event: dict[str, Any]) -> dict[str, Any] | None:
        kind = event.get("type")
        props = _obj(event.get("properties"))
        if props.get("sessionID", self.session_id) != self.session_id:
            return None
        if kind == "message.part.updated":
            return self._part(_obj(props.get("part")))
        if kind == "file.edited":
            return {"type": "file.edited", "path": _clip(props.get("file"))}
        if kind == "session.error":
            err = _obj(props.get("error"))
            data = _obj(err.get("data"))
            return {"type": "error", "name": _clip(err.get("name")),
                    "message": _clip(data.get("message") or str(_clip(data)))}
        if kind == "permission.asked":
            return {"type": "permission.rejected", "permission": _clip(props.get("permission")),
                    "patterns": _clip(props.get("patterns"))}
        return None

    def _part(self, part: dict[str, Any]) -> dict[str, Any] | None:
        if part.get("sessionID") not in (None, self.session_id):
            return None
        ptype = part.get("type")
        pid = str(part.get("id"))[:200]
        if ptype == "tool":
            state = _obj(part.get("state"))
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
