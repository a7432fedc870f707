"""`critique-local backup` while a writer commits events and run updates as fast as it can,
then `critique-local restore` into a fresh data dir: the copy passes PRAGMA integrity_check,
holds every write acknowledged before the backup began, is one consistent moment (no event
gaps), and its sealed secrets open. Restore refuses a claimed instance and an existing
database."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

from critique_local.crypto import SecretBox
from critique_local.hoststate import HostState
from critique_local.store import secrets as secrets_store
from critique_local.store.db import Database

ROOT = Path(__file__).resolve().parent.parent


def cli(data_dir: Path, host_state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRITIQUE_LOCAL_SERVER_DATA_DIR": str(data_dir),
           "CRITIQUE_LOCAL_SERVER_HOST_STATE_DIR": str(host_state)}
    env.pop("CRITIQUE_LOCAL_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "critique_local", *args], cwd=data_dir.parent, env=env,
                          capture_output=True, text=True, timeout=300)


async def _seal(data_dir: Path) -> None:
    db = await Database.open(data_dir / "critique.db")
    try:
        await secrets_store.put(db, SecretBox.from_data_dir(data_dir), "acme/web", "API_TOKEN", "s3cret-value")
    finally:
        await db.close()


async def _open_sealed(data_dir: Path) -> dict[str, str]:
    db = await Database.open(data_dir / "critique.db")
    try:
        return await secrets_store.env_for(db, SecretBox(( data_dir / "secret.key").read_bytes()), "acme/web")
    finally:
        await db.close()


def test_backup_under_write_load_restores_every_acknowledged_write(tmp_path: Path) -> None:
    src, dst, host_state, copy = tmp_path / "src", tmp_path / "dst", tmp_path / "host", tmp_path / "backup"
    asyncio.run(_seal(src))
    writer = subprocess.Popen([sys.executable, "-m", "tests.durability_writer", str(src / "critique.db")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "ready"
    acks: list[str] = []
    enough = threading.Event()

    def drain() -> None:  # keep reading, so the writer never blocks on a full pipe
        assert writer.stdout is not None
        for line in writer.stdout:
            acks.append(line)
            if len(acks) >= 300:
                enough.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert enough.wait(120), "the writer did not get going"
        before = list(acks)  # acknowledged before the backup began
        made = cli(src, host_state, "backup", str(copy))
        assert made.returncode == 0, made.stderr
        during = len(acks) - len(before)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    assert during > 0, "the writer was not writing while the backup ran"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in copy.iterdir()} == \
        {"critique.db": 0o600, "secret.key": 0o600, "manifest.json": 0o600}

    restored = cli(dst, host_state, "restore", str(copy))
    assert restored.returncode == 0, restored.stderr
    acked: dict[str, int] = {}
    for line in before:
        _, run_id, seq = line.split()
        acked[run_id] = max(acked.get(run_id, 0), int(seq))
    conn = sqlite3.connect(dst / "critique.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for run_id, last in acked.items():
            seqs = [r[0] for r in conn.execute("SELECT seq FROM events WHERE run_id = ? ORDER BY seq", (run_id,))]
            assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= last, run_id
            summary = conn.execute("SELECT summary FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
            assert int(summary.split()[1]) in (len(seqs) - 1, len(seqs))  # one moment: the run row matches
    finally:
        conn.close()
    assert asyncio.run(_open_sealed(dst)) == {"API_TOKEN": "s3cret-value"}

    again = cli(dst, host_state, "restore", str(copy))  # a database is there now
    assert again.returncode == 1 and "already has a database" in again.stderr
    assert cli(dst, host_state, "restore", "--force", str(copy)).returncode == 0
    assert any(p.name.startswith("critique.db.replaced-") for p in dst.iterdir())


def test_restore_refuses_while_a_server_holds_the_instance(tmp_path: Path) -> None:
    src, busy, host_state = tmp_path / "src", tmp_path / "busy", tmp_path / "host"
    asyncio.run(_seal(src))
    assert cli(src, host_state, "backup", str(tmp_path / "copy")).returncode == 0
    busy.mkdir()
    (busy / "instance_id").write_text("00112233aabbccdd")
    claim = HostState(host_state).claim("00112233aabbccdd", busy, wait_s=0)  # as a running server does
    try:
        refused = cli(busy, host_state, "restore", str(tmp_path / "copy"))
    finally:
        claim.release()
    assert refused.returncode == 1 and "stop the server first" in refused.stderr
    assert not (busy / "critique.db").exists()
    damaged = tmp_path / "copy" / "critique.db"
    damaged.write_bytes(damaged.read_bytes()[:-10] + b"0123456789")
    bad = cli(busy, host_state, "restore", str(tmp_path / "copy"))
    assert bad.returncode == 1 and "does not match the manifest" in bad.stderr
