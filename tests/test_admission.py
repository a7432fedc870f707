"""How a message to a run whose session ended is admitted, in process (no sandbox: the admitted
turn stays queued): restored on the same run id when its state was kept, else chained into a
new run created by the same path as any other, linked both ways. Either way clients hear one
``run.status`` per change (``Scheduler.enqueue``), and a run is chained at most once. Local pull
requests are numbered once per repository even when two runs publish at once, and a BYOK run's
sealed key and fee are stored with it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient

from critique_local import billing
from critique_local.appkeys import DB, SERVICES
from critique_local.clock import now_iso
from critique_local.repos.workrepo import RunRepo
from critique_local.runs.durable import SessionStates
from critique_local.runs.states import Phase, RunStatus, SessionEnd
from critique_local.store import events as events_store
from critique_local.store import pulls
from critique_local.store import runs as store
from critique_local.store import sessions as sessions_store
from critique_local.store.keys import principal_for_key
from tests.conftest import SAMPLE_FILES
from tests.helpers import make_repo
from tests.inprocess import app_client, new_key, settings_for

pytestmark = pytest.mark.asyncio(loop_scope="module")
RUNS = "/api/v1/coding-agent/runs"
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
EXPORT = b'{"info": {"id": "ses_kept"}, "messages": [{"info": {"id": "m1"}, "parts": []}]}'


@dataclass
class App:
    client: TestClient
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        resp = await self.client.post(path, json=body, headers=self.headers)
        return resp.status, await resp.json()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[App]:
    base = tmp_path_factory.mktemp("admission")
    make_repo(base / "repos", "acme/web", SAMPLE_FILES)
    async with app_client(settings_for(base, CRITIQUE_LOCAL_BILLING_ORCHESTRATION_CREDITS="0.5")) as client:
        yield App(client, await new_key(client, "alice"))


async def ended_run(app: App, reason: SessionEnd, *, kept: bool) -> str:
    """A run whose one turn completed and whose session then ended with ``reason``, as the
    executor leaves it; with ``kept``, its durable state (tree, transcript) is there to restore."""
    status, body = await app.post(RUNS, {"repository": "acme/web", "prompt": "@say hi"})
    assert status == 201, body
    run_id = str(body["run"]["id"])
    db = app.client.app[DB]
    await store.transition(db, run_id, RunStatus.RUNNING, Phase.AGENT_RUNNING, turn_count=1)
    await store.update_turn(db, run_id, 1, status="completed", summary="hi", tree=EMPTY_TREE)
    await store.transition(db, run_id, RunStatus.IDLE, Phase.AWAITING_FOLLOW_UP, summary="hi")
    await store.transition(db, run_id, RunStatus.COMPLETED, Phase.FINISHED, session_end_reason=reason.value,
                           finished_at=now_iso())
    if kept:
        services = app.client.app[SERVICES]
        await sessions_store.set_turn_messages(db, run_id, 1, 1)
        assert await SessionStates(services).save(run_id, EXPORT)
        RunRepo(services.settings.server.data_dir / "runs", run_id).path.mkdir(parents=True)
    return run_id


async def statuses(app: App, run_id: str) -> list[str]:
    rows = await events_store.after(app.client.app[DB], run_id, 0)
    return [str(r.data["status"]) for r in rows if r.kind == "run.status"]


async def test_a_kept_session_is_reopened_on_the_same_run_and_announced_once(app: App) -> None:
    run_id = await ended_run(app, SessionEnd.SANDBOX_LOST, kept=True)
    before = await statuses(app, run_id)
    status, body = await app.post(f"{RUNS}/{run_id}/messages", {"prompt": "@say again"})
    assert status == 202, body
    assert (body["run"]["id"], body["run"]["status"], body["run"]["turnCount"]) == (run_id, "running", 2)
    assert await statuses(app, run_id) == [*before, "running"]  # one run.status for one change
    run = await store.get_run(app.client.app[DB], run_id)
    assert run is not None and run.chained_to_run_id is None
    queued = await store.queued_turn(app.client.app[DB], run_id)
    assert queued is not None and (queued.index, queued.prompt, queued.status) == (2, "@say again", "queued")


async def test_an_ended_session_without_state_chains_once_through_the_create_path(app: App) -> None:
    old_id = await ended_run(app, SessionEnd.EXPIRED, kept=False)
    before = await statuses(app, old_id)
    status, body = await app.post(f"{RUNS}/{old_id}/messages", {"prompt": "@say again"})
    assert status == 202, body
    new = body["run"]
    assert new["id"] != old_id and new["status"] == "queued" and new["chainedFromRunId"] == old_id
    assert await statuses(app, new["id"]) == ["queued"]
    assert await statuses(app, old_id) == before  # the old run's status did not change
    db = app.client.app[DB]
    old = await store.get_run(db, old_id)
    assert old is not None and old.chained_to_run_id == new["id"]
    chained = await store.get_run(db, new["id"])
    assert chained is not None and chained.chained_from_run_id == old_id
    assert chained.spec.chained_from_run_id == old_id and chained.repository_full_name == "acme/web"
    first = await store.turn(db, new["id"], 1)
    assert first is not None and first.prompt.endswith("@say again") and "> Turn 1: hi" in first.prompt
    status, again = await app.post(f"{RUNS}/{old_id}/messages", {"prompt": "@say once more"})
    assert status == 409 and again["error"]["code"] == "run_terminal", again
    assert new["id"] in again["error"]["message"]


async def test_concurrent_local_pull_requests_get_distinct_numbers(app: App) -> None:
    """Two runs publishing to one local repository at once: numbers 1 and 2 (the number is
    taken in the transaction that stores the pull request)."""
    db = app.client.app[DB]
    run_ids = [await ended_run(app, SessionEnd.EXPIRED, kept=False) for _ in range(3)]

    def new_pull(run_id: str) -> pulls.PullRequestRow:
        return pulls.PullRequestRow(run_id, pulls.LOCAL, "acme/web", 0, f"http://x/{run_id}", f"b-{run_id}",
                                    "main", "0" * 40, "open", True, "t", "b", "", "")

    saved = await asyncio.gather(*(pulls.save(db, new_pull(r)) for r in run_ids[:2]))
    assert sorted(p.number for p in saved) == [1, 2]
    again = await pulls.save(db, saved[0])  # an update keeps its number
    assert again.number == saved[0].number
    assert (await pulls.save(db, new_pull(run_ids[2]))).number == 3
    stored = [await pulls.of_run(db, r) for r in run_ids]
    assert sorted(p.number for p in stored if p is not None) == [1, 2, 3]


async def test_a_byok_run_is_stored_with_its_sealed_key_and_its_fee(app: App) -> None:
    db, box = app.client.app[DB], app.client.app[SERVICES].box
    principal = await principal_for_key(db, app.key)
    assert principal is not None
    await billing.grant(db, principal.user_id, 2.0)
    before = await billing.balance(db, principal.user_id)
    byok = "sk-or-v1-admission-0123456789abcdef"
    status, body = await app.post(RUNS, {"repository": "acme/web", "prompt": "@say hi",
                                         "billing": {"mode": "openrouter", "openRouterApiKey": byok}})
    assert status == 201, body
    run_id = body["run"]["id"]
    sealed = await store.byok_key(db, run_id)
    assert sealed is not None and byok not in sealed and box.open(sealed, run_id) == byok
    assert await billing.balance(db, principal.user_id) == pytest.approx(before - 0.5)
