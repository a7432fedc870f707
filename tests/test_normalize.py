"""The event normaliser keeps the run's session and its subagents' sessions, marks the latter,
and drops everyone else's (event shapes as opencode 1.18.33 sends them)."""

from __future__ import annotations

from typing import Any

from critique_local.agent.opencode.normalize import Normalizer

RUN, CHILD, GRANDCHILD, OTHER = "ses_run", "ses_child", "ses_grandchild", "ses_other"


def created(sid: str, parent: str | None) -> dict[str, Any]:
    return {"type": "session.created", "properties": {"info": {"id": sid, "parentID": parent, "title": "t"}}}


def tool(sid: str, pid: str, name: str, status: str, **state: Any) -> dict[str, Any]:
    return {"type": "message.part.updated", "properties": {"part": {
        "id": pid, "sessionID": sid, "type": "tool", "tool": name, "callID": "c-" + pid,
        "state": {"status": status, **state}}}}


def test_subagent_sessions_are_reported_and_marked() -> None:
    norm = Normalizer(RUN)
    task_meta = {"parentSessionId": RUN, "sessionId": CHILD}
    rows = [norm(e) for e in (
        tool(RUN, "p1", "task", "pending"),
        created(CHILD, RUN),
        tool(RUN, "p1", "task", "running", input={"prompt": "@say x"}, metadata=task_meta),
        tool(CHILD, "p2", "bash", "completed", input={"command": "echo warm > /tmp/marker"}, output="",
             metadata={}),
        created(GRANDCHILD, CHILD),
        tool(GRANDCHILD, "p3", "read", "error", error="no such file"),
        created(OTHER, None),
        tool(OTHER, "p4", "bash", "completed", output="not ours"),
        {"type": "session.error", "properties": {"sessionID": CHILD, "error": {"name": "APIError",
                                                                              "data": {"message": "boom"}}}},
        tool(RUN, "p1", "task", "completed", output="child done", metadata={**task_meta, "truncated": False}),
    )]
    pending, _, running, child_bash, _, grandchild_read, _, other, child_error, done = rows
    assert pending is not None and "sessionId" not in pending and "childSessionId" not in pending
    assert running is not None and running["childSessionId"] == CHILD and "sessionId" not in running
    assert child_bash == {"type": "tool", "tool": "bash", "status": "completed", "callId": "c-p2",
                          "input": {"command": "echo warm > /tmp/marker"}, "output": "",
                          "sessionId": CHILD, "parentSessionId": RUN}
    assert grandchild_read is not None and grandchild_read["sessionId"] == GRANDCHILD
    assert grandchild_read["parentSessionId"] == CHILD and grandchild_read["error"] == "no such file"
    assert other is None
    assert child_error == {"type": "error", "name": "APIError", "message": "boom", "sessionId": CHILD,
                           "parentSessionId": RUN}
    assert done is not None and done["output"] == "child done" and done["childSessionId"] == CHILD
    assert norm.owns(RUN) and norm.owns(CHILD) and norm.owns(GRANDCHILD) and not norm.owns(OTHER)


def test_a_child_is_known_from_the_task_part_alone() -> None:
    """If the child's session.created was missed, the task part's metadata names it."""
    norm = Normalizer(RUN)
    norm(tool(RUN, "p1", "task", "running", metadata={"sessionId": CHILD}))
    row = norm(tool(CHILD, "p2", "glob", "completed", output="a.py"))
    assert row is not None and row["sessionId"] == CHILD


def test_other_sessions_cannot_adopt_themselves_into_the_run() -> None:
    norm = Normalizer(RUN)
    norm(created(CHILD, OTHER))  # a child of a session that is not the run's
    norm(tool(OTHER, "p1", "task", "running", metadata={"sessionId": "ses_x"}))
    assert not norm.owns(CHILD) and not norm.owns("ses_x")
    assert norm(tool(CHILD, "p2", "bash", "completed", output="x")) is None
