"""What a run's fields mean, in process (runs stay queued here; their later states are written
the way the executor writes them, through the store): ``firstModelCallAt`` is the run's first
model call and ``turns[].firstModelCallAt`` each turn's, ``pausedAt`` is gone once the run ended;
and requests whose values only look right (a turn number as a string, a budget that is not a
finite number) are a 422 naming the field."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from critique_local.appkeys import SERVICES
from critique_local.runs.states import Phase, RunStatus
from critique_local.store import runs as store
from tests.conftest import SAMPLE_FILES
from tests.helpers import make_repo
from tests.inprocess import app_client, new_key, settings_for

RUNS = "/api/v1/coding-agent/runs"
OK_BODY = {"repository": "acme/web", "prompt": "@say hi"}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[TestClient, dict[str, str]]]:
    make_repo(tmp_path / "repos", "acme/web", SAMPLE_FILES)
    async with app_client(settings_for(tmp_path)) as client:
        yield client, {"Authorization": f"Bearer {await new_key(client, 'alice')}"}


async def _run(client: TestClient, auth: dict[str, str], run_id: str) -> dict[str, Any]:
    resp = await client.get(f"{RUNS}/{run_id}", headers=auth)
    assert resp.status == 200
    run: dict[str, Any] = (await resp.json())["run"]
    return run


async def test_first_model_call_is_the_runs_first_and_paused_at_ends_with_the_run(
        api: tuple[TestClient, dict[str, str]]) -> None:
    client, auth = api
    db = client.app[SERVICES].db
    run_id = (await (await client.post(RUNS, json=OK_BODY, headers=auth)).json())["run"]["id"]
    first, second = "2026-12-06T05:00:01.000000Z", "2026-12-06T05:10:02.000000Z"
    # turn 1 runs, calls the model, the run waits idle and is paused; turn 2 calls the model later
    await store.transition(db, run_id, RunStatus.RUNNING, Phase.AGENT_RUNNING, turn_count=1)  # as the executor starts it
    await store.mark_first_model_call(db, run_id, 1, first)
    await store.transition(db, run_id, RunStatus.IDLE, Phase.AWAITING_FOLLOW_UP)
    await store.update_run(db, run_id, paused_at="2026-12-06T05:05:00.000000Z")
    assert (await _run(client, auth, run_id))["pausedAt"]
    assert await store.begin_follow_up(db, run_id, "more", {"mode": "none"}) == 2
    await store.mark_first_model_call(db, run_id, 2, second)
    run = await _run(client, auth, run_id)
    assert run["firstModelCallAt"] == first  # the run's, not the current turn's
    assert [t["firstModelCallAt"] for t in run["turns"]] == [first, second]
    await store.transition(db, run_id, RunStatus.COMPLETED, Phase.FINISHED)
    ended = await _run(client, auth, run_id)
    assert ended["status"] == "completed" and ended["pausedAt"] is None


@pytest.mark.parametrize("turn", ["1", 1.0, True])
async def test_a_fork_turn_that_is_not_a_json_integer_is_422(api: tuple[TestClient, dict[str, str]],
                                                             turn: object) -> None:
    client, auth = api
    run_id = (await (await client.post(RUNS, json=OK_BODY, headers=auth)).json())["run"]["id"]
    resp = await client.post(f"{RUNS}/{run_id}/fork", json={"turn": turn}, headers=auth)
    body = await resp.json()
    assert resp.status == 422, body
    assert body["error"]["code"] == "invalid_request" and body["error"]["field"] == "turn"
    assert "integer" in body["error"]["message"]


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
async def test_a_budget_that_is_not_a_finite_number_is_422_saying_so(api: tuple[TestClient, dict[str, str]],
                                                                     value: bytes) -> None:
    client, auth = api
    raw = b'{"repository": "acme/web", "prompt": "@say hi", "safety": {"resources": {"maxCredits": ' + value + b"}}}"
    resp = await client.post(RUNS, data=raw, headers={**auth, "Content-Type": "application/json"})
    body = await resp.json()
    assert resp.status == 422, body
    assert body["error"] == {"code": "invalid_request", "field": "safety.resources.maxCredits",
                             "message": "safety.resources.maxCredits: Input should be a finite number"}
    listed = await client.get(RUNS, headers=auth)
    assert (await listed.json())["data"] == []
