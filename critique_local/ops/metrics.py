"""Prometheus metrics of one server, in a :class:`prometheus_client.CollectorRegistry` of its own.

Counters and histograms are fed from a few places: every run event (the :class:`EventHub`
observer :meth:`Metrics.observe`: status changes give runs created and turns started, finished
and failed; ``sandbox.ready``, ``agent.ready`` and ``validation`` events give sandboxes and
durations), the gateway (:meth:`Metrics.gateway_call`, :meth:`Metrics.upstream_error`), the
egress proxy's decisions and the SSE streams. Gauges (runs by status and lifecycle, queue
depth, sandboxes, webhook deliveries) are read from the database when scraped
(:meth:`Metrics.refresh`), so they are right after a restart too. Names follow Prometheus
conventions: ``critique_`` prefix, base units (seconds) in the name, ``_total`` on counters;
no ``_created`` series (they would double every counter and histogram for no use here).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from critique_local.runs.states import Phase, RunStatus, lifecycle_of
from critique_local.store import opsstats
from critique_local.store.db import Database
from critique_local.store.events import EventRow

log = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: a sandbox is ready in ~1-10 s, a turn takes seconds to half an hour
READY_BUCKETS = (0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120)
TURN_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
CALL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MAX_TRACKED_RUNS = 100_000  # runs whose turn is followed in memory (bounded even if statuses go missing)
SANDBOX_STATES = ("busy", "idle", "paused", "pooled")
disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide in prometheus-client; this process exports only these metrics


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.runs_created = Counter("critique_runs_created", "Runs created (first turns queued).", registry=r)
        self.runs = Gauge("critique_runs", "Runs by status and lifecycle (stored runs, read at scrape time).",
                          ["status", "lifecycle"], registry=r)
        self.queue_depth = Gauge("critique_queue_depth", "Turns waiting to start (queued runs and follow-ups).",
                                 registry=r)
        self.turns_started = Counter("critique_turns_started", "Turns that started executing.", registry=r)
        self.turns_finished = Counter("critique_turns_finished", "Turns that ended without an error.", registry=r)
        self.turns_failed = Counter("critique_turns_failed", "Turns that ended with an error, by error code "
                                    "(cancelled turns: code cancelled).", ["code"], registry=r)
        self.agent_ready = Histogram("critique_agent_ready_duration_seconds", "From a turn's start to OpenCode "
                                     "ready in its sandbox (first turns), by sandbox source.", ["source"],
                                     buckets=READY_BUCKETS, registry=r)
        self.turn_duration = Histogram("critique_turn_duration_seconds", "Turns from start to end, by outcome.",
                                       ["outcome"], buckets=TURN_BUCKETS, registry=r)
        self.validation_duration = Histogram("critique_validation_duration_seconds", "Validation commands, by "
                                             "whether they passed.", ["passed"], buckets=TURN_BUCKETS, registry=r)
        self.gateway_calls = Counter("critique_gateway_calls", "Model calls through the gateway, by model and "
                                     "outcome (ok, or the error code).", ["model", "outcome"], registry=r)
        self.gateway_tokens = Counter("critique_gateway_tokens", "Tokens of model calls, by model and direction "
                                      "(input, output).", ["model", "direction"], registry=r)
        self.gateway_credits = Counter("critique_gateway_credits", "Credits charged for model calls, by model.",
                                       ["model"], registry=r)
        self.gateway_duration = Histogram("critique_gateway_call_duration_seconds", "Model calls from request to "
                                          "last byte, by upstream provider (in-process: the scripted model).",
                                          ["upstream"], buckets=CALL_BUCKETS, registry=r)
        self.upstream_errors = Counter("critique_gateway_upstream_errors", "Upstream provider failures, by "
                                       "provider and code.", ["provider", "code"], registry=r)
        self.sandboxes = Gauge("critique_sandboxes", "Sandboxes now: busy (a turn runs), idle (a warm session), "
                               "paused (a paused session's, its agent stopped or paused in place), pooled (warm "
                               "pool, no run yet).", ["state"], registry=r)
        self.sandboxes_provisioned = Counter("critique_sandboxes_provisioned", "Sandboxes given to runs, by "
                                             "source (new, pool).", ["source"], registry=r)
        self.webhook_deliveries = Gauge("critique_webhook_deliveries", "Stored webhook deliveries by state "
                                        "(read at scrape time).", ["state"], registry=r)
        self.webhook_attempts = Counter("critique_webhook_delivery_attempts", "Webhook delivery attempts by "
                                        "outcome: delivered (2xx), retry (failed, tried again later), gave_up "
                                        "(failed, retry window over).", ["outcome"], registry=r)
        self.sse_subscribers = Gauge("critique_sse_subscribers", "Open event streams (SSE).", registry=r)
        self.egress_decisions = Counter("critique_egress_decisions", "Egress proxy decisions (allowed, denied).",
                                        ["decision"], registry=r)
        self._turns: dict[str, tuple[float, str | None]] = {}  # run -> (turn start, last error code)
        self._sources: dict[str, str] = {}  # run -> sandbox source of its first turn

    # ---- fed by the run events ------------------------------------------------------------------

    async def observe(self, row: EventRow) -> None:
        """An :class:`EventHub` observer: every stored run event, after it is stored."""
        try:
            if row.kind == "run.status":
                self._status(row.run_id, row.data)
            else:
                self._builder(row.run_id, row.data)
        except Exception:  # metrics never break a run
            log.exception("metrics: event of run %s", row.run_id)

    def _status(self, run_id: str, data: dict[str, Any]) -> None:
        status, turn = data.get("status"), self._turns.get(run_id)
        if status == RunStatus.QUEUED and data.get("turnCount") == 0 and run_id not in self._turns:
            self.runs_created.inc()
        if status == RunStatus.RUNNING:
            if turn is None and len(self._turns) < MAX_TRACKED_RUNS:
                self._turns[run_id] = (time.monotonic(), None)
                self.turns_started.inc()
            return
        if turn is None:
            return
        del self._turns[run_id]
        started, error = turn
        code = RunStatus.CANCELLED.value if status == RunStatus.CANCELLED else error or (data.get("error") or {}).get("code")
        if status == RunStatus.FAILED and not code:
            code = "unknown"
        if code:
            self.turns_failed.labels(code).inc()
        else:
            self.turns_finished.inc()
        self.turn_duration.labels("failed" if code else "finished").observe(time.monotonic() - started)
        self._sources.pop(run_id, None)

    def _builder(self, run_id: str, data: dict[str, Any]) -> None:
        kind, turn = data.get("type"), self._turns.get(run_id)
        if kind == "sandbox.ready":
            source = "pool" if data.get("warm") else "new"
            self._sources[run_id] = source
            self.sandboxes_provisioned.labels(source).inc()
        elif kind == "agent.ready" and turn is not None:
            self.agent_ready.labels(self._sources.get(run_id, "new")).observe(time.monotonic() - turn[0])
        elif kind == "validation" and not data.get("final") and isinstance(data.get("durationMs"), int | float):
            self.validation_duration.labels(str(bool(data.get("passed"))).lower()).observe(data["durationMs"] / 1000)
        elif kind == "error" and turn is not None and data.get("code"):
            self._turns[run_id] = (turn[0], str(data["code"]))

    # ---- fed by the gateway, the egress proxy and the SSE streams --------------------------------

    def gateway_call(self, model: str, upstream: str | None, outcome: str, tokens: tuple[int, int] | None,
                     credits: float, duration_s: float) -> None:
        """One model call: ``tokens`` (input, output) when metered, ``credits`` charged."""
        self.gateway_calls.labels(model, outcome).inc()
        if tokens is not None:
            self.gateway_tokens.labels(model, "input").inc(tokens[0])
            self.gateway_tokens.labels(model, "output").inc(tokens[1])
            self.gateway_credits.labels(model).inc(max(0.0, credits))
        self.gateway_duration.labels(upstream or "in-process").observe(duration_s)

    def upstream_error(self, provider: str | None, code: str) -> None:
        self.upstream_errors.labels(provider or "in-process", code).inc()

    def webhook_attempt(self, outcome: str) -> None:
        """One webhook delivery attempt: ``delivered``, ``retry`` or ``gave_up``."""
        self.webhook_attempts.labels(outcome).inc()

    def egress_decision(self, event: dict[str, object]) -> None:
        self.egress_decisions.labels(str(event.get("decision"))).inc()

    @contextlib.asynccontextmanager
    async def sse_stream(self) -> AsyncIterator[None]:
        """Counts one open event stream for as long as it is entered."""
        self.sse_subscribers.inc()
        try:
            yield
        finally:
            self.sse_subscribers.dec()

    # ---- scrape -----------------------------------------------------------------------------------

    async def refresh(self, db: Database, pooled: Callable[[], int]) -> None:
        """Read the gauges that come from stored state (runs, queue, sandboxes, webhooks)."""
        counts = await opsstats.runs_by_status_phase(db)
        self.runs.clear()
        queued = 0
        for status, phase, n in counts:
            try:
                lifecycle = lifecycle_of(RunStatus(status), Phase(phase), False).lifecycle
            except ValueError:
                lifecycle = "unknown"
            self.runs.labels(status, lifecycle).inc(n)
            queued += n if status == RunStatus.QUEUED else 0
        self.queue_depth.set(queued)
        busy, idle, paused = await opsstats.sandboxes_in_use(db)
        for state, n in zip(SANDBOX_STATES, (busy, idle, paused, pooled()), strict=True):
            self.sandboxes.labels(state).set(n)
        self.webhook_deliveries.clear()
        for state, n in await opsstats.webhook_deliveries_by_state(db):
            self.webhook_deliveries.labels(state).set(n)

    def exposition(self) -> bytes:
        """The Prometheus text format of everything registered."""
        return generate_latest(self.registry)
