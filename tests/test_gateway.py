"""The model gateway: an OpenAI-compatible door that the official SDK can use, and that
forwards to upstream providers with the operator's key. In process (no Docker): the caller is
an API key, not a run; sandbox tokens inside real runs: tests/e2e/test_gateway_tokens.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY, standin_config
from tests.inprocess import AppThread, settings_for
from tests.upstream_standin import UpstreamStandIn


class Gateway(AppThread):
    @property
    def data_dir(self) -> Path:
        return self.settings.server.data_dir

    def new_key(self, user: str, scopes: str | tuple[str, ...] | None = None) -> str:  # type: ignore[override]
        wanted = tuple(scopes.split(",")) if isinstance(scopes, str) else scopes
        return super().new_key(user, *([wanted] if wanted else []))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamStandIn) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp("gateway")
    (base / "config.toml").write_text(standin_config(upstream.port))
    with Gateway(settings_for(base, base / "config.toml")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def alice(server: Gateway) -> str:
    return server.new_key("alice")


def sdk(server: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/api/v1", api_key=key, max_retries=0)


def test_openai_sdk_gets_scripted_tool_calls_and_text(server: Gateway, alice: str) -> None:
    client = sdk(server, alice)
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]
    first = client.chat.completions.create(model="critique/scripted", tools=tools,  # type: ignore[arg-type]
                                           messages=[{"role": "user", "content": "@bash echo hi\n@say bye"}])
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "bash" and json.loads(call.function.arguments) == {"command": "echo hi"}
    assert first.choices[0].finish_reason == "tool_calls" and first.usage and first.usage.prompt_tokens > 0

    stream = client.chat.completions.create(
        model="critique/scripted", tools=tools, stream=True, stream_options={"include_usage": True},  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "@bash echo hi\n@say bye"},
                  {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                   "function": {"name": "bash", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "hi"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "bye" and chunks[-1].usage is not None


def test_the_script_works_on_plain_chat_calls(server: Gateway, alice: str) -> None:
    """A developer's own loop: the documented steps work without tools too, and @tool names any tool."""
    client = sdk(server, alice)
    said = client.chat.completions.create(model="critique/scripted",
                                          messages=[{"role": "user", "content": "@say hello"}])
    assert said.choices[0].message.content == "hello" and said.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="critique/scripted", stream=True,
                                              messages=[{"role": "user", "content": "Greet me.\n@say hi there"}])
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "hi there"
    with pytest.raises(openai.BadRequestError, match="offers no tools") as err:
        client.chat.completions.create(model="critique/scripted",
                                       messages=[{"role": "user", "content": "@bash ls\n@say done"}])
    assert err.value.body["code"] == "model_error"  # type: ignore[index]
    assert client.chat.completions.create(
        model="critique/scripted", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content == \
        "Scripted run"
    tools = [{"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object"}}}]
    called = client.chat.completions.create(model="critique/scripted", tools=tools,  # type: ignore[arg-type]
                                            messages=[{"role": "user", "content": '@tool lookup_order {"id": 7}'}])
    call = called.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "lookup_order" and json.loads(call.function.arguments) == {"id": 7}


def test_scripted_failure_is_a_clear_4xx(server: Gateway, alice: str) -> None:
    with pytest.raises(openai.BadRequestError, match="boom"):
        sdk(server, alice).chat.completions.create(
            model="critique/scripted", tools=[{"type": "function", "function": {"name": "x"}}],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "@fail boom"}])


def test_upstream_models_are_forwarded_with_the_operators_key(server: Gateway, alice: str,
                                                              upstream: UpstreamStandIn) -> None:
    client = sdk(server, alice)
    reply = client.chat.completions.create(model="acme/coder-large", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "upstream says hi to coder-large-v2"
    got = upstream.requests[-1]
    assert got["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert got["body"]["model"] == "coder-large-v2" and got["body"]["messages"][0]["content"] == "hi"
    streamed = client.chat.completions.create(model="acme/coder-large", stream=True,
                                              messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).startswith("upstream says hi")
    assert alice not in json.dumps(upstream.requests)  # the caller's key never goes upstream


def test_gateway_auth(server: Gateway) -> None:
    no_inference = server.new_key("noinf", scopes="read:builder,write:builder")
    with pytest.raises(openai.PermissionDeniedError):
        sdk(server, no_inference).chat.completions.create(model="critique/scripted",
                                                          messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        sdk(server, "crs_not-a-live-run").chat.completions.create(model="critique/scripted",
                                                                  messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.UnprocessableEntityError):
        sdk(server, server.new_key("inf")).chat.completions.create(model="nope",
                                                                   messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(("model", "status", "code"), [
    ("acme/status-400", 400, "upstream_bad_request"), ("acme/status-401", 502, "upstream_unauthorized"),
    ("acme/status-429", 429, "upstream_rate_limited"), ("acme/status-500", 502, "upstream_error"),
    ("acme/slow", 504, "upstream_timeout"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_errors_are_mapped(server: Gateway, alice: str, model: str, status: int, code: str,
                                    stream: bool) -> None:
    resp = httpx.post(server.url + "/api/v1/chat/completions", headers={"Authorization": f"Bearer {alice}"},
                      json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "x"}]},
                      timeout=30)
    assert resp.status_code == status
    assert resp.json()["error"]["code"] == code


def test_streamed_tool_calls_are_forwarded(server: Gateway, alice: str) -> None:
    client = sdk(server, alice)
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]
    chunks = list(client.chat.completions.create(
        model="acme/coder-large", stream=True, tools=tools,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "@bash echo via upstream"}]))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function and calls[0].function.name == "bash"
    args = "".join(tc.function.arguments or "" for tc in calls if tc.function)
    assert json.loads(args) == {"command": "echo via upstream"}
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 1000


def test_calls_are_metered_from_reported_usage_else_estimated(server: Gateway) -> None:
    import sqlite3

    key = server.new_key("meter")
    client = sdk(server, key)
    client.chat.completions.create(model="acme/coder-large", messages=[{"role": "user", "content": "hi"}])
    streamed = client.chat.completions.create(model="acme/coder-large", stream=True,
                                              messages=[{"role": "user", "content": "hi"}])
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    rows: list[tuple[int, int, int]] = []
    deadline = time.monotonic() + 60
    while len(rows) < 2 and time.monotonic() < deadline:  # a call is recorded once its stream has ended
        time.sleep(0.05)
        with sqlite3.connect(server.data_dir / "critique.db") as db:
            rows = db.execute(
                "SELECT input_tokens, output_tokens, estimated FROM model_calls m JOIN users u ON u.id = m.user_id "
                "WHERE u.name = 'meter' ORDER BY m.id").fetchall()
    assert len(rows) == 2, rows
    assert rows[0] == (11, 7, 0)  # the upstream's own numbers
    assert rows[1][2] == 1 and rows[1][1] == max(1, len(text) // 4)  # no usage in that stream: estimated
