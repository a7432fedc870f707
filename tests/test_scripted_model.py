"""The scripted model decides each step from the conversation alone."""

from __future__ import annotations

import pytest

from critique_local.gateway.scripted import ScriptError, Step, parse_script, plan_reply

PROMPT = "Intro text\n@write a/b.txt\nline 1\nline 2\n@end\n@sleep 1.5\n@bash ls -la\n@say All done"


def convo(prompt: str, assistant_turns: int) -> list[dict[str, object]]:
    msgs: list[dict[str, object]] = [{"role": "system", "content": "sys"}, {"role": "user", "content": prompt}]
    for i in range(assistant_turns):
        msgs += [{"role": "assistant", "tool_calls": [{"id": f"c{i}"}]}, {"role": "tool", "content": "ok"}]
    return msgs


def test_parse_script() -> None:
    assert parse_script(PROMPT) == [
        Step("tool", "write", {"filePath": "a/b.txt", "content": "line 1\nline 2\n"}),
        Step("tool", "bash", {"command": "ls -la"}, 1.5),
        Step("say", "All done"),
    ]


def test_tool_steps_call_any_tool_with_json_arguments() -> None:
    script = ('@tool edit {"filePath": "app.py", "oldString": "a", "newString": "b"}\n'
              "@tool todoread\n"
              '@tool task {"description": "sub", "subagent_type": "general",\n'
              '  "prompt": "@bash echo hi\\n@say child"}\n'
              "@end\n"
              "@say ok")
    assert parse_script(script) == [
        Step("tool", "edit", {"filePath": "app.py", "oldString": "a", "newString": "b"}),
        Step("tool", "todoread", {}),
        Step("tool", "task", {"description": "sub", "subagent_type": "general", "prompt": "@bash echo hi\n@say child"}),
        Step("say", "ok"),
    ]
    reply = plan_reply(convo(script, 2), has_tools=True)
    assert reply.tool_name == "task" and reply.tool_args["prompt"] == "@bash echo hi\n@say child"
    # the child session's conversation has the task prompt as its user message: its own script
    child = plan_reply(convo(reply.tool_args["prompt"], 0), has_tools=True)
    assert child.tool_name == "bash" and child.tool_args == {"command": "echo hi"}


@pytest.mark.parametrize("script", [
    "@tool",  # no name
    "@tool bad/name {}",
    "@tool edit [1, 2]",  # not an object
    '@tool edit {"filePath": ',  # unfinished, no @end
    '@tool edit {"filePath": \n"x"\n@end',  # still not JSON
])
def test_bad_tool_steps_are_script_errors(script: str) -> None:
    with pytest.raises(ScriptError):
        parse_script(script)
    assert plan_reply(convo(script, 0), has_tools=True).error


def test_write_without_end_is_an_error() -> None:
    with pytest.raises(ScriptError):
        parse_script("@write x\nno end")


def test_one_step_per_call_in_order() -> None:
    first = plan_reply(convo(PROMPT, 0), has_tools=True)
    assert first.tool_name == "write" and first.tool_args == {"filePath": "a/b.txt", "content": "line 1\nline 2\n"}
    second = plan_reply(convo(PROMPT, 1), has_tools=True)
    assert second.tool_name == "bash" and second.tool_args == {"command": "ls -la"} and second.delay_s == 1.5
    third = plan_reply(convo(PROMPT, 2), has_tools=True)
    assert third.text == "All done" and third.tool_name is None


def test_steps_restart_for_each_new_user_message() -> None:
    msgs = [*convo(PROMPT, 3), {"role": "assistant", "content": "All done"}, {"role": "user", "content": "@say two"}]
    assert plan_reply(msgs, has_tools=True).text == "two"


def test_fail_and_exhausted_script() -> None:
    assert plan_reply(convo("@fail boom", 0), has_tools=True).error == "boom"
    assert plan_reply(convo("@bash true", 1), has_tools=True).text == "Done: completed 1 scripted step(s)."


def test_prompt_without_script_makes_a_default_edit() -> None:
    reply = plan_reply(convo("Please improve things", 0), has_tools=True)
    assert reply.tool_name == "write" and reply.tool_args["filePath"] == "CRITIQUE_SCRIPTED.md"


def test_plain_calls_follow_the_script() -> None:
    assert plan_reply(convo("@say hello", 0), has_tools=False).text == "hello"
    assert plan_reply(convo("@sleep 2\n@say late", 0), has_tools=False) == plan_reply(convo("@sleep 2\n@say late", 0),
                                                                                       has_tools=True)
    assert plan_reply(convo("@fail nope", 0), has_tools=False).error == "nope"
    tool_step = plan_reply(convo(PROMPT, 0), has_tools=False)
    assert tool_step.tool_name is None and "write" in str(tool_step.error) and "offers no tools" in str(tool_step.error)
    assert plan_reply(convo("Summarise this conversation", 0), has_tools=False).text == "Scripted run"


REPAIRING = "@write t.py\nx = 1\n@end\n@say first\n@repair\n@write t.py\nx = 2\n@end\n@say fixed\n@repair\n@say again"


def test_script_less_messages_run_the_repair_sections_in_order() -> None:
    msgs = convo(REPAIRING, 1)
    assert plan_reply(msgs, has_tools=True).text == "first"
    msgs += [{"role": "assistant", "content": "first"}, {"role": "user", "content": "The tests failed:\n    E x"}]
    repair = plan_reply(msgs, has_tools=True)
    assert repair.tool_name == "write" and repair.tool_args == {"filePath": "t.py", "content": "x = 2\n"}
    msgs += [{"role": "assistant", "tool_calls": [{"id": "r"}]}, {"role": "tool", "content": "ok"}]
    assert plan_reply(msgs, has_tools=True).text == "fixed"
    msgs += [{"role": "assistant", "content": "fixed"}, {"role": "user", "content": "still failing"}]
    assert plan_reply(msgs, has_tools=True).text == "again"
    msgs += [{"role": "assistant", "content": "again"}, {"role": "user", "content": "and again"}]
    assert plan_reply(msgs, has_tools=True).text == "Nothing left to repair."


def test_without_repair_sections_a_plain_follow_up_makes_the_default_edit() -> None:
    msgs = [*convo("@say hi", 0), {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]
    assert plan_reply(msgs, has_tools=True).tool_args.get("filePath") == "CRITIQUE_SCRIPTED.md"


def test_history_counts_the_conversation_it_was_sent() -> None:
    msgs: list[dict[str, object]] = [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "@say one"},
        {"role": "assistant", "content": "one"}, {"role": "user", "content": "@write a\nx\n@end\n@history"},
        {"role": "assistant", "tool_calls": [{"id": "c1"}]}, {"role": "tool", "content": "ok"}]
    assert plan_reply(msgs, has_tools=True).text == "history: 2 user messages, 2 assistant messages"
    assert plan_reply(msgs[:4], has_tools=True).tool_name == "write"
