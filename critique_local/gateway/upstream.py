"""Forwarding to an upstream OpenAI-compatible provider (OpenRouter, vLLM, llama.cpp, Ollama).

The provider key is added here, on the server; the caller never sees it. Upstream failures
are translated into gateway errors with a bounded timeout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
from httpx_sse import EventSource, ServerSentEvent

from critique_local.config import ProviderSettings


class UpstreamError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Upstream:
    def __init__(self) -> None:
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0))

    async def aclose(self) -> None:
        await self._http.aclose()

    def _request(self, provider: ProviderSettings, body: dict[str, Any]) -> httpx.Request:
        headers = {"Content-Type": "application/json"}
        if provider.api_key:
            headers["Authorization"] = f"Bearer {provider.api_key}"  # the operator's key, or a run's BYOK key
        return self._http.build_request(
            "POST", provider.base_url.rstrip("/") + "/chat/completions", json=body, headers=headers,
            timeout=httpx.Timeout(provider.timeout_s, connect=10.0),
        )

    async def complete(self, provider: ProviderSettings, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self._http.send(self._request(provider, body))
        except httpx.HTTPError as exc:
            raise UpstreamError(502, f"upstream unreachable: {exc.__class__.__name__}") from exc
        if resp.status_code >= 400:
            raise UpstreamError(resp.status_code, f"upstream error {resp.status_code}: {resp.text[:500]}")
        data: dict[str, Any] = resp.json()
        return data

    async def stream(self, provider: ProviderSettings, body: dict[str, Any]) -> AsyncIterator[ServerSentEvent]:
        """Yields the upstream's server-sent events (parsed with httpx-sse)."""
        try:
            resp = await self._http.send(self._request(provider, body), stream=True)
        except httpx.HTTPError as exc:
            raise UpstreamError(502, f"upstream unreachable: {exc.__class__.__name__}") from exc
        try:
            if resp.status_code >= 400:
                text = (await resp.aread()).decode(errors="replace")
                raise UpstreamError(resp.status_code, f"upstream error {resp.status_code}: {text[:500]}")
            try:
                async for event in EventSource(resp).aiter_sse():
                    yield event
            except httpx.HTTPError as exc:
                raise UpstreamError(502, f"upstream stream broke: {exc.__class__.__name__}") from exc
        finally:
            await resp.aclose()
