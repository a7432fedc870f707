"""OpenCode as a :class:`~critique_local.agent.base.Harness`: ``opencode serve`` in the sandbox,
driven over its HTTP API (``client.py``) with the configuration of ``config.py``.

A turn is one blocking ``POST /session/{id}/message`` while ``GET /event`` streams the turn's
events: they become the run's event rows (``normalize.py``) and the neutral signals the
model watch needs (:func:`model_signals`); any permission or question a headless turn would wait
on is rejected. The reply (any shape: it comes from the sandbox) becomes a
:class:`~critique_local.agent.base.TurnReply`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from critique_local.agent.base import (
    WORKSPACE,
    Agent,
    EventRow,
    EventsDropped,
    Harness,
    LaunchConfig,
    ModelRetry,
    OnEvent,
    PromptSent,
    ToolActivity,
    TurnError,
    TurnErrorKind,
    TurnEvent,
    TurnReply,
    TurnRequest,
)
from critique_local.agent.opencode.client import OpenCodeClient, basic_auth
from critique_local.agent.opencode.config import OPENCODE_PORT, PROVIDER_ID, TOKEN_ENV, opencode_config
from critique_local.agent.opencode.normalize import Normalizer
from critique_local.agent.opencode.sessions import export_session, import_session, message_count, truncated
from critique_local.agent.processes import stop_marked
from critique_local.bounds import clip_text
from critique_local.errors import AgentError, ErrorCode
from critique_local.sandboxes.base import Sandbox, SandboxError

START_OPENCODE = ("mkdir -p ~/.cache/opencode/bin && ln -sf /usr/bin/rg ~/.cache/opencode/bin/rg && "
                  f"exec opencode serve --hostname 0.0.0.0 --port {OPENCODE_PORT}")
LOG_PATH = "/tmp/opencode.log"
WARM_UP_DIR = "/tmp/.critique-warm-up"
WARM_UP_REPO = (f"mkdir -p {WARM_UP_DIR} && cd {WARM_UP_DIR} && git init -q && git -c user.name=warm-up "
                "-c user.email=warm-up@localhost commit -q --allow-empty -m warm-up")
log = logging.getLogger(__name__)
# in the environment of the server and so of every process it starts: what Harness.stop ends
AGENT_MARK_NAME, AGENT_MARK_VALUE = "CRITIQUE_AGENT_PROCESS", "opencode"
IDLE_WAIT_S = 3.0  # after the reply, how long the stream may take to say the session is idle
BUDGET_MARK = "budget_exceeded"  # the gateway's refusal, as OpenCode quotes it in the turn's error


def agent_env(config: LaunchConfig) -> dict[str, str]:
    """The environment ``opencode serve`` starts with (secrets included: never logged)."""
    return {
        **config.env,
        AGENT_MARK_NAME: AGENT_MARK_VALUE,
        TOKEN_ENV: config.gateway_token,
        "OPENCODE_SERVER_PASSWORD": config.secret,
        "OPENCODE_CONFIG_CONTENT": opencode_config(config.gateway_url, config.model_id, config.context_tokens,
                                                   config.output_tokens, config.mcp_servers),
    }


def model_signals(event: dict[str, Any], session_id: str) -> list[TurnEvent]:
    """What an OpenCode event says about the session's need for the model: a tool part of
    ``session_id`` pending/running or completed/failed, or a ``retry`` status. Other sessions'
    events (subagents included) say nothing."""
    kind = event.get("type")
    props = event.get("properties")
    props = props if isinstance(props, dict) else {}
    if kind == "message.part.updated":
        part = props.get("part")
        part = part if isinstance(part, dict) else {}
        if part.get("sessionID") != session_id or part.get("type") != "tool":
            return []
        state = part.get("state")
        status = state.get("status") if isinstance(state, dict) else None
        if status in ("pending", "running"):
            return [ToolActivity(str(part.get("id")), running=True)]
        if status in ("completed", "error"):
            return [ToolActivity(str(part.get("id")), running=False)]
    elif kind == "session.status" and props.get("sessionID") == session_id:
        status = props.get("status")
        if isinstance(status, dict) and status.get("type") == "retry":
            return [ModelRetry(str(status.get("message") or "")[:300])]
    return []


def reply_of(result: dict[str, Any], last_text: str, max_chars: int) -> TurnReply:
    """``{info, parts}`` of the turn's last assistant message -> the turn's outcome."""
    info = result.get("info")
    error = info.get("error") if isinstance(info, dict) else None
    parts = [p for p in result["parts"] if isinstance(p, dict)] if isinstance(result.get("parts"), list) else []
    final = "\n".join(str(p.get("text", "")) for p in parts if p.get("type") == "text" and not p.get("synthetic"))
    summary = clip_text(final.strip() or last_text, max_chars)
    if not error:
        return TurnReply(summary)
    error = error if isinstance(error, dict) else {"name": str(error)[:200]}
    data = error["data"] if isinstance(error.get("data"), dict) else {}
    message = clip_text(str(data.get("message") or error.get("name") or "the agent's turn failed"), max_chars)
    if BUDGET_MARK in message:
        reason = message[message.index(BUDGET_MARK):].removeprefix(f"{BUDGET_MARK}: ")
        return TurnReply(summary, TurnError(TurnErrorKind.BUDGET, reason))
    kind = TurnErrorKind.MODEL if error.get("name") == "APIError" else TurnErrorKind.AGENT
    return TurnReply(summary, TurnError(kind, message))


class OpenCodeAgent(Agent):
    def __init__(self, sandbox: Sandbox, client: OpenCodeClient) -> None:
        self.sandbox = sandbox
        self.client = client
        self.address = client.base_url

    async def wait_healthy(self, timeout_s: float) -> None:
        await self.client.wait_healthy(timeout_s)

    async def open_session(self, title: str) -> str:
        return await self.client.create_session(title)

    async def abort(self, session_id: str) -> None:
        await self.client.abort(session_id)

    async def close(self) -> None:
        await self.client.aclose()

    async def warm_up(self, model_id: str, timeout_s: float, in_workspace: bool = False) -> None:
        """A throwaway one-step turn in a session deleted afterwards: in the workspace when it
        already holds the run's checkout, else in a scratch git repository (its own OpenCode
        project: an empty workspace's project would be mistaken for a project-less directory
        and kept so). OpenCode's first prompt loads its session loop, tools and model runtime
        (once per process), and boots the project's services (once per directory): seconds on
        a loaded machine, paid here before a run claims the sandbox. The model call is refused
        by the gateway (the sandbox's token is bound to no run yet): the work before it is what
        is wanted."""
        directory = WORKSPACE if in_workspace else WARM_UP_DIR
        with contextlib.suppress(AgentError, SandboxError):
            if not in_workspace:
                await self.sandbox.exec(["bash", "-c", WARM_UP_REPO], timeout_s=timeout_s)
            session_id = await self.client.create_session("warm-up", directory=directory)
            try:
                await self.client.prompt(session_id, "@say ok", provider_id=PROVIDER_ID, model_id=model_id,
                                         agent="build", timeout_s=timeout_s, directory=directory)
            finally:
                await self.client.delete_session(session_id, directory=directory)

    async def has_session(self, session_id: str) -> bool:
        return await self.client.has_session(session_id)

    async def export_session(self, session_id: str) -> bytes:
        try:  # the server's own API is fast; the CLI (seconds) when it does not answer the way we expect
            data = await self.client.session_export(session_id)
        except AgentError:
            return await export_session(self.sandbox, session_id)
        return json.dumps(data, separators=(",", ":")).encode()

    async def import_session(self, state: bytes) -> str:
        return await import_session(self.sandbox, state)

    async def prompt(self, turn: TurnRequest, on_event: OnEvent) -> TurnReply:
        client, session_id = self.client, turn.session_id
        normalize = Normalizer(session_id)
        connected = asyncio.Event()
        idle = asyncio.Event()
        texts: list[str] = []  # the last assistant text (the summary when the reply has none)

        async def pump() -> None:
            async for event in client.events():
                kind = event.get("type")
                if kind == "server.connected":
                    connected.set()
                    continue
                props = event.get("properties")
                props = props if isinstance(props, dict) else {}
                for signal in model_signals(event, session_id):
                    await on_event(signal)
                if kind == "session.idle" and props.get("sessionID") == session_id:
                    idle.set()
                row = normalize(event)  # first: it learns the run's subagent sessions
                # safety net: a prompt nobody answers would hang the headless turn (or one of its
                # subagents) forever
                with contextlib.suppress(AgentError):
                    if kind == "permission.asked" and normalize.owns(props.get("sessionID")):
                        await client.reply_permission(str(props.get("id")), "reject")
                    if kind == "question.asked" and normalize.owns(props.get("sessionID")):
                        await client.reject_question(str(props.get("id")))
                if row is not None:
                    if row["type"] == "text" and "sessionId" not in row:  # a subagent's text is not the summary
                        texts[:] = [row["text"]]
                    await on_event(EventRow(row))

        pump_task = asyncio.create_task(pump())
        t0 = time.monotonic()
        marks: list[tuple[str, float]] = []
        try:
            # OpenCode answered its health check already; on a loaded machine its event stream
            # can still take a while to open, so this waits as long as its start may take
            await asyncio.wait_for(connected.wait(), turn.connect_timeout_s)
            marks.append(("events.connected", time.monotonic()))
            await on_event(PromptSent())
            try:
                result = await client.prompt(session_id, turn.text, provider_id=PROVIDER_ID, model_id=turn.model_id,
                                             agent="plan" if turn.read_only else "build", timeout_s=turn.timeout_s)
            except AgentError as exc:
                if exc.code is ErrorCode.AGENT_UNREACHABLE and "Timeout" in str(exc):
                    with contextlib.suppress(AgentError):
                        await client.abort(session_id)
                    raise AgentError("the agent's turn exceeded sandbox.turn_timeout_s",
                                     ErrorCode.TURN_TIMEOUT) from exc
                raise
            marks.append(("reply", time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), IDLE_WAIT_S)
            marks.append(("idle" if idle.is_set() else "idle.not-seen", time.monotonic()))
        except TimeoutError as exc:
            raise AgentError("OpenCode's event stream did not connect", ErrorCode.AGENT_UNREACHABLE) from exc
        finally:
            pump_task.cancel()
            with contextlib.suppress(BaseException):
                await pump_task
            if client.dropped_events:
                dropped, client.dropped_events = client.dropped_events, 0
                await on_event(EventsDropped(dropped))
            log.debug("OpenCode turn of %s (ms from its start): %s", session_id,
                      " ".join(f"{name} +{(at - t0) * 1000:.0f}" for name, at in marks))
        return reply_of(result, texts[-1] if texts else "", turn.max_text_chars)


class OpenCodeHarness(Harness):
    name = "OpenCode"

    async def launch(self, sandbox: Sandbox, config: LaunchConfig, timeout_s: float) -> Agent:
        """``opencode serve`` in the background; healthy within ``timeout_s``. Its storage
        (``~/.local/share/opencode``) is the sandbox's: a relaunch after :meth:`stop` finds the
        sessions of the server before it."""
        # where to reach it is looked up while it starts
        _, endpoint = await asyncio.gather(
            sandbox.spawn(["bash", "-c", START_OPENCODE], env=agent_env(config), cwd=WORKSPACE, log_path=LOG_PATH),
            sandbox.endpoint(OPENCODE_PORT))
        agent = OpenCodeAgent(sandbox, OpenCodeClient(endpoint.base_url, {**endpoint.headers,
                                                                         **basic_auth(config.secret)}))
        try:
            await agent.wait_healthy(timeout_s)
        except BaseException:
            await agent.close()
            raise
        return agent

    async def stop(self, sandbox: Sandbox, timeout_s: float) -> None:
        await stop_marked(sandbox, f"{AGENT_MARK_NAME}={AGENT_MARK_VALUE}", timeout_s)

    async def attach(self, sandbox: Sandbox, secret: str) -> Agent:
        endpoint = await sandbox.endpoint(OPENCODE_PORT)
        return OpenCodeAgent(sandbox, OpenCodeClient(endpoint.base_url, {**endpoint.headers, **basic_auth(secret)}))

    def message_count(self, state: bytes) -> int:
        return message_count(state)

    def truncate(self, state: bytes, messages: int) -> bytes:
        return truncated(state, messages)
