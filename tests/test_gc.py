"""`critique-local sandbox gc` on the data dir (the Docker side is in tests/e2e/test_operating.py):
work repositories go only when their run ended and its session can no longer be restored;
a server is seen running through the data dir's own lock even when gc (or doctor, or a second
server) is given another ``server.host_state_dir`` than the server's, so nothing of a running
server is removed and no second server starts on its data dir."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from critique_local.app import claim_instance, instance_id
from critique_local.config import Settings
from critique_local.datalock import DataDirLock, served
from critique_local.hoststate import InstanceInUse
from critique_local.ops import doctor, gc
from critique_local.runs.spec import RunSpec
from critique_local.store import runs as runs_store
from critique_local.store.db import Database
from critique_local.store.keys import ensure_user
from critique_local.tokens import new_id
from tests.inprocess import settings_for

# run id -> (status, session_end_reason, durable state kept)
RUNS = {"run_live": ("idle", None, True), "run_restorable": ("completed", "expired", True),
        "run_ended": ("completed", "end_session", False), "run_failed": ("failed", "finished", False)}


def settings(base: Path, host_state: str = "host") -> Settings:
    return settings_for(base, CRITIQUE_LOCAL_SANDBOX_BACKEND="e2b",  # no Docker side: the data dir only
                        CRITIQUE_LOCAL_SERVER_HOST_STATE_DIR=str(base / host_state))


async def _fill(s: Settings) -> None:
    db = await Database.open(s.db_path)
    try:
        user = await ensure_user(db, "alice")
        repo = await runs_store.ensure_repository(db, new_id("repo"), "acme/web", "local")
        for run_id, (status, reason, _) in RUNS.items():
            await runs_store.create_run(db, runs_store.NewRun(id=run_id, user_id=user, repository_id=repo,
                                                              spec=RunSpec(), model_id="m", task_kind="code",
                                                              intent="other", base_ref=None, prompt="p"), None)
            await runs_store.update_run(db, run_id, status=status, session_end_reason=reason)
    finally:
        await db.close()
    data = s.server.data_dir
    for run_id, (_, _, kept) in RUNS.items():
        (data / "runs" / f"{run_id}.git").mkdir(parents=True)
        if kept:
            (data / "sessions").mkdir(exist_ok=True)
            (data / "sessions" / f"{run_id}.state").write_text("sealed")
    (data / "runs" / "run_unknown.git").mkdir()  # no such run in the database
    (data / "mirrors" / "acme" / "web.git.partial").mkdir(parents=True)  # an interrupted clone


def _targets(actions: list[gc.Action]) -> set[str]:
    return {Path(a.target).name for a in actions}


def test_a_stopped_servers_leftovers_go_but_restorable_sessions_stay(tmp_path: Path) -> None:
    s = settings(tmp_path)
    instance_id(s)
    asyncio.run(_fill(s))
    dry = gc.collect(s)
    assert _targets(dry) == {"run_ended.git", "run_failed.git", "run_unknown.git", "web.git.partial"}
    assert all((s.server.data_dir / "runs" / f"{r}.git").exists() for r in RUNS)  # a dry run removes nothing
    applied = gc.collect(s, apply=True)
    assert _targets(applied) == _targets(dry)
    left = {p.name for p in (s.server.data_dir / "runs").iterdir()}
    assert left == {"run_live.git", "run_restorable.git"}  # a message may still restore (or fork) it
    assert not (s.server.data_dir / "mirrors" / "acme" / "web.git.partial").exists()
    assert gc.collect(s) == []


def test_a_server_registered_elsewhere_is_still_seen_running(tmp_path: Path) -> None:
    server_side = settings(tmp_path, "host-of-the-server")
    instance_id(server_side)
    asyncio.run(_fill(server_side))
    claim = claim_instance(server_side, wait_s=0)  # as `serve` does
    try:
        assert served(tmp_path / "data")
        other = settings(tmp_path, "another-host-state-dir")  # gc with another configuration
        actions = gc.collect(other, apply=True)
        # only what belongs to ended runs: no partial clone, no unknown run's repository
        assert _targets(actions) == {"run_ended.git", "run_failed.git"}
        assert (tmp_path / "data" / "runs" / "run_unknown.git").exists()
        assert (tmp_path / "data" / "mirrors" / "acme" / "web.git.partial").exists()
        (finding,) = doctor.check_instance(other)
        assert finding.level == "warn" and "holds no claim" in finding.detail
        with pytest.raises(InstanceInUse, match=r"server\.lock"):  # a second server on the same data dir
            claim_instance(other, wait_s=0)
        assert DataDirLock.take(tmp_path / "data") is None  # restore and gc cannot take it either
    finally:
        claim.release()
    assert not served(tmp_path / "data")  # released with the claim
    second = claim_instance(settings(tmp_path, "another-host-state-dir"), wait_s=0)
    second.release()
