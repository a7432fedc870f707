"""A small async client for the parts of the OpenCode server API we use (v1 routes).

Errors are translated to :class:`AgentError` here; callers never see httpx exceptions.

The server in the sandbox is untrusted (the agent can replace OpenCode with its own program
between turns), so every reply is bounded: in time (a deadline for the whole call, not only
between bytes), in size (:data:`MAX_REPLY_BYTES`; events :data:`MAX_EVENT_BYTES`), in JSON
nesting, and in shape (a reply of the wrong type is an :class:`AgentError`, never a crash).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from critique_local import bounds
from critique_local.agent.sse import sse_data
from critique_local.errors import AgentError, ErrorCode


def basic_auth(password: str, user: str = "opencode") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


MAX_REPLY_BYTES = 16_000_000  # the largest reply of one call (a turn's last message with its parts)
MAX_EVENT_BYTES = 4_000_000  # the largest event; larger ones are dropped
HEALTH_CALL_S = 10.0  # the longest one health check may take (a loaded machine)
HEALTH_EVERY_S = 0.5  # a new health check while earlier ones are still unanswered
CALL_TIMEOUT_S = 30.0  # a whole call (connect, send, every byte of the reply), unless the call says otherwise


def _where(directory: str | None) -> dict[str, str]:
    """OpenCode serves every directory it is asked about (``?directory=``), each with its own
    project state; without it, the one it was started in."""
    return {"directory": directory} if directory else {}


class OpenCodeClient:
    def __init__(self, base_url: str, headers: Mapping[str, str]) -> None:
        self.base_url = base_url
        # identity encoding: a compressed reply could expand far beyond what was read
        self._http = httpx.AsyncClient(base_url=base_url, headers={**headers, "Accept-Encoding": "identity"},
                                       timeout=httpx.Timeout(CALL_TIMEOUT_S))
        self.dropped_events = 0  # events over MAX_EVENT_BYTES, not parsed

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _json(self, method: str, path: str, *, timeout_s: float = CALL_TIMEOUT_S, **kwargs: Any) -> Any:
        """One call's JSON reply (None when empty). Raises :class:`AgentError`: ``agent_unreachable``
        when it cannot connect or the whole reply does not arrive within ``timeout_s`` (the message
        then says ``Timeout``), ``agent_error`` for an HTTP error, a reply over
        :data:`MAX_REPLY_BYTES`, or one that is not JSON."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self._http.stream(method, path, timeout=httpx.Timeout(timeout_s), **kwargs) as resp:
                    body = bytearray()
                    async for chunk in resp.aiter_raw():
                        body += chunk
                        if len(body) > MAX_REPLY_BYTES:
                            raise AgentError(f"OpenCode {method} {path}: the reply is larger than "
                                             f"{MAX_REPLY_BYTES} bytes")
        except TimeoutError as exc:
            raise AgentError(f"OpenCode {method} {path}: Timeout: no complete reply within {timeout_s:.0f} s",
                             ErrorCode.AGENT_UNREACHABLE) from exc
        except httpx.HTTPError as exc:
            raise AgentError(f"OpenCode {method} {path}: {exc.__class__.__name__}: {exc}", ErrorCode.AGENT_UNREACHABLE) from exc
        if resp.status_code >= 400:
            text = bytes(body[:300]).decode(errors="replace")
            raise AgentError(f"OpenCode {method} {path}: HTTP {resp.status_code}: {text}")
        if not body:
            return None
        try:
            return bounds.loads(bytes(body))
        except ValueError as exc:
            raise AgentError(f"OpenCode {method} {path}: the reply is not JSON ({str(exc)[:200]})") from exc

    async def wait_healthy(self, timeout_s: float) -> None:
        """Return once ``GET /global/health`` answers healthy; raise ``AgentError``
        (``agent_start_timeout``) after ``timeout_s`` seconds.

        A request that reaches ``opencode serve`` (1.18) after it listens but before it is ready
        is accepted and never answered, while one sent later is answered at once (measured here:
        quiet, a check sent 1.7 s after the start hung for its whole 10 s limit while one sent a
        second later was answered in 40 ms; at load 8-16 that window lasted 10-16 s). So checks
        overlap: a new one every :data:`HEALTH_EVERY_S` while earlier ones wait (each up to
        :data:`HEALTH_CALL_S`, as a loaded machine may answer slowly), every 0.1 s while
        connections are refused; the first healthy answer wins and the rest are cancelled."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        pending: set[asyncio.Task[Any]] = set()
        try:
            while (left := deadline - time.monotonic()) > 0:
                pending.add(asyncio.create_task(
                    self._json("GET", "/global/health", timeout_s=min(HEALTH_CALL_S, max(left, 0.1)))))
                done, pending = await asyncio.wait(pending, timeout=min(HEALTH_EVERY_S, left),
                                                   return_when=asyncio.FIRST_COMPLETED)
                for check in done:
                    try:
                        health = check.result()
                    except AgentError as exc:
                        last = str(exc)[:200]
                        continue
                    if isinstance(health, dict) and health.get("healthy") is True:
                        return
                    last = "not healthy"
                await asyncio.sleep(0.1)
        finally:
            for check in pending:
                check.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        raise AgentError(f"OpenCode did not become healthy within {timeout_s:.0f}s ({last})", ErrorCode.AGENT_START_TIMEOUT)

    async def create_session(self, title: str, directory: str | None = None) -> str:
        """A new session (in ``directory``, default: where OpenCode was started); its id."""
        data = await self._json("POST", "/session", json={"title": title}, params=_where(directory))
        session_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(session_id, str) or not 0 < len(session_id) <= 200:
            raise AgentError("OpenCode POST /session: the reply has no session id")
        return session_id

    async def prompt(
        self, session_id: str, text: str, *, provider_id: str, model_id: str, agent: str, timeout_s: float,
        directory: str | None = None,
    ) -> dict[str, Any]:
        """Send a prompt and wait for the whole turn; returns ``{info, parts}`` of the last
        assistant message (``info.error`` is set when the turn failed)."""
        body = {"parts": [{"type": "text", "text": text}], "agent": agent,
                "model": {"providerID": provider_id, "modelID": model_id}}
        result = await self._json("POST", f"/session/{session_id}/message", json=body, timeout_s=timeout_s,
                                  params=_where(directory))
        if result is not None and not isinstance(result, dict):
            raise AgentError("OpenCode POST /session/.../message: the reply is not a message")
        return result or {}

    async def delete_session(self, session_id: str, directory: str | None = None) -> None:
        await self._json("DELETE", f"/session/{session_id}", params=_where(directory))

    async def abort(self, session_id: str) -> None:
        await self._json("POST", f"/session/{session_id}/abort")

    async def session_export(self, session_id: str) -> dict[str, Any]:
        """The session as ``opencode export`` writes it (``{"info", "messages": [{info, parts}]}``),
        read over HTTP (milliseconds instead of the CLI's seconds); bounded like every reply."""
        info, messages = await asyncio.gather(self._json("GET", f"/session/{session_id}"),
                                              self._json("GET", f"/session/{session_id}/message", timeout_s=60))
        if not isinstance(info, dict) or info.get("id") != session_id or not isinstance(messages, list):
            raise AgentError(f"OpenCode GET /session/{session_id}: not the session asked for")
        return {"info": info, "messages": messages}

    async def has_session(self, session_id: str) -> bool:
        """Whether ``GET /session/{id}`` answers with that session (an HTTP error: it does not).
        AgentError ``agent_unreachable`` when OpenCode does not answer."""
        try:
            info = await self._json("GET", f"/session/{session_id}")
        except AgentError as exc:
            if exc.code is ErrorCode.AGENT_UNREACHABLE:
                raise
            return False
        return isinstance(info, dict) and info.get("id") == session_id

    async def reply_permission(self, permission_id: str, reply: str) -> None:
        await self._json("POST", f"/permission/{permission_id}/reply", json={"reply": reply})

    async def reject_question(self, question_id: str) -> None:
        await self._json("POST", f"/question/{question_id}/reject")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """OpenCode's event stream (``GET /event``): each event that is a JSON object of at most
        :data:`MAX_EVENT_BYTES`; others are skipped (counted in :attr:`dropped_events`)."""
        timeout = httpx.Timeout(10.0, read=None)
        try:
            async with self._http.stream("GET", "/event", timeout=timeout,
                                         headers={"Accept": "text/event-stream"}) as resp:
                if resp.status_code != 200:
                    raise AgentError(f"OpenCode event stream: HTTP {resp.status_code}", ErrorCode.AGENT_UNREACHABLE)
                async for data in sse_data(resp.aiter_raw(), MAX_EVENT_BYTES):
                    try:
                        event = bounds.loads(data) if data is not None else None
                    except ValueError:
                        event = None
                    if isinstance(event, dict):
                        yield event
                    else:
                        self.dropped_events += 1
        except httpx.HTTPError as exc:
            raise AgentError(f"OpenCode event stream: {exc.__class__.__name__}", ErrorCode.AGENT_UNREACHABLE) from exc
