"""Forking a run at a turn: a new run (own id, ``forkedFrom``) that starts from turn N's tree and
the agent's transcript as it was at the end of turn N (``runs/durable.py``).

The fork is made from the source's durable state when it is asked for: the source's repository
(its git objects, the trees of every turn) is copied, turns 1..N are copied with their
summaries, stats and trees, and the transcript is cut after the messages turn N ended with. Its
first job then restores that state into a new sandbox like any restore (``runs/restore.py``):
with a prompt that turn runs; without one the fork waits ``idle`` with turn N's results. The
source run is not touched. Forks do not publish (the source's branch is the source's); they
cannot be made of runs with secrets of their own (a BYOK key, MCP server headers).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from typing import Any

from critique_local.clock import now, parse_iso
from critique_local.errors import Conflict, ErrorCode, IdempotencyKeyReused, InvalidRequest, TurnInProgress
from critique_local.repos.workrepo import RunRepo
from critique_local.runs import durable
from critique_local.runs.collect import path_text
from critique_local.runs.create import body_hash
from critique_local.runs.provision import Job
from critique_local.runs.states import Phase, RunStatus
from critique_local.runs.turn import transition
from critique_local.runs.turnstate import expiry
from critique_local.services import Services
from critique_local.store import runs as store
from critique_local.store import sessions as sessions_store
from critique_local.store.runs import RunRow
from critique_local.tokens import new_id


@dataclasses.dataclass(frozen=True)
class ForkOrder:
    turn: int
    prompt: str | None = None
    title: str | None = None


async def create(s: Services, source: RunRow, req: ForkOrder, raw: Any,
                 idempotency_key: str | None) -> tuple[RunRow, bool]:
    """Make the fork of ``source`` at ``req.turn``, queued; (run, created). ``raw``: the request
    body as parsed JSON (its hash pins an Idempotency-Key to one body). Raises 422
    (``invalid_request``: no such turn; ``unsupported``: the source has secrets of its own), 409
    (the turn is still running, or its state was not kept), 422 ``idempotency_key_reused``."""
    if not 1 <= req.turn <= source.turn_count:
        raise InvalidRequest(f"turn must be between 1 and {source.turn_count}", field="turn")
    if source.spec.byok or any(m.header_names for m in source.spec.mcp_servers.values()):
        raise InvalidRequest("runs with billing.mode openrouter or mcpServers headers cannot be forked",
                             field="turn", code=ErrorCode.UNSUPPORTED)
    turn = await store.turn(s.db, source.id, req.turn)
    if turn is None or turn.status in ("queued", "running"):
        raise TurnInProgress(f"turn {req.turn} has not finished")
    states = durable.SessionStates(s)
    point = await sessions_store.restore_point(s.db, source.id, up_to=req.turn)
    state = await states.load(source.id)
    src_repo = RunRepo(s.settings.server.data_dir / "runs", source.id)
    if point is None or point[0] != req.turn or state is None or not src_repo.path.exists():
        raise Conflict(f"the state of turn {req.turn} was not kept (or was removed with the run's session); "
                       "it cannot be forked")
    digest = body_hash(raw)
    spec = dataclasses.replace(source.spec, title=req.title or source.spec.title, publish=None,
                               chained_from_run_id=None)
    new = store.NewRun(id=new_id("run"), user_id=source.user_id, repository_id=source.repository_id, spec=spec,
                       model_id=source.model_id, task_kind=source.task_kind, intent=source.intent,
                       base_ref=source.base_ref, prompt=req.prompt or "")
    run_id, created, first_hash = await sessions_store.create_fork(
        s.db, new, source, req.turn, req.prompt, (idempotency_key, digest) if idempotency_key else None)
    if not created and first_hash != digest:
        raise IdempotencyKeyReused("Idempotency-Key was already used with a different body", field="Idempotency-Key")
    if created:
        dst = RunRepo(s.settings.server.data_dir / "runs", run_id).path
        await asyncio.to_thread(shutil.copytree, src_repo.path, dst, symlinks=True)
        await states.save(run_id, s.harness.transcript_prefix(state, point[2]))
    run = await store.get_run(s.db, run_id)
    assert run is not None
    return run, created


async def settle(s: Services, job: Job) -> None:
    """A fork without a prompt, restored: it waits idle with its last turn's results."""
    run = job.run
    assert run.base_commit is not None and job.sandbox is not None
    last = await store.turn(s.db, run.id, run.turn_count)
    assert last is not None and last.tree is not None
    repo = RunRepo(s.settings.server.data_dir / "runs", run.id)
    base_tree = await repo.tree_of(run.base_commit)
    total = await repo.numstat(base_tree, last.tree)
    patch = await repo.patch(base_tree, last.tree, s.settings.limits.max_patch_bytes) if total.paths else b""
    patch, leaked = s.redactor.binary(patch, run.id)
    expires = expiry(s, run)
    await s.backend.extend(job.sandbox.id, max(60.0, (parse_iso(expires) - now()).total_seconds() + 60))
    await transition(s, run, RunStatus.IDLE, Phase.AWAITING_FOLLOW_UP, summary=last.summary,
                     changed_paths=json.dumps([path_text(p) for p in total.paths]),
                     diff_stats=json.dumps(total.as_stats()), patch=patch or None, patch_redactions=leaked,
                     session_expires_at=expires)
