"""What one call used: the provider's reported usage, else an estimate (flagged)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from critique_local.gateway.scripted import estimate_tokens


@dataclass
class Meter:
    """Fed with response chunks (or a whole response); reports usage at the end."""

    messages: list[dict[str, Any]]
    reported: dict[str, Any] | None = None
    fed: bool = False
    _output_chars: int = 0
    _tool_chars: int = field(default=0)

    def feed(self, data: dict[str, Any]) -> None:
        self.fed = True
        if isinstance(data.get("usage"), dict):
            self.reported = data["usage"]
        for choice in data.get("choices") or []:
            part = choice.get("delta") or choice.get("message") or {}
            self._output_chars += len(part.get("content") or "")
            for call in part.get("tool_calls") or []:
                self._tool_chars += len(json.dumps(call.get("function") or {}))

    def result(self) -> tuple[int, int, bool]:
        """(input tokens, output tokens, estimated)."""
        if self.reported and "prompt_tokens" in self.reported:
            return int(self.reported.get("prompt_tokens") or 0), int(self.reported.get("completion_tokens") or 0), False
        return estimate_tokens(self.messages), max(1, (self._output_chars + self._tool_chars) // 4), True
