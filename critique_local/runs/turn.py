"""One turn of a run, in a sandbox with the agent attached: prompt the session (its events go
to the run's log, a watchdog and the model watch look on), collect the cumulative results out
of the sandbox, validate (and in ``tests`` mode send failures back to the agent), redact,
publish, and record the turn. The run then goes ``idle`` with the sandbox and the agent's
session kept warm.

A turn that stops early (:class:`~critique_local.errors.TurnStop`: a budget refused a model
call, or the model cannot be reached) keeps its work: the run goes idle with the stop's code.
Everything else that fails a turn raises a :class:`~critique_local.errors.RunError`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any

from critique_local import billing
from critique_local.agent.base import Agent, EventRow, EventsDropped, TurnErrorKind, TurnEvent, TurnRequest
from critique_local.clock import now, now_iso, parse_iso
from critique_local.errors import BudgetStop, ErrorCode, RunFailure, SandboxError, TurnStop
from critique_local.repos.workrepo import RunRepo
from critique_local.runs import turnstate
from critique_local.runs.collect import TurnResult, collect
from critique_local.runs.modelwatch import ModelWatch
from critique_local.runs.plan_guard import check_unchanged, discard_changes
from critique_local.runs.provision import Job, Provisioner
from critique_local.runs.publish import Publisher, PublishOutcome
from critique_local.runs.states import Phase, RunStatus
from critique_local.runs.timeline import Timeline
from critique_local.runs.validate import ValidationResult, repair_prompt, validate
from critique_local.runs.watchdog import Watchdog
from critique_local.sandboxes.base import Sandbox
from critique_local.services import Services
from critique_local.store import runs as store
from critique_local.store.runs import RunRow

TURN_EXTENSION_S = 600  # a sandbox's lifetime during a turn: the turn's bound plus this
COLLECT_TIMEOUT_S = 600  # the whole collect step (the snapshot's own bound is 300 s)
log = logging.getLogger(__name__)


async def transition(s: Services, run: RunRow, status: RunStatus, phase: Phase, **fields: Any) -> RunRow:
    """Record a state change; clients hear of it when status or phase changed."""
    updated = await store.transition(s.db, run.id, status, phase, **fields)
    if updated.status is not run.status or updated.phase is not run.phase:
        await s.hub.status(updated)
    return updated


async def settle(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` unless it is done, and wait for its end without raising its outcome (a
    cancellation of the caller still propagates)."""
    if not task.done():
        task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: an outcome nobody needed is not logged as lost


def run_repo(s: Services, run_id: str) -> RunRepo:
    """The server's own repository of the run (``repos/workrepo.py``)."""
    return RunRepo(s.settings.server.data_dir / "runs", run_id)


