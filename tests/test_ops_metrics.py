"""What the metrics make of a run's events (the same rows the EventHub stores), read back
through prometheus-client's text parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from critique_local.ops.metrics import Metrics
from critique_local.store.events import EventRow


def values(m: Metrics) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                out[s.name + (f"[{labels}]" if labels else "")] = s.value
    return out


async def feed(m: Metrics, run_id: str, *events: tuple[str, dict[str, object]]) -> None:
    for seq, (kind, data) in enumerate(events, start=1):
        await m.observe(EventRow(run_id, seq, kind, data, "2026-01-01T00:00:00Z"))


def status(value: str, turns: int = 0, **extra: object) -> tuple[str, dict[str, object]]:
    return "run.status", {"status": value, "turnCount": turns, **extra}


async def test_turns_outcomes_durations_and_sandboxes_from_run_events() -> None:
    m = Metrics()
    await feed(m, "run_a", status("queued"), status("running"),
               ("builder.event", {"type": "sandbox.ready", "warm": False}),
               ("builder.event", {"type": "agent.ready"}),
               ("builder.event", {"type": "validation", "final": False, "passed": True, "durationMs": 1500}),
               ("builder.event", {"type": "validation", "final": True, "passed": True, "durationMs": 1500}),
               status("running", phase="collecting"), status("idle", 1),
               status("queued", 1), status("running", 1), status("cancelled", 2))
    await feed(m, "run_b", status("queued"), status("running"),
               ("builder.event", {"type": "sandbox.ready", "warm": True}),
               ("builder.event", {"type": "error", "code": "model_error"}), status("failed", 1))
    await feed(m, "run_c", status("queued"), status("running"), status("failed", 0, error={"code": "patch_too_large"}))
    m.gateway_call("critique/scripted", None, "ok", (120, 30), 0.5, 0.2)
    m.gateway_call("acme/coder", "standin", "upstream_timeout", None, 0.0, 3.0)
    m.upstream_error("standin", "upstream_timeout")
    m.egress_decision({"decision": "denied"})
    async with m.sse_stream():
        during = values(m)["critique_sse_subscribers"]
    v = values(m)
    assert v["critique_runs_created_total"] == 3
    assert v["critique_turns_started_total"] == 4  # a second "running" of the same turn is not a new turn
    assert v["critique_turns_finished_total"] == 1
    assert v["critique_turns_failed_total[code=cancelled]"] == 1
    assert v["critique_turns_failed_total[code=model_error]"] == 1
    assert v["critique_turns_failed_total[code=patch_too_large]"] == 1
    assert v["critique_turn_duration_seconds_count[outcome=failed]"] == 3
    assert v["critique_sandboxes_provisioned_total[source=new]"] == 1
    assert v["critique_sandboxes_provisioned_total[source=pool]"] == 1
    assert v["critique_agent_ready_duration_seconds_count[source=new]"] == 1
    assert v["critique_validation_duration_seconds_count[passed=true]"] == 1  # the final summary is not a run
    assert v["critique_validation_duration_seconds_sum[passed=true]"] == 1.5
    assert v["critique_gateway_calls_total[model=critique/scripted,outcome=ok]"] == 1
    assert v["critique_gateway_tokens_total[direction=input,model=critique/scripted]"] == 120
    assert v["critique_gateway_credits_total[model=critique/scripted]"] == 0.5
    assert v["critique_gateway_calls_total[model=acme/coder,outcome=upstream_timeout]"] == 1
    assert v["critique_gateway_call_duration_seconds_count[upstream=standin]"] == 1
    assert v["critique_gateway_upstream_errors_total[code=upstream_timeout,provider=standin]"] == 1
    assert v["critique_egress_decisions_total[decision=denied]"] == 1
    assert during == 1 and v["critique_sse_subscribers"] == 0


async def test_a_broken_event_never_raises() -> None:
    m = Metrics()
    await m.observe(EventRow("run_x", 1, "builder.event", {"type": "validation", "durationMs": "soon"}, ""))
    await m.observe(EventRow("run_x", 2, "run.status", {"status": None, "error": "not a dict"}, ""))
    assert values(m)["critique_turns_started_total"] == 0
