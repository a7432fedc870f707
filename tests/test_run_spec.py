"""A run's request is stored as JSON and parsed once into a RunSpec: nothing is lost either way."""

from __future__ import annotations

from typing import Any

import pytest

from critique_local.api.schemas import CreateRunRequest, MessageRequest
from critique_local.config import Settings
from critique_local.runs.network import network_policy
from critique_local.runs.spec import NetworkSpec, PublishSpec, RunSpec

FULL: dict[str, Any] = {
    "repository": "acme/web", "prompt": "fix it", "modelId": "acme/coder", "taskKind": "code", "baseRef": "dev",
    "validationMode": "tests", "publish": {"mode": "draft_pr", "branch": "fix/it"},
    "billing": {"mode": "openrouter", "openRouterApiKey": "sk-or-v1-abc"}, "title": "Fix", "tags": ["A", "b"],
    "metadata": {"k": "v"}, "safety": {"network": {"mode": "restricted", "allowlist": ["pypi.org"]},
                                       "resources": {"maxTurns": 5, "maxCredits": 2.5}},
    "webhook": {"url": "https://hooks.example/x"},
}


@pytest.mark.parametrize("body", [
    FULL,
    {"repository": "acme/web", "prompt": "x"},
    {"repositoryId": "repo_1", "prompt": "x", "safety": {}},
    {"repository": "acme/web", "prompt": "x", "safety": {"resources": {"maxTurns": 1}}, "publish": {}},
])
def test_stored_request_round_trips(body: dict[str, Any]) -> None:
    order = CreateRunRequest.model_validate(body).order()
    stored = CreateRunRequest.model_validate(body).model_dump(mode="json", by_alias=True,
                                                               exclude={"prompt", "billing"})
    stored["billingMode"] = body.get("billing", {}).get("mode", "managed")
    assert order.spec.to_stored() == stored
    assert RunSpec.from_stored(stored) == order.spec
    assert order.prompt == body["prompt"]


def test_the_spec_reads_what_the_run_layer_needs() -> None:
    order = CreateRunRequest.model_validate(FULL).order()
    spec = order.spec
    assert order.open_router_api_key == "sk-or-v1-abc"
    assert "sk-or-v1-abc" not in str(spec.to_stored())  # the key is never part of the stored request
    assert spec.byok and spec.validation == "tests" and spec.tags == ("a", "b")
    assert spec.publish == PublishSpec("draft_pr", "fix/it")
    assert spec.network == NetworkSpec("restricted", ("pypi.org",))
    assert spec.resources is not None and spec.resources.max_turns == 5 and spec.webhook_url == "https://hooks.example/x"
    plain = RunSpec.from_stored({})
    assert not plain.byok and plain.validation == "minimal" and plain.network is None and plain.safety_view() is None


def test_network_policy_fills_in_the_servers_defaults() -> None:
    settings = Settings()
    assert network_policy(settings, None)[0] == settings.network.default_mode
    assert network_policy(settings, NetworkSpec("restricted")) == ("restricted", list(settings.network.default_allowlist))
    assert network_policy(settings, NetworkSpec("restricted", ("a.org",))) == ("restricted", ["a.org"])


def test_a_message_becomes_a_follow_up() -> None:
    follow = MessageRequest.model_validate({"prompt": "more", "publish": {"mode": "draft_pr"}}).follow_up()
    assert follow.prompt == "more" and follow.publish == PublishSpec("draft_pr") and not follow.end_session
    assert MessageRequest.model_validate({"endSession": True}).follow_up().end_session
