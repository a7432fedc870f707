"""``critique-local envs list|show|rebuild|prune``: the kept environments of this data dir.

They work on the local database (like ``keys``) and the sandbox backend's images or snapshots,
so they run where the server runs, with the same ``--config``; the server need not be running.
``rebuild`` marks an environment so that the next run needing it builds a new one (setup needs
the server: its secrets, egress proxy and sandboxes).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
from pathlib import Path
from typing import Any

import click

from critique_local.cli.common import config_option, settings_of, with_db
from critique_local.config import Settings
from critique_local.envs import evict
from critique_local.store import environments as store
from critique_local.store.db import Database
from critique_local.store.environments import EnvironmentRow


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1_000_000:.1f} MB"


async def _one(db: Database, prefix: str) -> EnvironmentRow:
    found = await store.find(db, prefix)
    if len(found) != 1:
        raise click.ClickException(f"{len(found)} environments match {prefix!r}; give more of the key")
    return found[0]


async def _delete(settings: Settings, row: EnvironmentRow) -> bool:
    """Remove the backend's image or snapshot; True when it is gone (False: still in use)."""
    if row.backend == "docker":
        import docker

        from critique_local.sandboxes import dockerenv

        client = docker.from_env(timeout=120)
        try:
            return await asyncio.to_thread(dockerenv.remove, client, row.ref)
        finally:
            client.close()
    sdk: Any = importlib.import_module("e2b")
    opts = {"api_key": settings.e2b.api_key or os.environ.get("E2B_API_KEY") or None,
            **({"domain": settings.e2b.domain} if settings.e2b.domain else {})}
    await sdk.AsyncSandbox.delete_snapshot(row.ref, **opts)
    return True


@click.group()
def envs() -> None:
    """Kept environments (what .critique/setup.sh produced): list, show, rebuild, prune."""


@envs.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def envs_list(config_path: Path | None, as_json: bool) -> None:
    """Environments, most recently used first: key, repository, size, created, last used, build time."""
    for row in with_db(settings_of(config_path), store.all_of):
        if as_json:
            click.echo(json.dumps(row.view()))
        else:
            click.echo(f"{row.key[:16]}  {row.repository:<30} {_size(row.size_bytes):>10}  created {row.created_at}  "
                       f"used {row.last_used_at}  build {row.build_ms / 1000:.1f} s{'  (rebuild)' if row.stale else ''}")


@envs.command("show")
@config_option
@click.argument("key")
def envs_show(config_path: Path | None, key: str) -> None:
    """One environment (KEY: its key or the first characters of it), as JSON."""
    click.echo(json.dumps(with_db(settings_of(config_path), lambda db: _one(db, key)).view(), indent=2))


@envs.command("rebuild")
@config_option
@click.argument("key")
def envs_rebuild(config_path: Path | None, key: str) -> None:
    """Mark an environment so that the next run needing it runs setup again."""
    async def mark(db: Database) -> EnvironmentRow:
        row = await _one(db, key)
        await store.mark_stale(db, row.key)
        return row

    click.echo(f"{with_db(settings_of(config_path), mark).key[:16]}: the next run needing it builds it again")


@envs.command("prune")
@config_option
@click.option("--all", "everything", is_flag=True, help="Remove every environment.")
def envs_prune(config_path: Path | None, everything: bool) -> None:
    """Remove environments that a newer one of the same repository replaced (unused since it
    was built), those unused for environments.max_unused_s, and the least recently used beyond
    environments.max_total_mb."""
    settings = settings_of(config_path)

    async def prune(db: Database) -> list[tuple[EnvironmentRow, bool]]:
        rows = await store.all_of(db)
        chosen = rows if everything else evict.choose(
            rows, settings.environments.max_unused_s, settings.environments.max_total_mb * 1_000_000, True)
        done = []
        for row in chosen:
            gone = await _delete(settings, row)
            if gone:
                await store.delete(db, row.key)
            done.append((row, gone))
        return done

    for row, gone in with_db(settings, prune):
        click.echo(f"{row.key[:16]}  {row.repository}: {'removed' if gone else 'in use, kept'}")
