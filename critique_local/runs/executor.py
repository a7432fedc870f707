"""Runs, turn by turn.

The first turn provisions: checkout -> sandbox -> ``opencode serve`` -> session. Every turn then
prompts the session, streams its events, and reads cumulative results out of the sandbox. When
a turn ends the run goes ``idle`` with the sandbox and the OpenCode session kept warm; the
bindings (sandbox id, OpenCode address, its password sealed at rest, session id, expiry) are
persisted, so a follow-up turn reattaches from the database alone, also after a restart.

Git and agent setup live here, not in the sandbox backends: a backend only knows how to run
commands, upload files and expose a port.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from datetime import timedelta
from typing import Any

from critique_local import billing
from critique_local.agent.config import OPENCODE_PORT, PROVIDER_ID
from critique_local.agent.normalize import Normalizer
from critique_local.agent.opencode import AgentError, OpenCodeClient, basic_auth
from critique_local.bounds import clip_text
from critique_local.clock import iso, ms_between, now, now_iso, parse_iso
from critique_local.errors import RunFailure, TurnStop
from critique_local.repos import checkout
from critique_local.repos.workrepo import RunRepo
from critique_local.runs.collect import TurnResult, collect
from critique_local.runs.modelwatch import ModelWatch
from critique_local.runs.network import network_policy, proxy_env
from critique_local.runs.plan_guard import check_unchanged, discard_changes
from critique_local.runs.pool import WarmPool, agent_env, start_agent
from critique_local.runs.publish import Publisher, PublishOutcome
from critique_local.runs.states import Phase, RunStatus, SessionEnd
from critique_local.runs.validate import ValidationResult, repair_prompt, validate
from critique_local.runs.watchdog import Watchdog
from critique_local.sandboxes.base import Sandbox, SandboxError, SandboxSpec
from critique_local.services import Services
from critique_local.store import runs as store
from critique_local.store import secrets as secrets_store
from critique_local.store.runs import RunRow
from critique_local.tokens import SANDBOX_TOKEN_PREFIX, new_token, token_hash

log = logging.getLogger(__name__)
WORKSPACE = "/workspace"
ATTACH_HEALTH_TIMEOUT_S = 30.0


class BudgetStop(TurnStop):
    """The gateway refused a model call because of ``safety.resources``."""

    def __init__(self, message: str, partial: str) -> None:
        super().__init__("budget_exceeded", message, partial)


class Executor:
    def __init__(self, services: Services) -> None:
        self.s = services
        self.pool: WarmPool | None = None
        self.watchdog = Watchdog(services.backend, services.settings.sandbox)

    # ---- entry point (one scheduler job) ------------------------------------------------------

    async def execute(self, run_id: str) -> None:
        run = await store.get_run(self.s.db, run_id)
        if run is None:
            return
        if run.status is RunStatus.QUEUED:
            await self._guarded(run, first=True)
        elif run.status is RunStatus.RUNNING and await store.queued_turn(self.s.db, run.id):
            await self._guarded(run, first=False)

    async def _guarded(self, run: RunRow, *, first: bool) -> None:
        sandbox: Sandbox | None = None
        agent: OpenCodeClient | None = None
        failure: tuple[str, str] | None = None
        try:
            await self._remember_secrets(run)
            if first:
                run = await self._transition(run, RunStatus.RUNNING, Phase.PROVISIONING, started_at=now_iso(),
                                             turn_count=1)
                sandbox, agent, run = await self._provision(run)
            else:
                sandbox, agent = await self._reattach(run)
            queued = await store.queued_turn(self.s.db, run.id)
            assert queued is not None
            await self._run_turn(run, sandbox, agent, *queued)
            return
        except asyncio.CancelledError:
            # cancel or shutdown: stop the agent, remove the sandbox; the canceller (or the next
            # start's recovery) records the outcome
            if agent is not None and run.agent_session_id:
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.wait_for(agent.abort(run.agent_session_id), 1.0))
            sid = sandbox.id if sandbox is not None else None
            if sid is None:  # cancelled while provisioning: the database knows what was taken
                with contextlib.suppress(Exception):
                    current = await asyncio.shield(store.get_run(self.s.db, run.id))
                    sid = current.sandbox_id if current else None
            if sid:
                await asyncio.shield(self.destroy(sid))
            raise
        except (RunFailure, SandboxError, AgentError) as exc:
            failure = (exc.code, getattr(exc, "message", str(exc)))
        except Exception as exc:
            log.exception("run %s crashed", run.id)
            failure = ("internal_error", f"{exc.__class__.__name__}: {exc}")
        finally:
            if agent is not None:
                await agent.aclose()
        # teardown first, so a terminal status always means the sandbox is gone
        current = await store.get_run(self.s.db, run.id)
        sid = sandbox.id if sandbox is not None else (current.sandbox_id if current else None)
        if sid:
            await self.destroy(sid)
        await self.fail(run.id, *failure)

    # ---- provisioning and reattaching ---------------------------------------------------------

    async def _provision(self, run: RunRow) -> tuple[Sandbox, OpenCodeClient, RunRow]:
        """Checkout, then a sandbox (a warm one from the pool when it fits, else a new one) with
        the checkout uploaded and OpenCode healthy, then a session."""
        settings = self.s.settings
        t0 = time.monotonic()
        prepared = await checkout.prepare(settings.git, self.s.hosts.resolve(run.repository_full_name),
                                          run.base_ref, settings.server.data_dir, self.s.mirrors)
        t_checkout = time.monotonic()
        mode = network_policy(settings, run.request)[0]
        warm = None
        if self.pool is not None and self.pool.eligible(run.model_id, mode):
            warm = await self.pool.take(prepared.key)
        try:
            token = warm.token if warm else new_token(SANDBOX_TOKEN_PREFIX)
            password = warm.password if warm else secrets.token_urlsafe(24)
            self.s.redactor.add(token, run.id)
            try:  # a taken warm sandbox is the run's (for teardown and the sweep) from here on
                await store.update_run(self.s.db, run.id, base_commit=prepared.base_commit,
                                       base_ref=prepared.base_ref, base_branch=prepared.base_branch,
                                       sandbox_token_hash=token_hash(token),
                                       sandbox_token=self.s.box.seal(token, f"{run.id}:token"),
                                       agent_secret=self.s.box.seal(password, run.id),
                                       **({"sandbox_id": warm.sandbox.id} if warm else {}))
            except BaseException:
                if warm is not None:
                    await asyncio.shield(self.destroy(warm.sandbox.id))
                raise
            if warm is not None:
                sandbox = warm.sandbox
                await self.s.backend.adopt(sandbox.id, run.id)
            else:
                sandbox = await self.s.backend.create(SandboxSpec(run.id, run.user_id, network_mode=mode))
            await store.update_run(self.s.db, run.id, sandbox_id=sandbox.id, sandbox_started_at=now_iso())
            t_sandbox = time.monotonic()
            preloaded = warm is not None and warm.checkout_key is not None and warm.checkout_key == prepared.key
            if not preloaded:
                await sandbox.upload_tar(WORKSPACE, prepared.tar_path)
            t_upload = time.monotonic()
        finally:
            await asyncio.shield(checkout.discard(prepared))
        await self.s.hub.builder(run.id, {
            "type": "sandbox.ready", "warm": warm is not None, "preloaded": preloaded,
            "checkoutMs": round((t_checkout - t0) * 1000), "sandboxMs": round((t_sandbox - t_checkout) * 1000),
            "uploadMs": round((t_upload - t_sandbox) * 1000)})
        if warm is not None:
            endpoint = await sandbox.endpoint(OPENCODE_PORT)
            agent = OpenCodeClient(endpoint.base_url, {**endpoint.headers, **basic_auth(password)})
        else:
            env = {**self._network_env(run, token), **agent_env(self.s, token, password, run.model_id, run.request)}
            agent = await start_agent(sandbox, env, settings.sandbox.agent_ready_timeout_s)
        try:
            title = str(run.request.get("title") or f"critique-local {run.id}")
            session_id = await agent.create_session(title)
        except BaseException:
            await agent.aclose()
            raise
        ready = now_iso()
        await store.update_run(self.s.db, run.id, agent_session_id=session_id, agent_ready_at=ready,
                               agent_url=agent.base_url)
        await self.s.hub.builder(run.id, {"type": "agent.ready", "sessionId": session_id,
                                          "sinceCreatedMs": ms_between(run.created_at, ready)})
        updated = await store.get_run(self.s.db, run.id)
        assert updated is not None
        return sandbox, agent, updated

    def _network_env(self, run: RunRow, token: str) -> dict[str, str]:
        if network_policy(self.s.settings, run.request)[0] != "restricted" or not self.s.proxy_address:
            return {}
        return proxy_env(self.s.proxy_address, token, self.s.proxy_address.rpartition(":")[0])

    async def _command_env(self, run: RunRow) -> dict[str, str]:
        """Environment of validation commands: the repository's secrets, and the egress proxy
        settings of a restricted run."""
        env = await secrets_store.env_for(self.s.db, self.s.box, run.repository_full_name)
        for value in env.values():
            self.s.redactor.add(value, run.id)
        sealed = await store.sandbox_token(self.s.db, run.id)
        if sealed:
            env.update(self._network_env(run, self.s.box.open(sealed, f"{run.id}:token")))
        return env

    async def _remember_secrets(self, run: RunRow) -> None:
        """Secrets of this run that output must never show: its BYOK key and repository secrets."""
        sealed = await store.byok_key(self.s.db, run.id)
        if sealed:
            self.s.redactor.add(self.s.box.open(sealed, run.id), run.id)
        for value in (await secrets_store.env_for(self.s.db, self.s.box, run.repository_full_name)).values():
            self.s.redactor.add(value, run.id)
        token = await store.sandbox_token(self.s.db, run.id)
        if token:
            self.s.redactor.add(self.s.box.open(token, f"{run.id}:token"), run.id)

    def run_repo(self, run_id: str) -> RunRepo:
        """The server's own repository of the run (``repos/workrepo.py``)."""
        return RunRepo(self.s.settings.server.data_dir / "runs", run_id)

    async def _open_repo(self, run: RunRow) -> RunRepo:
        assert run.base_commit is not None
        repo = self.run_repo(run.id)
        source = self.s.hosts.resolve(run.repository_full_name)
        git = self.s.settings.git
        mirror = self.s.mirrors.path(source) if source is not None and git.mirror_cache and self.s.mirrors else None
        await repo.ensure(source, run.base_commit, mirror, git.clone_timeout_s)
        return repo

    async def _collect(self, sandbox: Sandbox, repo: RunRepo, run: RunRow, previous: str) -> TurnResult:
        assert run.base_commit is not None
        limits = self.s.settings
        await self.watchdog.check_workspace(sandbox)
        try:
            result = await collect(sandbox, repo, run.base_commit, previous, limits.limits.max_patch_bytes,
                                   limits.publish.max_bundle_bytes)
        except (RunFailure, SandboxError) as exc:
            # git writes its index and pack to /tmp: a failure there is explained by the mount that
            # filled up when one did (``sandbox_storage_full``)
            if isinstance(exc, RunFailure) and exc.code != "collect_failed":
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

    async def attach(self, run: RunRow) -> tuple[Sandbox, OpenCodeClient] | None:
        """The live sandbox and a healthy OpenCode of an idle run, or None when either is gone."""
        if not (run.sandbox_id and run.agent_url and run.agent_secret):
            return None
        try:
            sandbox = await self.s.backend.connect(run.sandbox_id)
        except SandboxError:
            return None
        if sandbox is None:
            return None
        endpoint = await sandbox.endpoint(OPENCODE_PORT)
        agent = OpenCodeClient(endpoint.base_url,
                               {**endpoint.headers, **basic_auth(self.s.box.open(run.agent_secret, run.id))})
        try:
            # generous: on a loaded machine a live OpenCode can be slow to answer, and declaring a
            # warm session lost throws its state away (the next message would chain)
            await agent.wait_healthy(ATTACH_HEALTH_TIMEOUT_S)
        except AgentError:
            await agent.aclose()
            return None
        return sandbox, agent

    async def _reattach(self, run: RunRow) -> tuple[Sandbox, OpenCodeClient]:
        attached = await self.attach(run)
        if attached is None:
            raise RunFailure("sandbox_gone", "the run's sandbox or its OpenCode server is no longer available")
        return attached

    # ---- one turn -------------------------------------------------------------------------------

    async def _run_turn(self, run: RunRow, sandbox: Sandbox, agent: OpenCodeClient, idx: int, prompt: str) -> None:
        await store.update_turn(self.s.db, run.id, idx, status="running", started_at=now_iso())
        await self.s.backend.extend(sandbox.id, self.s.settings.sandbox.turn_timeout_s + 600)
        run = await self._transition(run, RunStatus.RUNNING, Phase.AGENT_RUNNING, error_code=None,
                                     error_message=None)
        base, session_id = run.base_commit, run.agent_session_id
        assert base is not None and session_id is not None
        stopped: TurnStop | None = None
        try:
            summary = await self.watchdog.watch(sandbox, self._prompt(run, sandbox, agent, session_id, prompt),
                                                lambda: agent.abort(session_id))
        except TurnStop as stop:
            # a budget refused the next model call, or the model cannot be reached: the turn ends
            # here, its work so far is kept, and the run stays usable for follow-ups
            stopped, summary = stop, stop.partial
        run = await self._transition(run, RunStatus.RUNNING, Phase.COLLECTING)
        previous = await self._previous_tree(run.id, idx) or base
        repo = await self._open_repo(run)
        if run.task_kind == "plan" and (warning := await discard_changes(sandbox, previous)):
            await self.s.hub.builder(run.id, warning)
        result = await self._collect(sandbox, repo, run, previous)
        if run.task_kind == "plan":
            check_unchanged(result.turn_stats["filesChanged"])
        validation: ValidationResult | None = None
        mode = str(run.request.get("validationMode") or "minimal")
        if run.task_kind != "plan" and mode != "minimal":
            run = await self._transition(run, RunStatus.RUNNING, Phase.VALIDATING)
            validation = await self._validate(run, sandbox, repo, mode, result.tree)
            repairs = 0
            # tests mode: failing tests go back to the agent, in the same session and user turn
            # (so its model calls count against that turn's maxTurns allowance)
            while (mode == "tests" and validation is not None and validation.status == "failed"
                   and repairs < self.s.settings.validation.max_repair_turns and stopped is None):
                repairs += 1
                await self.s.backend.extend(sandbox.id, self.s.settings.sandbox.turn_timeout_s + 600)
                await self.s.hub.builder(run.id, {"type": "validation.repair", "attempt": repairs})
                run = await self._transition(run, RunStatus.RUNNING, Phase.AGENT_RUNNING)
                try:
                    summary = await self.watchdog.watch(
                        sandbox, self._prompt(run, sandbox, agent, session_id, repair_prompt(validation)),
                        lambda: agent.abort(session_id)) or summary
                except TurnStop as stop:
                    stopped, summary = stop, stop.partial or summary
                run = await self._transition(run, RunStatus.RUNNING, Phase.COLLECTING)
                result = await self._collect(sandbox, repo, run, previous)
                run = await self._transition(run, RunStatus.RUNNING, Phase.VALIDATING)
                validation = await self._validate(run, sandbox, repo, mode, result.tree)
            if validation is not None:
                validation = validation.with_repairs(repairs)
                await self.s.hub.builder(run.id, {"type": "validation", "final": True, **validation.as_json()})
        # nothing leaves the sandbox with a secret we know in it
        redactor = self.s.redactor
        summary = redactor.clean(summary, run.id)
        patch, leaked = redactor.binary(result.patch, run.id)
        changed_paths = redactor.data(result.changed_paths, run.id)
        if validation is not None:
            validation = validation.redacted(lambda text: redactor.clean(text, run.id))
        if leaked:  # never silently: the stored patch no longer recreates the sandbox's tree
            await self.s.hub.builder(run.id, {
                "type": "warning", "code": "patch_redacted", "redactions": leaked,
                "message": f"the changes contain {leaked} secret(s) or token(s); they are [REDACTED] in the "
                           "patch, which therefore no longer matches the sandbox's files, and nothing is published"})
        outcome: PublishOutcome | None = None
        publish = await store.turn_publish(self.s.db, run.id, idx)
        if run.task_kind != "plan" and publish.get("mode") == "draft_pr":
            if leaked:
                outcome = PublishOutcome("failed", f"the changes contain {leaked} secret(s) or token(s) "
                                         "(redacted in the patch); nothing was pushed")
            else:
                run = await self._transition(run, RunStatus.RUNNING, Phase.PUBLISHING)
                first_prompt = next((str(r[1]) for r in await store.turns_raw(self.s.db, run.id) if r[0] == 1),
                                    prompt)
                outcome = await Publisher(self.s).publish(run, repo, idx, publish, first_prompt, summary, result,
                                                          validation)
                outcome = dataclasses.replace(outcome, message=redactor.clean(outcome.message, run.id))
            await self.s.hub.builder(run.id, {"type": "publish", **outcome.as_json()})
        finished = now_iso()
        await store.update_turn(
            self.s.db, run.id, idx, status="completed", summary=summary, diff_stats=json.dumps(result.turn_stats),
            tree=result.tree, finished_at=finished,
            validation=json.dumps(validation.as_json()) if validation else None,
            publish_outcome=json.dumps(outcome.as_json()) if outcome else None)
        errors: dict[str, Any] = {}
        if isinstance(stopped, BudgetStop):
            used = await billing.usage(self.s.db, run.id)
            errors = {"error_code": "budget_exceeded",
                      "error_message": f"{stopped.message}; used this run: {used.model_calls} model calls, "
                                       f"{used.credits:.6f} credits"}
        elif stopped is not None:
            errors = {"error_code": stopped.code, "error_message": stopped.message}
        elif outcome is not None and outcome.status == "failed":
            errors = {"error_code": "publish_failed", "error_message": outcome.message}
        if errors:
            errors["error_message"] = redactor.clean(errors["error_message"], run.id)
            await self.s.hub.builder(run.id, {"type": "error", "code": errors["error_code"],
                                              "message": errors["error_message"]})
        if validation is not None:
            errors["validation"] = json.dumps(validation.as_json())
        expires = self._expiry(run)
        await self.s.backend.extend(sandbox.id, max(60.0, (parse_iso(expires) - now()).total_seconds() + 60))
        await self._transition(
            run, RunStatus.IDLE, Phase.AWAITING_FOLLOW_UP, summary=summary,
            changed_paths=json.dumps(changed_paths), diff_stats=json.dumps(result.diff_stats),
            patch=patch or None, patch_redactions=leaked, session_expires_at=expires, **errors,
        )

    async def _validate(self, run: RunRow, sandbox: Sandbox, repo: RunRepo, mode: str,
                        tree: str) -> ValidationResult | None:
        assert run.base_commit is not None
        result = await validate(sandbox, repo, mode, self.s.settings.validation, run.repository_full_name,
                                run.base_commit, tree, await self._command_env(run))
        if result is not None:
            await self.s.hub.builder(run.id, {"type": "validation", "final": False, **result.as_json()})
        return result

    async def _previous_tree(self, run_id: str, idx: int) -> str | None:
        for row in await store.turns_raw(self.s.db, run_id):
            if row[0] == idx - 1:
                return str(row[4]) if row[4] else None
        return None

    def _expiry(self, run: RunRow) -> str:
        sb = self.s.settings.sandbox
        idle_until = now() + timedelta(seconds=sb.idle_timeout_s)
        if run.sandbox_started_at:
            idle_until = min(idle_until, parse_iso(run.sandbox_started_at) + timedelta(seconds=sb.max_lifetime_s))
        return iso(idle_until)

    async def _prompt(self, run: RunRow, sandbox: Sandbox, agent: OpenCodeClient, session_id: str, prompt: str) -> str:
        normalize = Normalizer(session_id)
        model = ModelWatch.for_prompt(self.s, run, sandbox, session_id)
        connected = asyncio.Event()
        idle = asyncio.Event()
        texts: list[str] = []  # the last assistant text (the summary when the reply has none)
        limits = self.s.settings.limits
        rows = 0  # events of this prompt; at most limits.max_events_per_turn are stored

        async def pump() -> None:
            nonlocal rows
            async for event in agent.events():
                kind = event.get("type")
                if kind == "server.connected":
                    connected.set()
                    continue
                props = event.get("properties")
                props = props if isinstance(props, dict) else {}
                model.observe(event)
                if kind == "session.idle" and props.get("sessionID") == session_id:
                    idle.set()
                row = normalize(event)  # first: it learns the run's subagent sessions
                # safety net: a prompt nobody answers would hang the headless turn (or one of its
                # subagents) forever
                with contextlib.suppress(AgentError):
                    if kind == "permission.asked" and normalize.owns(props.get("sessionID")):
                        await agent.reply_permission(str(props.get("id")), "reject")
                    if kind == "question.asked" and normalize.owns(props.get("sessionID")):
                        await agent.reject_question(str(props.get("id")))
                if row is not None:
                    if row["type"] == "text" and "sessionId" not in row:  # a subagent's text is not the summary
                        texts[:] = [row["text"]]
                    rows += 1
                    if rows <= limits.max_events_per_turn:
                        await self.s.hub.builder(run.id, row)

        pump_task = asyncio.create_task(pump())
        try:
            # OpenCode answered its health check already; on a loaded machine its event stream
            # can still take a while to open, so this waits as long as its start may take
            await asyncio.wait_for(connected.wait(), self.s.settings.sandbox.agent_ready_timeout_s)
            agent_name = "plan" if run.task_kind == "plan" else "build"
            try:
                result = await model.guard(
                    agent.prompt(session_id, prompt, provider_id=PROVIDER_ID, model_id=run.model_id, agent=agent_name,
                                 timeout_s=self.s.settings.sandbox.turn_timeout_s),
                    lambda: agent.abort(session_id), lambda: texts[-1] if texts else "")
            except AgentError as exc:
                if exc.code == "agent_unreachable" and "Timeout" in str(exc):
                    with contextlib.suppress(AgentError):
                        await agent.abort(session_id)
                    raise RunFailure("turn_timeout", "the agent's turn exceeded sandbox.turn_timeout_s") from exc
                raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), 3)
        except TimeoutError as exc:
            raise RunFailure("agent_unreachable", "OpenCode's event stream did not connect") from exc
        finally:
            model.close()
            pump_task.cancel()
            with contextlib.suppress(BaseException):
                await pump_task
            dropped = max(0, rows - limits.max_events_per_turn) + agent.dropped_events
            if dropped:
                await self.s.hub.builder(run.id, {
                    "type": "events.clipped", "stored": min(rows, limits.max_events_per_turn), "dropped": dropped,
                    "message": f"{dropped} events of this turn were not stored (limits.max_events_per_turn, or "
                               "larger than an event may be)"})
                agent.dropped_events = 0
        # the reply comes from the sandbox: any shape, any size (bounded by the client)
        info = result.get("info")
        error = info.get("error") if isinstance(info, dict) else None
        parts = [p for p in result["parts"] if isinstance(p, dict)] if isinstance(result.get("parts"), list) else []
        final = "\n".join(str(p.get("text", "")) for p in parts if p.get("type") == "text" and not p.get("synthetic"))
        summary = clip_text(final.strip() or (texts[-1] if texts else ""), limits.max_summary_chars)
        if error:
            error = error if isinstance(error, dict) else {"name": str(error)[:200]}
            data = error["data"] if isinstance(error.get("data"), dict) else {}
            message = clip_text(str(data.get("message") or error.get("name") or "the agent's turn failed"),
                                limits.max_summary_chars)
            if "budget_exceeded" in message:
                raise BudgetStop(message[message.index("budget_exceeded"):].removeprefix("budget_exceeded: "), summary)
            if error.get("name") == "APIError":
                unreachable = await model.explain()
                if unreachable is not None:
                    raise TurnStop("model_unreachable", f"{unreachable} (OpenCode: {message[:300]})", summary)
            code = "model_error" if error.get("name") == "APIError" else "agent_error"
            raise RunFailure(code, message)
        return summary

    # ---- state changes --------------------------------------------------------------------------

    async def _transition(self, run: RunRow, status: RunStatus, phase: Phase, **fields: Any) -> RunRow:
        updated = await store.transition(self.s.db, run.id, status, phase, **fields)
        if updated.status is not run.status or updated.phase is not run.phase:
            await self.s.hub.status(updated)
        return updated

    async def destroy(self, sandbox_id: str) -> None:
        try:
            await self.s.backend.destroy(sandbox_id)
        except SandboxError as exc:
            log.warning("could not remove sandbox %s (%s); the orphan sweep will", sandbox_id[:12], exc)
        except Exception:  # a backend bug must not keep the run from its terminal status
            log.exception("could not remove sandbox %s; the orphan sweep will", sandbox_id[:12])

    async def fail(self, run_id: str, code: str, message: str) -> None:
        run = await store.get_run(self.s.db, run_id)
        if run is None or run.status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED):
            return
        message = self.s.redactor.clean(message, run_id)
        log.info("run %s failed: %s: %s", run_id, code, message)
        await self.s.hub.builder(run_id, {"type": "error", "code": code, "message": message})
        await store.update_turn(self.s.db, run_id, max(run.turn_count, 1), status="failed", finished_at=now_iso())
        await self._transition(run, RunStatus.FAILED, Phase.FAILED, error_code=code, error_message=message,
                               finished_at=now_iso(), sandbox_token_hash=None, sandbox_token=None,
                               agent_secret=None, byok_key=None, mcp_headers=None, session_end_reason=SessionEnd.FINISHED.value)
        self.s.redactor.forget_run(run_id)
        await self.run_repo(run_id).discard()

    async def close_session(self, run: RunRow, status: RunStatus, phase: Phase, reason: SessionEnd,
                            **fields: Any) -> RunRow:
        """Destroy an idle run's sandbox, then record the terminal state."""
        if run.sandbox_id:
            await self.destroy(run.sandbox_id)
        closed = await self._transition(run, status, phase, finished_at=now_iso(), sandbox_token_hash=None,
                                        sandbox_token=None, agent_secret=None, byok_key=None, mcp_headers=None,
                                        session_end_reason=reason.value, **fields)
        self.s.redactor.forget_run(run.id)
        await self.run_repo(run.id).discard()
        return closed
