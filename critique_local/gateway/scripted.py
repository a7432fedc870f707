"""``critique/scripted``: a deterministic model for tests and the offline demo.

The script is the lines of the latest user message that start with ``@``:

    @write PATH        content follows, up to a line ``@end``; calls OpenCode's ``write`` tool
    @bash COMMAND      calls the ``bash`` tool
    @sleep SECONDS     the model stalls that long before its next answer
    @fail MESSAGE      the model call fails (HTTP 400) with MESSAGE
    @say TEXT          final assistant text (the turn's summary); ends the turn
    @repair            starts the steps for the next user message that has no script of its own
                       (e.g. validationMode tests sending failing output back): the N-th such
                       message after the script runs the N-th @repair section

One step is executed per model call. The step to take is derived from the conversation
itself (how many assistant messages follow the latest user message), so the model keeps no
state and the same conversation always gets the same answer. When the script is exhausted
without ``@say`` the model answers with a short summary of what it did. A prompt without
``@`` lines makes a small default edit (``CRITIQUE_SCRIPTED.md``) and a summary.
Usage is reported like a real provider: about four characters a token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MODEL_ID = "critique/scripted"
DEFAULT_FILE = "CRITIQUE_SCRIPTED.md"


@dataclass(frozen=True)
class Step:
    action: str  # write | bash | fail | say
    arg: str
    body: str = ""
    delay_s: float = 0.0


@dataclass(frozen=True)
class Reply:
    """What the model answers for one call."""

    text: str | None = None
    tool_name: str | None = None
    tool_args: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    delay_s: float = 0.0


class ScriptError(ValueError):
    """The script cannot be parsed (e.g. ``@write`` without ``@end``)."""


def parse_script(prompt: str) -> list[Step]:
    """The steps of the main section (before any ``@repair``)."""
    return parse_sections(prompt)[0]


def has_script(text: str) -> bool:
    return any(line.startswith("@") for line in text.splitlines())


def parse_sections(prompt: str) -> list[list[Step]]:
    """The main section's steps, then one list per ``@repair`` section."""
    sections: list[list[Step]] = []
    current: list[str] = []
    for line in prompt.splitlines():
        if line.rstrip("\r") == "@repair":
            sections.append(_parse_steps(current))
            current = []
        else:
            current.append(line)
    sections.append(_parse_steps(current))
    return sections


def _parse_steps(lines: list[str]) -> list[Step]:
    steps: list[Step] = []
    delay = 0.0
    i = 0
    while i < len(lines):
        line = lines[i].rstrip("\r")
        i += 1
        if not line.startswith("@"):
            continue
        verb, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if verb == "write":
            body: list[str] = []
            while i < len(lines) and lines[i].rstrip("\r") != "@end":
                body.append(lines[i])
                i += 1
            if i >= len(lines):
                raise ScriptError(f"@write {arg}: missing @end")
            i += 1
            steps.append(Step("write", arg, "\n".join(body) + ("\n" if body else ""), delay))
        elif verb == "sleep":
            try:
                delay += float(arg)
            except ValueError as exc:
                raise ScriptError(f"@sleep needs seconds, got {arg!r}") from exc
            continue
        elif verb in ("bash", "fail", "say"):
            steps.append(Step(verb, arg, "", delay))
        else:
            continue  # "@" lines that are not verbs are ordinary prompt text
        delay = 0.0
    if delay:
        steps.append(Step("say", "", "", delay))
    return steps


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _default_steps() -> list[Step]:
    return [
        Step("write", DEFAULT_FILE, "Touched by critique/scripted.\n"),
        Step("say", f"Added {DEFAULT_FILE}."),
    ]


def plan_reply(messages: list[dict[str, Any]], has_tools: bool) -> Reply:
    """Decide the answer to one chat-completion call."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    if last_user < 0:
        return Reply(text="Nothing to do.")
    if not has_tools:
        return Reply(text="Scripted run")  # auxiliary calls (titles, summaries)
    prompt = _text(messages[last_user].get("content"))
    try:
        steps = _steps_for(messages, last_user, prompt)
    except ScriptError as exc:
        return Reply(error=str(exc))
    done = sum(1 for m in messages[last_user + 1 :] if m.get("role") == "assistant")
    if done >= len(steps):
        return Reply(text=f"Done: completed {len(steps)} scripted step(s).")
    step = steps[done]
    if step.action == "write":
        return Reply(tool_name="write", tool_args={"filePath": step.arg, "content": step.body}, delay_s=step.delay_s)
    if step.action == "bash":
        return Reply(tool_name="bash", tool_args={"command": step.arg}, delay_s=step.delay_s)
    if step.action == "fail":
        return Reply(error=step.arg or "scripted failure", delay_s=step.delay_s)
    return Reply(text=step.arg or "Done.", delay_s=step.delay_s)


def _steps_for(messages: list[dict[str, Any]], last_user: int, prompt: str) -> list[Step]:
    if has_script(prompt):
        return parse_script(prompt)
    # a script-less message: the next @repair section of the latest scripted user message, if any
    users = [i for i, m in enumerate(messages[:last_user]) if m.get("role") == "user"]
    for nth, i in enumerate(reversed(users), start=1):
        text = _text(messages[i].get("content"))
        if has_script(text):
            sections = parse_sections(text)
            if len(sections) == 1:
                break
            return sections[nth] if nth < len(sections) else [Step("say", "Nothing left to repair.")]
    return _default_steps()


def estimate_tokens(payload: Any) -> int:
    return max(1, len(json.dumps(payload, ensure_ascii=False)) // 4)
