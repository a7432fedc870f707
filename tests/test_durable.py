"""The durable agent state as the harness reads it (``Harness.message_count``, ``Harness.truncate``):
message counts and the transcript of an earlier turn (a fork's). ``runs/`` never reads the
export's format itself."""

from __future__ import annotations

import json

import pytest

from critique_local.agent.opencode import OpenCodeHarness
from critique_local.errors import AgentError

HARNESS = OpenCodeHarness()
message_count, truncated = HARNESS.message_count, HARNESS.truncate

EXPORT = json.dumps({"info": {"id": "ses_1"}, "messages": [{"info": {"id": f"m{i}"}, "parts": []} for i in range(5)]})


def test_message_count_and_truncation() -> None:
    assert message_count(EXPORT.encode()) == 5
    cut = truncated(EXPORT.encode(), 2)
    assert message_count(cut) == 2
    assert json.loads(cut)["info"] == {"id": "ses_1"}
    assert [m["info"]["id"] for m in json.loads(cut)["messages"]] == ["m0", "m1"]


@pytest.mark.parametrize("state", [b"not json", b"[]", b'{"info": {}}'])
def test_a_state_without_messages_is_an_agent_error(state: bytes) -> None:
    with pytest.raises(AgentError):
        message_count(state)
    with pytest.raises(AgentError):
        truncated(state, 1)
