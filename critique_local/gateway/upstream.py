"""Forwarding to an upstream OpenAI-compatible provider (OpenRouter, vLLM, llama.cpp, Ollama).

The provider key is added here, on the server; the caller never sees it. Upstream failures
are translated into gateway errors with a bounded timeout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from httpx_sse import EventSource, ServerSentEvent

from critique_local import bounds
from critique_local.config import ProviderSettings
from critique_local.errors import ErrorCode


class UpstreamError(Exception):
    """What went wrong upstream, already mapped to the status and code our callers get:
    upstream 400/404/422 -> 400 ``upstream_bad_request``; 401/403 -> 502 ``upstream_unauthorized``
    (the provider key is wrong: not the caller's fault, unless it is their BYOK key); 429 -> 429
    ``upstream_rate_limited``; other errors -> 502 ``upstream_error``; no answer within the
    provider's ``timeout_s`` -> 504 ``upstream_timeout``. The gateway does not retry: OpenCode
    retries 429 and 5xx itself, so retries stay bounded by one policy. ``unavailable`` is true
    when the provider could not be reached, timed out, or answered 5xx or 429 (what a run's model
    watch counts towards ``model_unreachable``), false when it answered and refused the call."""

    def __init__(self, status: int, message: str, code: ErrorCode = ErrorCode.UPSTREAM_ERROR, *, unavailable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.unavailable = unavailable

    @classmethod
    def from_status(cls, upstream_status: int, text: str) -> UpstreamError:
        detail = f"upstream answered {upstream_status}: {text[:500]}"
        if upstream_status in (400, 404, 422):
            return cls(400, detail, ErrorCode.UPSTREAM_BAD_REQUEST)
        if upstream_status in (401, 403):
            return cls(502, detail, ErrorCode.UPSTREAM_UNAUTHORIZED)
        if upstream_status == 429:
            return cls(429, detail, ErrorCode.UPSTREAM_RATE_LIMITED, unavailable=True)
        return cls(502, detail, unavailable=upstream_status >= 500)

    @classmethod
    def from_exception(cls, exc: httpx.HTTPError) -> UpstreamError:
        if isinstance(exc, httpx.TimeoutException):
            return cls(504, f"upstream did not answer in time ({exc.__class__.__name__})", ErrorCode.UPSTREAM_TIMEOUT,
                       unavailable=True)
        why = str(exc).strip()[:200]
        return cls(502, f"upstream unreachable: {exc.__class__.__name__}" + (f" ({why})" if why else ""),
                   unavailable=True)


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
            raise UpstreamError.from_exception(exc) from exc
        if resp.status_code >= 400:
            raise UpstreamError.from_status(resp.status_code, resp.text)
        try:
            data = bounds.loads(resp.content)
        except ValueError as exc:  # not JSON, or nested beyond what we parse
            raise UpstreamError(502, f"upstream answered something that is not usable JSON: {str(exc)[:200]}",
                                ErrorCode.UPSTREAM_ERROR) from exc
        if not isinstance(data, dict):
            raise UpstreamError(502, "upstream answered JSON that is not an object", ErrorCode.UPSTREAM_ERROR)
        return data

    async def stream(self, provider: ProviderSettings, body: dict[str, Any],
                     on_answer: Callable[[], None] | None = None) -> AsyncIterator[ServerSentEvent]:
        """Yields the upstream's server-sent events (parsed with httpx-sse); ``on_answer`` is
        called once the provider has answered with a success status, before the first event."""
        try:
            resp = await self._http.send(self._request(provider, body), stream=True)
        except httpx.HTTPError as exc:
            raise UpstreamError.from_exception(exc) from exc
        try:
            if resp.status_code >= 400:
                raise UpstreamError.from_status(resp.status_code, (await resp.aread()).decode(errors="replace"))
            if on_answer is not None:
                on_answer()
            try:
                async for event in EventSource(resp).aiter_sse():
                    yield event
            except httpx.HTTPError as exc:
                raise UpstreamError.from_exception(exc) from exc
        finally:
            await resp.aclose()
