"""A small async client for the parts of the OpenCode server API we use (v1 routes).

Errors are translated to :class:`AgentError` here; callers never see httpx exceptions.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
from httpx_sse import aconnect_sse

HEALTH_REQUEST_S = 10.0  # one health check may take this long (a loaded machine), within the deadline


class AgentError(Exception):
    def __init__(self, message: str, code: str = "agent_error") -> None:
        super().__init__(message)
        self.code = code


def basic_auth(password: str, user: str = "opencode") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class OpenCodeClient:
    def __init__(self, base_url: str, headers: Mapping[str, str]) -> None:
        self.base_url = base_url
        self._http = httpx.AsyncClient(base_url=base_url, headers=dict(headers), timeout=httpx.Timeout(30.0))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AgentError(f"OpenCode {method} {path}: {exc.__class__.__name__}: {exc}", "agent_unreachable") from exc
        if resp.status_code >= 400:
            raise AgentError(f"OpenCode {method} {path}: HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.json() if resp.content else None

    async def wait_healthy(self, timeout_s: float) -> None:
        """Return once ``GET /global/health`` answers healthy; raise ``AgentError``
        (``agent_start_timeout``) after ``timeout_s`` seconds. One slow answer (a loaded machine)
        may take up to 10 s of that time."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                resp = await self._http.get("/global/health", timeout=max(0.5, min(HEALTH_REQUEST_S,
                                                                                    deadline - time.monotonic())))
                if resp.status_code == 200 and resp.json().get("healthy"):
                    return
                last = f"HTTP {resp.status_code}"
            except (httpx.HTTPError, ValueError) as exc:
                last = exc.__class__.__name__
            await asyncio.sleep(0.1)
        raise AgentError(f"OpenCode did not become healthy within {timeout_s:.0f}s ({last})", "agent_start_timeout")

    async def create_session(self, title: str) -> str:
        data = await self._json("POST", "/session", json={"title": title})
        return str(data["id"])

    async def prompt(
        self, session_id: str, text: str, *, provider_id: str, model_id: str, agent: str, timeout_s: float
    ) -> dict[str, Any]:
        """Send a prompt and wait for the whole turn; returns ``{info, parts}`` of the last
        assistant message (``info.error`` is set when the turn failed)."""
        body = {"parts": [{"type": "text", "text": text}], "agent": agent,
                "model": {"providerID": provider_id, "modelID": model_id}}
        result = await self._json("POST", f"/session/{session_id}/message", json=body,
                                  timeout=httpx.Timeout(timeout_s, connect=10.0))
        return dict(result or {})

    async def abort(self, session_id: str) -> None:
        await self._json("POST", f"/session/{session_id}/abort")

    async def reply_permission(self, permission_id: str, reply: str) -> None:
        await self._json("POST", f"/permission/{permission_id}/reply", json={"reply": reply})

    async def reject_question(self, question_id: str) -> None:
        await self._json("POST", f"/question/{question_id}/reject")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """OpenCode's event stream (``GET /event``), parsed with httpx-sse."""
        timeout = httpx.Timeout(10.0, read=None)
        try:
            async with aconnect_sse(self._http, "GET", "/event", timeout=timeout) as source:
                async for sse in source.aiter_sse():
                    if sse.data:
                        try:
                            yield json.loads(sse.data)
                        except ValueError:
                            continue
        except httpx.HTTPError as exc:
            raise AgentError(f"OpenCode event stream: {exc.__class__.__name__}", "agent_unreachable") from exc
