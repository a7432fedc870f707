"""The rules behind ``model_unreachable`` (the e2e cases are in tests/e2e/test_model_unreachable.py):
what the gateway records of a turn's model calls, when the watch calls a model unreachable, how
upstream failures are classified, and how OpenCode's events become the watch's signals and
``retry`` events."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from critique_local.agent.opencode.harness import model_signals
from critique_local.agent.opencode.normalize import Normalizer
from critique_local.gateway.calls import CallLog, ModelCalls
from critique_local.gateway.upstream import UpstreamError
from critique_local.runs.modelwatch import ModelWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_call_log_tracks_unanswered_calls_and_failure_streaks() -> None:
    clock = Clock()
    log = CallLog(clock=clock)
    first = log.start()
    assert log.calls == 1 and log.open_calls == 1 and log.oldest_unanswered() == 1000.0
    clock.now += 5
    log.failed(first, "upstream answered 503")
    log.end(first)
    assert log.failing_since == 1000.0 + 5 and log.failures == 1 and log.oldest_unanswered() is None
    clock.now += 5
    second = log.start()
    log.failed(second, "upstream unreachable: ConnectError")
    log.end(second)
    assert log.failing_since == 1005.0 and log.failures == 2 and log.last_failure.endswith("ConnectError")
    third = log.start()
    log.answered(third)  # one answer ends the streak
    assert log.failing_since is None and log.failures == 0 and log.open_calls == 1
    log.end(third)
    assert log.open_calls == 0


def test_a_call_the_gateway_finishes_itself_counts_as_answered_unless_the_sandbox_hung_up() -> None:
    log = CallLog(clock=Clock())
    down = log.start()
    log.failed(down, "down")
    log.end(down)
    refused = log.start()  # e.g. a budget refusal: the gateway answered, the provider was not asked
    log.end(refused)
    assert log.failing_since is None
    down = log.start()
    log.failed(down, "down")
    log.end(down)
    gone = log.start()
    log.end(gone, cancelled=True)  # says nothing about the provider
    assert log.failing_since is not None and log.oldest_unanswered() is None and log.open_calls == 0


def test_the_registry_keeps_only_open_logs() -> None:
    calls = ModelCalls()
    old = calls.open("run_1", "p")
    new = calls.open("run_1", "p")
    calls.close("run_1", old)  # a stale close does not drop the newer log
    assert calls.get("run_1") is new
    calls.close("run_1", new)
    assert calls.get("run_1") is None


def watch(clock: Clock, bound: float = 30) -> ModelWatch:
    return ModelWatch(ModelCalls(clock), "run_1", model_id="acme/m", provider="prov", bound_s=bound,
                      gateway_url="http://172.18.0.1:8788/api/v1", sandbox=None, agent_name="OpenCode", clock=clock)


def feed(w: ModelWatch, event: dict[str, Any]) -> None:
    """An OpenCode event of the run's session ``ses_1``, as the OpenCode harness reports it."""
    for signal in model_signals(event, "ses_1"):
        w.observe(signal)


def tool(status: str, part: str = "prt_1", session: str = "ses_1") -> dict[str, Any]:
    return {"type": "message.part.updated",
            "properties": {"part": {"id": part, "sessionID": session, "type": "tool", "state": {"status": status}}}}


def test_a_provider_failing_for_the_bound_ends_the_turn_with_its_cause() -> None:
    clock = Clock()
    w = watch(clock)
    call = w.calls.start()
    w.calls.failed(call, "upstream answered 503: busy")
    w.calls.end(call)
    clock.now += 29
    assert asyncio.run(w.check()) is None
    clock.now += 1
    reason = asyncio.run(w.check())
    assert reason is not None and "'prov'" in reason and "503: busy" in reason and "providers.prov.base_url" in reason
    assert asyncio.run(w.explain()) is not None  # OpenCode giving up first is explained the same way


def test_a_call_the_provider_never_answers_ends_the_turn_after_the_bound() -> None:
    clock = Clock()
    w = watch(clock)
    w.calls.start()
    clock.now += 29.5
    assert asyncio.run(w.check()) is None
    clock.now += 0.5
    reason = asyncio.run(w.check())
    assert reason is not None and "did not answer" in reason and "unreachable_timeout_s = 30" in reason


def test_waiting_for_the_model_only_counts_while_no_tool_runs_and_no_call_arrived() -> None:
    clock = Clock()
    w = watch(clock)
    assert w._no_call_reached_us()
    feed(w, tool("running"))
    assert not w._no_call_reached_us()  # a long bash step is not a missing model
    feed(w, tool("running", session="ses_other"))  # other sessions are not ours
    clock.now += 500
    feed(w, tool("completed"))
    assert w._no_call_reached_us() and w.needs_model_since == clock.now
    call = w.calls.start()
    assert not w._no_call_reached_us()  # a call reached the gateway
    w.calls.answered(call)
    w.calls.end(call)
    assert not w._no_call_reached_us()
    feed(w, {"type": "session.status",
               "properties": {"sessionID": "ses_1", "status": {"type": "retry", "attempt": 1, "message": "Unable"}}})
    assert w.retries == 1 and w.last_retry == "Unable"


def test_without_a_probe_a_silent_gateway_needs_opencode_retries_to_be_reported() -> None:
    clock = Clock()
    w = watch(clock)
    clock.now += 30
    assert asyncio.run(w.check()) is None  # OpenCode may just be slow: nothing says otherwise
    feed(w, {"type": "session.status", "properties": {"sessionID": "ses_1", "status": {
        "type": "retry", "attempt": 1, "message": "Cannot connect to API: Unable to connect."}}})
    clock.now += 29
    assert asyncio.run(w.check()) is None  # looked a moment ago
    clock.now += 1
    reason = asyncio.run(w.check())
    assert reason is not None and "cannot reach the model gateway (http://172.18.0.1:8788/api/v1)" in reason
    assert "Cannot connect to API" in reason and "docker.host_firewall" in reason and "e2b.gateway_url" in reason


@pytest.mark.parametrize(("status", "code", "unavailable"), [
    (400, "upstream_bad_request", False), (401, "upstream_unauthorized", False), (404, "upstream_bad_request", False),
    (429, "upstream_rate_limited", True), (500, "upstream_error", True), (503, "upstream_error", True),
])
def test_upstream_answers_are_classified(status: int, code: str, unavailable: bool) -> None:
    err = UpstreamError.from_status(status, "x")
    assert (err.code, err.unavailable) == (code, unavailable)


def test_upstream_transport_errors_are_unavailable_and_say_why() -> None:
    refused = UpstreamError.from_exception(httpx.ConnectError("[Errno 111] Connection refused"))
    assert refused.unavailable and "Connection refused" in refused.message and refused.status == 502
    timeout = UpstreamError.from_exception(httpx.ReadTimeout("timed out"))
    assert timeout.unavailable and timeout.code == "upstream_timeout" and timeout.status == 504


def test_opencode_retries_become_retry_events() -> None:
    normalize = Normalizer("ses_1")
    row = normalize({"type": "session.status", "properties": {"sessionID": "ses_1", "status": {
        "type": "retry", "attempt": 2, "message": "service unavailable", "next": 1795987061541}}})
    assert row == {"type": "retry", "attempt": 2, "message": "service unavailable",
                   "retryAt": "2026-11-29T21:17:41.541Z"}
    assert normalize({"type": "session.status", "properties": {"sessionID": "ses_1", "status": {"type": "busy"}}}) is None
    assert normalize({"type": "session.status", "properties": {"sessionID": "ses_2", "status": {
        "type": "retry", "attempt": 1, "message": "x"}}}) is None
