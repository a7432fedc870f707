"""``critique/scripted``: a deterministic model for tests and the offline demo.

The script is the lines of the latest user message that start with ``@``:

    @write PATH        content follows, up to a line ``@end``; calls OpenCode's ``write`` tool
    @bash COMMAND      calls the ``bash`` tool
    @tool NAME {JSON}  calls the tool NAME with the JSON object as its arguments (nothing after
                       NAME: ``{}``); a JSON object that does not end on its line continues on
                       the following lines up to a line ``@end``
    @sleep SECONDS     the model stalls that long before its next answer
    @fail MESSAGE      the model call fails (HTTP 400) with MESSAGE
    @say TEXT          final assistant text (the turn's summary); ends the turn
    @history           final assistant text ``history: U user messages, A assistant messages``,
                       counted from the conversation this call was sent (the whole transcript the
                       agent holds, this turn's messages included); ends the turn
    @repair            starts the steps for the next user message that has no script of its own
                       (e.g. validationMode tests sending failing output back): the N-th such
                       message after the script runs the N-th @repair section

One step is executed per model call. Calls without tools (a plain chat completion) follow the
same script; a step that calls a tool cannot be answered there and fails the call (HTTP 400).
The step to take is derived from the conversation itself (how many assistant messages follow the latest user message), so the model keeps no
state and the same conversation always gets the same answer. When the script is exhausted
without ``@say`` the model answers with a short summary of what it did. A prompt without
``@`` lines makes a small default edit (``CRITIQUE_SCRIPTED.md``) and a summary; a plain call
without a script answers ``Scripted run``.
Usage is reported like a real provider: about four characters a token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

MODEL_ID = "critique/scripted"
DEFAULT_FILE = "CRITIQUE_SCRIPTED.md"


TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Step:
    action: str  # tool | fail | say | history
    arg: str  # the tool's name, the failure message or the text to say
    args: dict[str, Any] = field(default_factory=dict)  # a tool's arguments
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
    """The script cannot be parsed (e.g. ``@write`` without ``@end``, ``@tool`` without a JSON
    object)."""


def parse_script(prompt: str) -> list[Step]:
    """The steps of the main section (before any ``@repair``). Raises :class:`ScriptError`."""
    return parse_sections(prompt)[0]


def has_script(text: str) -> bool:
    return any(line.startswith("@") for line in text.splitlines())


def parse_sections(prompt: str) -> list[list[Step]]:
    """The main section's steps, then one list per ``@repair`` section. Raises
    :class:`ScriptError`."""
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


def _until_end(lines: list[str], i: int, what: str) -> tuple[list[str], int]:
    """The lines from ``i`` up to a line ``@end`` and the index after it."""
    body: list[str] = []
    while i < len(lines) and lines[i].rstrip("\r") != "@end":
        body.append(lines[i])
        i += 1
    if i >= len(lines):
        raise ScriptError(f"{what}: missing @end")
    return body, i + 1


def _tool_step(arg: str, lines: list[str], i: int, delay: float) -> tuple[Step, int]:
    name, _, raw = arg.partition(" ")
    if not TOOL_NAME.fullmatch(name):
        raise ScriptError(f"@tool needs a tool name (letters, digits, _ . -), got {name!r}")
    raw = raw.strip()
    if not raw:
        return Step("tool", name, {}, delay), i
    try:
        args = json.loads(raw)
    except ValueError:
        body, i = _until_end(lines, i, f"@tool {name}")
        try:
            args = json.loads("\n".join([raw, *body]))
        except ValueError as exc:
            raise ScriptError(f"@tool {name}: the arguments are not valid JSON ({exc})") from exc
    if not isinstance(args, dict):
        raise ScriptError(f"@tool {name}: the arguments must be a JSON object")
    return Step("tool", name, args, delay), i


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
            body, i = _until_end(lines, i, f"@write {arg}")
            content = "\n".join(body) + ("\n" if body else "")
            steps.append(Step("tool", "write", {"filePath": arg, "content": content}, delay))
        elif verb == "bash":
            steps.append(Step("tool", "bash", {"command": arg}, delay))
        elif verb == "tool":
            step, i = _tool_step(arg, lines, i, delay)
            steps.append(step)
        elif verb == "sleep":
            try:
                delay += float(arg)
            except ValueError as exc:
                raise ScriptError(f"@sleep needs seconds, got {arg!r}") from exc
            continue
        elif verb in ("fail", "say", "history"):
            steps.append(Step(verb, arg, {}, delay))
        else:
            continue  # "@" lines that are not verbs are ordinary prompt text
        delay = 0.0
    if delay:
        steps.append(Step("say", "", {}, delay))
    return steps


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _default_steps() -> list[Step]:
    return [
        Step("tool", "write", {"filePath": DEFAULT_FILE, "content": "Touched by critique/scripted.\n"}),
        Step("say", f"Added {DEFAULT_FILE}."),
    ]


def plan_reply(messages: list[dict[str, Any]], has_tools: bool) -> Reply:
    """Decide the answer to one chat-completion call. ``has_tools``: the call offers tools (an
    agent's call); without them a tool step is answered with an error."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    if last_user < 0:
        return Reply(text="Nothing to do.")
    prompt = _text(messages[last_user].get("content"))
    try:
        steps = _steps_for(messages, last_user, prompt)
    except ScriptError as exc:
        return Reply(error=str(exc))
    if steps is None:
        if not has_tools:
            return Reply(text="Scripted run")  # a plain call without a script (e.g. a title request)
        steps = _default_steps()
    done = sum(1 for m in messages[last_user + 1 :] if m.get("role") == "assistant")
    if done >= len(steps):
        return Reply(text=f"Done: completed {len(steps)} scripted step(s).")
    step = steps[done]
    if step.action == "tool":
        if not has_tools:
            return Reply(error=f"step {done + 1} calls the tool {step.arg!r}, but this call offers no tools",
                         delay_s=step.delay_s)
        return Reply(tool_name=step.arg, tool_args=step.args, delay_s=step.delay_s)
    if step.action == "fail":
        return Reply(error=step.arg or "scripted failure", delay_s=step.delay_s)
    if step.action == "history":
        return Reply(text=history_text(messages), delay_s=step.delay_s)
    return Reply(text=step.arg or "Done.", delay_s=step.delay_s)


def history_text(messages: list[dict[str, Any]]) -> str:
    """``history: U user messages, A assistant messages`` of a conversation (by role)."""
    users = sum(1 for m in messages if m.get("role") == "user")
    assistants = sum(1 for m in messages if m.get("role") == "assistant")
    return f"history: {users} user messages, {assistants} assistant messages"


def _steps_for(messages: list[dict[str, Any]], last_user: int, prompt: str) -> list[Step] | None:
    """The steps for the latest user message; None when no message has a script."""
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
    return None


def estimate_tokens(payload: Any) -> int:
    return max(1, len(json.dumps(payload, ensure_ascii=False)) // 4)