class Turn:
    def __init__(self, services: Services, provisioner: Provisioner, watchdog: Watchdog) -> None:
        self.s = services
        self.provisioner = provisioner
        self.watchdog = watchdog

    async def run(self, job: Job, idx: int, prompt: str) -> None:
        """Turn ``idx`` of ``job.run`` (provisioned or reattached) with ``prompt``. Where its time
        went is written to the debug log (``runs/timeline.py``)."""
        s, sandbox, agent = self.s, job.sandbox, job.agent
        assert sandbox is not None and agent is not None
        timeline = Timeline()
        with timeline.step("start"):
            await store.update_turn(s.db, job.run.id, idx, status="running", started_at=now_iso())
            await s.backend.extend(sandbox.id, s.settings.sandbox.turn_timeout_s + TURN_EXTENSION_S)
            run = await transition(s, job.run, RunStatus.RUNNING, Phase.AGENT_RUNNING, error_code=None,
                                   error_message=None, session_end_reason=None)
        # one line at each end of a turn (the run's lines carry its id): the HTTP requests it
        # makes are not logged at level info (ops/logs.py)
        log.info("run %s turn %d started", run.id, idx)
        try:
            await self._turn(run, sandbox, agent, idx, prompt, timeline)
        except RunFailure as exc:
            if not turnstate.turn_failure(exc, idx):
                raise
            log.info("run %s turn %d failed on its own (%s); the session stays", run.id, idx, exc.code)
            await turnstate.fail_turn(s, run, sandbox, idx, exc, transition)
            return
        finally:
            timeline.log(f"run {job.run.id} turn {idx}")
        log.info("run %s turn %d finished", run.id, idx)

    async def _turn(self, run: RunRow, sandbox: Sandbox, agent: Agent, idx: int, prompt: str,
                    timeline: Timeline) -> None:
        # Steps that do not depend on each other overlap: the server's repository of the run is
        # opened while the agent works, and the agent's transcript is read while the tree is
        # collected (it is saved only once the turn's results are, before the run goes idle).
        repo_task = asyncio.create_task(self._open_repo(run, timeline))
        exports: list[asyncio.Task[bytes]] = []
        try:
            await self._turn_steps(run, sandbox, agent, idx, prompt, timeline, repo_task, exports)
        finally:
            for task in (repo_task, *exports):
                await settle(task)

    async def _turn_steps(self, run: RunRow, sandbox: Sandbox, agent: Agent, idx: int, prompt: str,
                          timeline: Timeline, repo_task: asyncio.Task[tuple[RunRepo, str]],
                          exports: list[asyncio.Task[bytes]]) -> None:
        s = self.s
        base, session_id = run.base_commit, run.agent_session_id
        assert base is not None and session_id is not None
        stopped: TurnStop | None = None
        try:
            with timeline.step("prompt"):
                summary = await self.watchdog.watch(sandbox, self._prompt(run, sandbox, agent, prompt),
                                                    lambda: agent.abort(session_id))
        except TurnStop as stop:
            # a budget refused the next model call, or the model cannot be reached: the turn ends
            # here, its work so far is kept, and the run stays usable for follow-ups
            stopped, summary = stop, stop.partial
        exports.append(turnstate.start_export(agent, session_id, timeline))
        with timeline.step("collecting"):
            run = await transition(s, run, RunStatus.RUNNING, Phase.COLLECTING)
            previous = await self._previous_tree(run.id, idx) or base
        with timeline.step("repo.wait"):
            repo, base_tree = await repo_task
        if run.task_kind == "plan" and (warning := await discard_changes(sandbox, previous)):
            await s.hub.builder(run.id, warning)
        result = await self._collect(sandbox, repo, run, previous, base_tree, timeline)
        if run.task_kind == "plan":
            check_unchanged(result.turn_stats["filesChanged"])
        validation: ValidationResult | None = None
        mode = run.spec.validation
        if run.task_kind != "plan" and mode != "minimal":
            run = await transition(s, run, RunStatus.RUNNING, Phase.VALIDATING)
            validation = await self._validate(run, sandbox, repo, mode, result.tree)
            repairs = 0
            # tests mode: failing tests go back to the agent, in the same session and user turn
            # (so its model calls count against that turn's maxTurns allowance)
            while (mode == "tests" and validation is not None and validation.status == "failed"
                   and repairs < s.settings.validation.max_repair_turns and stopped is None):
                repairs += 1
                await settle(exports[-1])  # the transcript grows: read again after the repair
                await s.backend.extend(sandbox.id, s.settings.sandbox.turn_timeout_s + TURN_EXTENSION_S)
                await s.hub.builder(run.id, {"type": "validation.repair", "attempt": repairs})
                run = await transition(s, run, RunStatus.RUNNING, Phase.AGENT_RUNNING)
                try:
                    summary = await self.watchdog.watch(
                        sandbox, self._prompt(run, sandbox, agent, repair_prompt(validation)),
                        lambda: agent.abort(session_id)) or summary
                except TurnStop as stop:
                    stopped, summary = stop, stop.partial or summary
                exports.append(turnstate.start_export(agent, session_id, timeline))
                run = await transition(s, run, RunStatus.RUNNING, Phase.COLLECTING)
                result = await self._collect(sandbox, repo, run, previous, base_tree, timeline)
                run = await transition(s, run, RunStatus.RUNNING, Phase.VALIDATING)
                validation = await self._validate(run, sandbox, repo, mode, result.tree)
            if validation is not None:
                validation = validation.with_repairs(repairs)
                await s.hub.builder(run.id, {"type": "validation", "final": True, **validation.as_json()})
        with timeline.step("finish"):
            await self._finish(run, sandbox, agent, repo, idx, prompt, summary, result, validation, stopped,
                               exports[-1], timeline)

    async def _finish(self, run: RunRow, sandbox: Sandbox, agent: Agent, repo: RunRepo, idx: int, prompt: str,
                      summary: str, result: TurnResult, validation: ValidationResult | None,
                      stopped: TurnStop | None, export: asyncio.Task[bytes], timeline: Timeline) -> None:
        """Redact, publish, record the turn, keep its state (``export``: the agent's transcript,
        being read); the run goes idle."""
        s, redactor = self.s, self.s.redactor
        # nothing leaves the sandbox with a secret we know in it
        summary = redactor.clean(summary, run.id)
        patch, leaked = redactor.binary(result.patch, run.id)
        changed_paths = redactor.data(result.changed_paths, run.id)
        if validation is not None:
            validation = validation.redacted(lambda text: redactor.clean(text, run.id))
        if leaked:  # never silently: the stored patch no longer recreates the sandbox's tree
            await s.hub.builder(run.id, {
                "type": "warning", "code": "patch_redacted", "redactions": leaked,
                "message": f"the changes contain {leaked} secret(s) or token(s); they are [REDACTED] in the "
                           "patch, which therefore no longer matches the sandbox's files, and nothing is published"})
        outcome: PublishOutcome | None = None
        publish = await store.turn_publish(s.db, run.id, idx)
        if run.task_kind != "plan" and publish.get("mode") == "draft_pr":
            if leaked:
                outcome = PublishOutcome("failed", f"the changes contain {leaked} secret(s) or token(s) "
                                         "(redacted in the patch); nothing was pushed")
            else:
                run = await transition(s, run, RunStatus.RUNNING, Phase.PUBLISHING)
                first = await store.turn(s.db, run.id, 1)
                first_prompt = first.prompt if first is not None else prompt
                outcome = await Publisher(s).publish(run, repo, idx, publish, first_prompt, summary, result,
                                                     validation)
                outcome = dataclasses.replace(outcome, message=redactor.clean(outcome.message, run.id))
            await s.hub.builder(run.id, {"type": "publish", **outcome.as_json()})
        await store.update_turn(
            s.db, run.id, idx, status="completed", summary=summary, diff_stats=json.dumps(result.turn_stats),
            tree=result.tree, finished_at=now_iso(),
            validation=json.dumps(validation.as_json()) if validation else None,
            publish_outcome=json.dumps(outcome.as_json()) if outcome else None)
        errors: dict[str, Any] = {}
        if isinstance(stopped, BudgetStop):
            used = await billing.usage(s.db, run.id)
            errors = {"error_code": stopped.code,
                      "error_message": f"{stopped.message}; used this run: {used.model_calls} model calls, "
                                       f"{used.credits:.6f} credits"}
        elif stopped is not None:
            errors = {"error_code": stopped.code, "error_message": stopped.message}
        elif outcome is not None and outcome.status == "failed":
            errors = {"error_code": ErrorCode.PUBLISH_FAILED, "error_message": outcome.message}
        if errors:
            errors["error_message"] = redactor.clean(errors["error_message"], run.id)
            await s.hub.builder(run.id, {"type": "error", "code": errors["error_code"],
                                         "message": errors["error_message"]})
        if validation is not None:
            errors["validation"] = json.dumps(validation.as_json())
        with timeline.step("state.save"):  # before idle: a client seeing idle can rely on it
            await turnstate.save_state(s, run, agent, idx, export)
        expires = turnstate.expiry(s, run)
        await s.backend.extend(sandbox.id, max(60.0, (parse_iso(expires) - now()).total_seconds() + 60))
        with timeline.step("idle"):
            await transition(
                s, run, RunStatus.IDLE, Phase.AWAITING_FOLLOW_UP, summary=summary,
                changed_paths=json.dumps(changed_paths), diff_stats=json.dumps(result.diff_stats),
                patch=patch or None, patch_redactions=leaked, session_expires_at=expires, **errors,
            )

    async def _prompt(self, run: RunRow, sandbox: Sandbox, agent: Agent, prompt: str) -> str:
        """One prompt of the turn; its summary. Its events go to the run's log (at most
        ``limits.max_events_per_turn``) and to the model watch."""
        limits, hub = self.s.settings.limits, self.s.hub
        assert run.agent_session_id is not None
        session_id = run.agent_session_id
        model = ModelWatch.for_prompt(self.s, run, sandbox)
        texts: list[str] = []  # the last assistant text (the partial summary of a stopped turn)
        rows = dropped = 0  # events of this prompt: stored, and not stored

        async def on_event(event: TurnEvent) -> None:
            nonlocal rows, dropped
            model.observe(event)
            if isinstance(event, EventRow):
                if event.row["type"] == "text" and "sessionId" not in event.row:  # not a subagent's
                    texts[:] = [event.row["text"]]
                rows += 1
                if rows <= limits.max_events_per_turn:
                    await hub.builder(run.id, event.row)
            elif isinstance(event, EventsDropped):
                dropped += event.count

        turn = TurnRequest(session_id, prompt, run.model_id, read_only=run.task_kind == "plan",
                           timeout_s=self.s.settings.sandbox.turn_timeout_s,
                           connect_timeout_s=self.s.settings.sandbox.agent_ready_timeout_s,
                           max_text_chars=limits.max_summary_chars)
        try:
            reply = await model.guard(agent.prompt(turn, on_event), lambda: agent.abort(session_id),
                                      lambda: texts[-1] if texts else "")
        finally:
            model.close()
            dropped += max(0, rows - limits.max_events_per_turn)
            if dropped:
                await hub.builder(run.id, {
                    "type": "events.clipped", "stored": min(rows, limits.max_events_per_turn), "dropped": dropped,
                    "message": f"{dropped} events of this turn were not stored (limits.max_events_per_turn, or "
                               "larger than an event may be)"})
        error = reply.error
        if error is None:
            return reply.summary
        if error.kind is TurnErrorKind.BUDGET:
            raise BudgetStop(error.message, reply.summary)
        if error.kind is TurnErrorKind.MODEL:
            unreachable = await model.explain()
            if unreachable is not None:
                raise TurnStop(ErrorCode.MODEL_UNREACHABLE,
                               f"{unreachable} ({self.s.harness.name}: {error.message[:300]})", reply.summary)
            raise RunFailure(ErrorCode.MODEL_ERROR, error.message)
        raise RunFailure(ErrorCode.AGENT_ERROR, error.message)

    async def _open_repo(self, run: RunRow, timeline: Timeline) -> tuple[RunRepo, str]:
        """The run's repository on the server, holding the base commit, and the base tree."""
        assert run.base_commit is not None
        with timeline.step("repo"):
            repo = run_repo(self.s, run.id)
            source = self.s.hosts.resolve(run.repository_full_name)
            git = self.s.settings.git
            mirror = (self.s.mirrors.path(source) if source is not None and git.mirror_cache and self.s.mirrors
                      else None)
            await repo.ensure(source, run.base_commit, mirror, git.clone_timeout_s)
            return repo, await repo.tree_of(run.base_commit)

    async def _collect(self, sandbox: Sandbox, repo: RunRepo, run: RunRow, previous: str, base_tree: str,
                       timeline: Timeline) -> TurnResult:
        """The turn's results, within :data:`COLLECT_TIMEOUT_S` (every step has its own bound;
        this one guarantees a run never stays ``collecting``). Raises ``collect_failed`` or the
        limit the sandbox hit."""
        try:
            async with asyncio.timeout(COLLECT_TIMEOUT_S):
                with timeline.step("collect"):
                    return await self._collect_unbounded(sandbox, repo, run, previous, base_tree, timeline)
        except TimeoutError as exc:
            # the traceback shows the step that did not end
            log.error("run %s: collecting took longer than %d s", run.id, COLLECT_TIMEOUT_S, exc_info=exc)
            raise RunFailure(ErrorCode.COLLECT_FAILED, f"reading the turn's results out of the sandbox took "
                             f"longer than {COLLECT_TIMEOUT_S} s") from exc

    async def _collect_unbounded(self, sandbox: Sandbox, repo: RunRepo, run: RunRow, previous: str, base_tree: str,
                                 timeline: Timeline) -> TurnResult:
        assert run.base_commit is not None
        settings = self.s.settings
        try:
            # a full workspace ends the run before git tries to use it (checked by the same command)
            result = await collect(sandbox, repo, run.base_commit, previous, settings.limits.max_patch_bytes,
                                   settings.publish.max_bundle_bytes, base_tree=base_tree,
                                   disk=self.watchdog.disk_check(), timeline=timeline)
        except (RunFailure, SandboxError) as exc:
            # git writes its index and pack to /tmp: a failure there is explained by the mount that
            # filled up when one did (``sandbox_storage_full``)
            if isinstance(exc, RunFailure) and exc.code is not ErrorCode.COLLECT_FAILED:
                raise
            cause = await self.watchdog.diagnose(sandbox)
            if cause is not None:
                raise cause from exc
            raise
        if result.nested:
            shown = ", ".join(result.nested[:20]) + (" …" if len(result.nested) > 20 else "")
            await self.s.hub.builder(run.id, {
                "type": "warning", "code": "nested_repository", "paths": result.nested[:200],
                "message": f"nested git repositories ({shown}): their files are in the patch as ordinary files; "
                           "their own .git directories and history are not"})
        if result.skipped:
            await self.s.hub.builder(run.id, {
                "type": "warning", "code": "unreadable_files", "details": result.skipped[:50],
                "message": "files that could not be read are not in the patch: " + "; ".join(result.skipped[:5])})
        return result

    async def _validate(self, run: RunRow, sandbox: Sandbox, repo: RunRepo, mode: str,
                        tree: str) -> ValidationResult | None:
        assert run.base_commit is not None
        result = await validate(sandbox, repo, mode, self.s.settings.validation, run.repository_full_name,
                                run.base_commit, tree, await self.provisioner.command_env(run))
        if result is not None:
            await self.s.hub.builder(run.id, {"type": "validation", "final": False, **result.as_json()})
        return result

    async def _previous_tree(self, run_id: str, idx: int) -> str | None:
        previous = await store.turn(self.s.db, run_id, idx - 1)
        return previous.tree if previous is not None and previous.tree else None
