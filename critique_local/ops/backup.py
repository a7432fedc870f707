"""Backups of a data dir, made while the server serves, and restoring one onto a stopped server.

A backup is a directory::

    critique.db     a consistent copy of the database (SQLite's online backup API: one read
                    transaction, so every committed write up to that moment and nothing after;
                    the server keeps writing meanwhile), in rollback-journal mode, one file
    secret.key      the key that opens sealed values (webhook signing secrets, repository
                    secrets, BYOK keys); left out with ``include_key=False``: then keep the
                    data dir's key elsewhere, or sealed values cannot be opened after a restore
    manifest.json   format, schema version, SHA-256 of each file

Caches (mirrors, packed checkouts), run work repositories, the instance id and the remembered
gateway port are not backed up: a restored server rebuilds the caches, gets an instance id of
its own, and ends sessions whose sandboxes are gone (``sandbox_lost``). Every function blocks:
call it from a thread (``asyncio.to_thread``) inside a server.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from critique_local import __version__
from critique_local.store import readonly
from critique_local.store.migrations import MIGRATIONS, SchemaTooNew

DB_NAME = "critique.db"
KEY_NAME = "secret.key"
MANIFEST = "manifest.json"
FORMAT = 1


class BackupError(Exception):
    """The backup cannot be made or restored; the message says why and what to do."""


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    includes_key: bool
    files: dict[str, str]  # name -> sha256 hex
    created_at: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_private(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new file ``dst`` readable by its owner only (0600)."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(src.read_bytes())
        fh.flush()
        os.fsync(fh.fileno())


def _check_db(path: Path) -> int:
    """The database's schema version, after ``PRAGMA integrity_check`` says ok."""
    result, version = readonly.integrity(path)
    if result != "ok":
        raise BackupError(f"{path}: integrity check failed: {result}")
    return version


def backup(data_dir: Path, dest: Path, include_key: bool = True) -> Manifest:
    """Write a backup of ``data_dir`` into the new (or empty) directory ``dest`` (mode 0700).
    Raises BackupError when there is no database, ``dest`` is not empty, or the copy fails its
    integrity check."""
    source = data_dir / DB_NAME
    if not source.exists():
        raise BackupError(f"no database at {source}: is server.data_dir right (pass the server's --config)?")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} exists and is not an empty directory: back up into a new one")
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = dest / f".{DB_NAME}.partial"
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))  # private from the start
    readonly.copy_to(source, partial)  # one read transaction: a consistent snapshot, in one file
    version = _check_db(partial)
    _fsync(partial)
    partial.replace(dest / DB_NAME)
    files = {DB_NAME: _sha256(dest / DB_NAME)}
    key = data_dir / KEY_NAME
    if include_key and key.exists():
        _copy_private(key, dest / KEY_NAME)
        files[KEY_NAME] = _sha256(dest / KEY_NAME)
    manifest = Manifest(version, KEY_NAME in files, files, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    text = json.dumps({"format": FORMAT, "critiqueLocalVersion": __version__, "createdAt": manifest.created_at,
                       "schemaVersion": version, "includesSecretKey": manifest.includes_key, "sha256": files}, indent=2)
    with os.fdopen(os.open(dest / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        fh.write(text + "\n")  # private like the rest
    return manifest


def read_manifest(src: Path) -> Manifest:
    """The backup's manifest, after checking every file's SHA-256. Raises BackupError."""
    try:
        raw: dict[str, Any] = json.loads((src / MANIFEST).read_text())
        files = {str(k): str(v) for k, v in raw["sha256"].items()}
        manifest = Manifest(int(raw["schemaVersion"]), bool(raw["includesSecretKey"]), files, str(raw["createdAt"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BackupError(f"{src} is not a critique-local backup ({MANIFEST}: {exc})") from exc
    if raw.get("format") != FORMAT or DB_NAME not in files:
        raise BackupError(f"{src}: unknown backup format {raw.get('format')!r}")
    for name, digest in files.items():
        if not (src / name).is_file() or _sha256(src / name) != digest:
            raise BackupError(f"{src / name} is missing or does not match the manifest (damaged backup)")
    return manifest


def restore(src: Path, data_dir: Path, force: bool = False) -> Manifest:
    """Put the backup in ``src`` into ``data_dir``. The caller holds the data dir's instance
    claim (no server may run on it). Refuses to replace an existing database or a different
    secret key unless ``force`` (then the old files are kept beside, suffixed
    ``.replaced-<unix time>``). Raises BackupError, or SchemaTooNew for a backup made by a
    newer critique-local."""
    manifest = read_manifest(src)
    if manifest.schema_version > len(MIGRATIONS):
        raise SchemaTooNew(f"the backup is at schema version {manifest.schema_version}, newer than this "
                           f"critique-local ({len(MIGRATIONS)}): restore it with that version or newer")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db, key = data_dir / DB_NAME, data_dir / KEY_NAME
    key_differs = manifest.includes_key and key.exists() and key.read_bytes() != (src / KEY_NAME).read_bytes()
    if not force and (db.exists() or key_differs):
        what = "a database" if db.exists() else "a different secret.key"
        raise BackupError(f"{data_dir} already has {what}: restore into a fresh data dir, or pass --force to "
                          "replace it (the old files are kept beside it)")
    staged = data_dir / f".{DB_NAME}.restoring"
    staged.unlink(missing_ok=True)
    _copy_private(src / DB_NAME, staged)
    _check_db(staged)
    suffix = f".replaced-{int(time.time())}"
    for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):  # a WAL database is all three files
        if (data_dir / name).exists():
            (data_dir / name).replace(data_dir / (name + suffix))
    staged.replace(db)
    if manifest.includes_key:
        if key_differs:
            key.replace(data_dir / (KEY_NAME + suffix))
        if not key.exists():
            _copy_private(src / KEY_NAME, key)
    return manifest
