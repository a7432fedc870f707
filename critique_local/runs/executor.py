"""One run, end to end: checkout -> sandbox -> OpenCode -> the turn -> results -> teardown.

Git and agent setup live here, not in the sandbox backends: a backend only knows how to run
commands, upload files and expose a port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Any

from critique_local.agent.config import OPENCODE_PORT, PROVIDER_ID, TOKEN_ENV, opencode_config
from critique_local.agent.normalize import Normalizer
from critique_local.agent.opencode import AgentError, OpenCodeClient, basic_auth
from critique_local.clock import ms_between, now_iso
from critique_local.errors import RunFailure
from critique_local.repos import checkout
from critique_local.runs.collect import collect
from critique_local.runs.states import Phase, RunStatus
from critique_local.sandboxes.base import Sandbox, SandboxError, SandboxSpec
from critique_local.services import Services
from critique_local.store import runs as store
from critique_local.store.runs import RunRow
from critique_local.tokens import SANDBOX_TOKEN_PREFIX, new_token, token_hash

log = logging.getLogger(__name__)
WORKSPACE = "/workspace"


class Executor:
    def __init__(self, services: Services) -> None:
        self.s = services

    async def execute(self, run_id: str) -> None:
        run = await store.get_run(self.s.db, run_id)
        if run is None or run.status is not RunStatus.QUEUED:
            return
        sandbox: Sandbox | None = None
        failure: tuple[str, str] | None = None
        try:
            run = await self._transition(run, RunStatus.RUNNING, Phase.PROVISIONING, started_at=now_iso(),
                                         turn_count=1)
            await store.update_turn(self.s.db, run.id, 1, status="running", started_at=now_iso())
            sandbox, agent, session_id = await self._provision(run)
            try:
                run = await self._transition(run, RunStatus.RUNNING, Phase.AGENT_RUNNING)
                summary = await self._turn(run, agent, session_id, await store.first_prompt(self.s.db, run.id))
                run = await self._transition(run, RunStatus.RUNNING, Phase.COLLECTING)
                assert run.base_commit is not None
                result = await collect(sandbox, run.base_commit, self.s.settings.limits.max_patch_bytes)
            finally:
                await agent.aclose()
        except asyncio.CancelledError:
            # server shutdown: the run is failed as server_restarted when the server starts again
            if sandbox is not None:
                await asyncio.shield(self._destroy(sandbox))
            raise
        except (RunFailure, SandboxError, AgentError) as exc:
            failure = (exc.code, getattr(exc, "message", str(exc)))
        except Exception as exc:
            log.exception("run %s crashed", run_id)
            failure = ("internal_error", f"{exc.__class__.__name__}: {exc}")
        # teardown first, so a terminal status always means the sandbox is gone
        if sandbox is not None:
            await self._destroy(sandbox)
        if failure is not None:
            await self._fail(run_id, *failure)
            return
        finished = now_iso()
        await store.update_turn(self.s.db, run.id, 1, status="completed", summary=summary,
                                diff_stats=_json(result.diff_stats), finished_at=finished)
        await self._transition(
            run, RunStatus.COMPLETED, Phase.FINISHED, summary=summary, changed_paths=_json(result.changed_paths),
            diff_stats=_json(result.diff_stats), patch=result.patch or None, finished_at=finished,
            sandbox_token_hash=None,
        )

    async def _destroy(self, sandbox: Sandbox) -> None:
        try:
            await self.s.backend.destroy(sandbox.id)
        except SandboxError:
            log.warning("could not remove sandbox %s; startup reconciliation will", sandbox.id[:12])

    async def _transition(self, run: RunRow, status: RunStatus, phase: Phase, **fields: Any) -> RunRow:
        updated = await store.transition(self.s.db, run.id, status, phase, **fields)
        if updated.status is not run.status or updated.phase is not run.phase:
            await self.s.hub.status(updated)
        return updated

    async def _fail(self, run_id: str, code: str, message: str) -> None:
        run = await store.get_run(self.s.db, run_id)
        if run is None or run.status in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED):
            return
        log.info("run %s failed: %s: %s", run_id, code, message)
        await self.s.hub.builder(run_id, {"type": "error", "code": code, "message": message})
        await store.update_turn(self.s.db, run_id, max(run.turn_count, 1), status="failed", finished_at=now_iso())
        await self._transition(run, RunStatus.FAILED, Phase.FAILED, error_code=code, error_message=message,
                               finished_at=now_iso(), sandbox_token_hash=None)

    async def _provision(self, run: RunRow) -> tuple[Sandbox, OpenCodeClient, str]:
        settings = self.s.settings
        scratch = settings.server.data_dir / "tmp"
        prepared = await checkout.prepare(settings.git, settings.github, run.repository_full_name,
                                          run.base_ref, scratch)
        try:
            token = new_token(SANDBOX_TOKEN_PREFIX)
            password = secrets.token_urlsafe(24)
            model = self.s.catalog.get(run.model_id)
            env = {
                TOKEN_ENV: token,
                "OPENCODE_SERVER_PASSWORD": password,
                "OPENCODE_CONFIG_CONTENT": opencode_config(
                    self.s.gateway_url, run.model_id, model.context_tokens if model else 128_000,
                    model.output_tokens if model else 8192),
            }
            await store.update_run(self.s.db, run.id, base_commit=prepared.base_commit,
                                   base_ref=prepared.base_ref, sandbox_token_hash=token_hash(token))
            sandbox = await self.s.backend.create(SandboxSpec(run.id, run.user_id))
        except BaseException:
            checkout.discard(prepared)
            raise
        try:
            await store.update_run(self.s.db, run.id, sandbox_id=sandbox.id)
            await sandbox.upload_tar(WORKSPACE, prepared.tar_path)
            checkout.discard(prepared)
            await sandbox.spawn(["opencode", "serve", "--hostname", "0.0.0.0", "--port", str(OPENCODE_PORT)],
                                env=env, cwd=WORKSPACE, log_path="/tmp/opencode.log")
            endpoint = await sandbox.endpoint(OPENCODE_PORT)
            agent = OpenCodeClient(endpoint.base_url, {**endpoint.headers, **basic_auth(password)})
            try:
                await agent.wait_healthy(settings.sandbox.agent_ready_timeout_s)
                title = str(run.request.get("title") or f"critique-local {run.id}")
                session_id = await agent.create_session(title)
            except BaseException:
                await agent.aclose()
                raise
        except BaseException:
            checkout.discard(prepared)
            await asyncio.shield(self.s.backend.destroy(sandbox.id))
            raise
        ready = now_iso()
        await store.update_run(self.s.db, run.id, agent_session_id=session_id, agent_ready_at=ready)
        await self.s.hub.builder(run.id, {"type": "agent.ready", "sessionId": session_id,
                                          "sinceCreatedMs": ms_between(run.created_at, ready)})
        return sandbox, agent, session_id

    async def _turn(self, run: RunRow, agent: OpenCodeClient, session_id: str, prompt: str) -> str:
        normalize = Normalizer(session_id)
        connected = asyncio.Event()
        idle = asyncio.Event()
        texts: list[str] = []

        async def pump() -> None:
            async for event in agent.events():
                kind = event.get("type")
                if kind == "server.connected":
                    connected.set()
                    continue
                props = event.get("properties") or {}
                if kind == "session.idle" and props.get("sessionID") == session_id:
                    idle.set()
                # safety net: a prompt nobody answers would hang the headless turn forever
                with contextlib.suppress(AgentError):
                    if kind == "permission.asked" and props.get("sessionID") == session_id:
                        await agent.reply_permission(str(props.get("id")), "reject")
                    if kind == "question.asked" and props.get("sessionID") == session_id:
                        await agent.reject_question(str(props.get("id")))
                row = normalize(event)
                if row is not None:
                    if row["type"] == "text":
                        texts.append(row["text"])
                    await self.s.hub.builder(run.id, row)

        pump_task = asyncio.create_task(pump())
        try:
            await asyncio.wait_for(connected.wait(), 10)
            agent_name = "plan" if run.task_kind == "plan" else "build"
            try:
                result = await agent.prompt(session_id, prompt, provider_id=PROVIDER_ID, model_id=run.model_id,
                                            agent=agent_name, timeout_s=self.s.settings.sandbox.turn_timeout_s)
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
            pump_task.cancel()
            with contextlib.suppress(BaseException):
                await pump_task
        info = result.get("info") or {}
        error = info.get("error")
        if error:
            data = error.get("data") or {}
            message = str(data.get("message") or error.get("name") or "the agent's turn failed")
            code = "model_error" if error.get("name") == "APIError" else "agent_error"
            raise RunFailure(code, message)
        parts = result.get("parts") or []
        final = "\n".join(p.get("text", "") for p in parts if p.get("type") == "text" and not p.get("synthetic"))
        return final.strip() or (texts[-1] if texts else "")


def _json(value: Any) -> str:
    return json.dumps(value)
