"""The durable agent state as the harness reads it (``Harness.message_count``, ``Harness.truncate``):
message counts and the transcript of an earlier turn (a fork's, a restore's), for OpenCode's
export format. ``runs/`` never reads the export's format itself."""

from __future__ import annotations

import json

import pytest

from critique_local.agent.opencode import OpenCodeHarness
from critique_local.errors import AgentError

EXPORT = json.dumps({"info": {"id": "ses_1"}, "messages": [{"info": {"id": f"m{i}"}, "parts": []} for i in range(5)]})
HARNESS = OpenCodeHarness()


def test_message_count_and_truncation() -> None:
    assert HARNESS.message_count(EXPORT.encode()) == 5
    cut = HARNESS.truncate(EXPORT.encode(), 2)
    assert HARNESS.message_count(cut) == 2
    assert json.loads(cut)["info"] == {"id": "ses_1"}
    assert [m["info"]["id"] for m in json.loads(cut)["messages"]] == ["m0", "m1"]
    assert HARNESS.truncate(EXPORT.encode(), 9) == HARNESS.truncate(EXPORT.encode(), 5)


@pytest.mark.parametrize("state", [b"not json", b"[]", b'{"info": {}}'])
def test_a_state_without_messages_is_an_agent_error(state: bytes) -> None:
    with pytest.raises(AgentError):
        HARNESS.message_count(state)
    with pytest.raises(AgentError):
        HARNESS.truncate(state, 1)
