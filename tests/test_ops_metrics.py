"""What the metrics make of a run's events (the same rows the EventHub stores), read back
through prometheus-client's text parser; every family the operator needs, named and typed by
Prometheus conventions; the gauges read from the database at scrape time."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from critique_local.ops.metrics import Metrics
from critique_local.runs.spec import RunSpec
from critique_local.store import runs as runs_store
from critique_local.store.db import Database
from critique_local.store.events import EventRow
from critique_local.store.keys import ensure_user
from critique_local.tokens import new_id


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


# every family the issue asks for, as prometheus-client's parser names it (counters without
# _total), with its type and label names
FAMILIES: dict[str, tuple[str, set[str]]] = {
    "critique_runs": ("gauge", {"status", "lifecycle"}),
    "critique_runs_created": ("counter", set()),
    "critique_queue_depth": ("gauge", set()),
    "critique_turns_started": ("counter", set()),
    "critique_turns_finished": ("counter", set()),
    "critique_turns_failed": ("counter", {"code"}),
    "critique_agent_ready_duration_seconds": ("histogram", {"source"}),
    "critique_turn_duration_seconds": ("histogram", {"outcome"}),
    "critique_validation_duration_seconds": ("histogram", {"passed"}),
    "critique_gateway_calls": ("counter", {"model", "outcome"}),
    "critique_gateway_tokens": ("counter", {"model", "direction"}),
    "critique_gateway_credits": ("counter", {"model"}),
    "critique_gateway_call_duration_seconds": ("histogram", {"upstream"}),
    "critique_gateway_upstream_errors": ("counter", {"provider", "code"}),
    "critique_sandboxes": ("gauge", {"state"}),
    "critique_sandboxes_provisioned": ("counter", {"source"}),
    "critique_webhook_deliveries": ("gauge", {"state"}),
    "critique_webhook_delivery_attempts": ("counter", {"outcome"}),
    "critique_sse_subscribers": ("gauge", set()),
    "critique_egress_decisions": ("counter", {"decision"}),
}
NAME = re.compile(r"critique_[a-z][a-z0-9_]*[a-z0-9]")


async def _fed() -> Metrics:
    """Metrics with a sample in every labelled family."""
    m = Metrics()
    await feed(m, "run_a", status("queued"), status("running"),
               ("builder.event", {"type": "sandbox.ready", "warm": False}), ("builder.event", {"type": "agent.ready"}),
               ("builder.event", {"type": "validation", "passed": False, "durationMs": 20}),
               ("builder.event", {"type": "error", "code": "model_error"}), status("failed", 1))
    m.gateway_call("critique/scripted", None, "ok", (1, 2), 0.1, 0.01)
    m.upstream_error("standin", "upstream_error")
    m.egress_decision({"decision": "allowed"})
    m.webhook_attempt("delivered")
    m.runs.labels("failed", "failed").set(1)
    m.sandboxes.labels("paused").set(0)
    m.webhook_deliveries.labels("delivered").set(1)
    return m


async def test_every_family_exists_with_its_type_and_labels_by_prometheus_conventions() -> None:
    text = (await _fed()).exposition().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == set(FAMILIES)
    for name, (kind, labels) in FAMILIES.items():
        family = families[name]
        assert family.type == kind, name
        assert family.documentation.strip(), f"{name} has no HELP"
        assert NAME.fullmatch(name), name
        assert family.samples, name
        for s in family.samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
            if kind == "counter":
                assert s.name == name + "_total", s.name  # counters end in _total
            elif kind == "histogram":
                assert s.name in (name + "_bucket", name + "_sum", name + "_count"), s.name
            else:
                assert s.name == name and not name.endswith(("_total", "_count", "_sum", "_bucket")), s.name
        if kind == "histogram" or "duration" in name or "latency" in name:
            assert name.endswith("_seconds"), f"{name}: durations are in seconds, the unit in the name"
        if kind == "histogram":
            assert any(s.labels.get("le") == "+Inf" for s in family.samples), name
    assert not [s.name for f in families.values() for s in f.samples if s.name.endswith("_created")]
    for line in text.splitlines():  # the exposition's own declarations match the names above
        if line.startswith("# TYPE "):
            _, _, declared, kind = line.split()
            assert declared in FAMILIES or declared.removesuffix("_total") in FAMILIES, declared


async def test_gauges_read_at_scrape_time_count_paused_sessions_apart_from_idle_ones(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "critique.db")
    try:
        user = await ensure_user(db, "alice")
        repo = await runs_store.ensure_repository(db, new_id("repo"), "acme/web", "local")
        states = {"busy": ("running", "sbx_1", None), "idle": ("idle", "sbx_2", None),
                  "paused_in_place": ("idle", "sbx_3", "2026-01-01T00:00:00Z"),
                  "paused_removed": ("idle", None, "2026-01-01T00:00:00Z"), "queued": ("queued", None, None),
                  "lost": ("idle", None, None), "done": ("completed", None, None)}
        for name, (run_status, sandbox, paused) in states.items():
            run = runs_store.NewRun(id=f"run_{name}", user_id=user, repository_id=repo, spec=RunSpec(),
                                    model_id="m", task_kind="code", intent="other", base_ref=None, prompt="p")
            await runs_store.create_run(db, run, None)
            await runs_store.update_run(db, run.id, status=run_status, sandbox_id=sandbox, paused_at=paused)
        m = Metrics()
        await m.refresh(db, lambda: 2)
    finally:
        await db.close()
    v = values(m)
    assert {s: v[f"critique_sandboxes[state={s}]"] for s in ("busy", "idle", "paused", "pooled")} == \
        {"busy": 1, "idle": 1, "paused": 2, "pooled": 2}
    assert v["critique_queue_depth"] == 1
    assert sum(n for k, n in v.items() if k.startswith("critique_runs[")) == len(states)


def test_the_readme_lists_every_family_by_its_exposed_name() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    listed = {name for row in re.findall(r"^\| (`critique_[^|]+)\|", readme, re.M)
              for name in re.findall(r"`(critique_[a-z_]+)`", row)}
    exposed = {name + "_total" if kind == "counter" else name for name, (kind, _) in FAMILIES.items()}
    assert listed == exposed
