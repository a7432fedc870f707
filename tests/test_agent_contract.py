"""The agent harness seam: runs/ drives the agent only through ``agent/base.py``, and the
OpenCode harness turns OpenCode's replies into the contract's typed results."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from critique_local.agent.base import TurnErrorKind
from critique_local.agent.opencode.harness import reply_of
from critique_local.agent.opencode.sessions import session_id_of
from critique_local.errors import AgentError

RUNS = Path(__file__).resolve().parent.parent / "critique_local" / "runs"


def test_runs_name_no_agent_harness() -> None:
    for path in RUNS.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"opencode", text, re.IGNORECASE), f"{path.name} names OpenCode"
        assert not re.search(r"critique_local\.agent\.(?!base\b)", text), f"{path.name} imports past agent/base.py"


def test_a_finished_turn_is_its_last_answer() -> None:
    reply = reply_of({"info": {}, "parts": [{"type": "text", "text": " done \n"},
                                            {"type": "text", "text": "x", "synthetic": True}]}, "earlier", 1000)
    assert (reply.summary, reply.error) == ("done", None)
    assert reply_of({"parts": "not a list"}, "earlier text", 1000).summary == "earlier text"


def test_a_budget_refusal_a_model_error_and_other_failures_are_told_apart() -> None:
    budget = reply_of({"info": {"error": {"name": "APIError", "data": {
        "message": "Payment Required: budget_exceeded: maxTurns 3 model calls per turn used up"}}}}, "so far", 1000)
    assert budget.error is not None and budget.error.kind is TurnErrorKind.BUDGET
    assert budget.error.message == "maxTurns 3 model calls per turn used up" and budget.summary == "so far"
    model = reply_of({"info": {"error": {"name": "APIError", "data": {"message": "Bad Request"}}}}, "", 1000)
    assert model.error is not None and (model.error.kind, model.error.message) == (TurnErrorKind.MODEL, "Bad Request")
    other = reply_of({"info": {"error": "boom" * 1000}}, "", 1000)
    assert other.error is not None and other.error.kind is TurnErrorKind.AGENT and len(other.error.message) <= 1100


@pytest.mark.parametrize("state", [b"not json", b"[]", b'{"info": {}}', b'{"info": {"id": "x" }}',
                                   b'{"info": {"id": "ses_' + b"a" * 300 + b'"}}'])
def test_a_session_export_without_a_session_id_is_refused(state: bytes) -> None:
    with pytest.raises(AgentError):
        session_id_of(state)


def test_a_session_export_names_its_session() -> None:
    assert session_id_of(b'{"info": {"id": "ses_abc"}, "messages": []}') == "ses_abc"
