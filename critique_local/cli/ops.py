"""Operator commands: ``doctor``, ``sandbox gc``, ``backup``, ``restore``, ``migrate`` and
``audit`` (added to the main group in cli/__init__.py; the work is in ops/)."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from critique_local.cli.common import config_option, settings_of


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per finding.")
def doctor(config_path: Path | None, as_json: bool) -> None:
    """Check what the server needs; print each problem with its fix. Exit code 1 when anything
    fails (warnings alone: 0)."""
    from critique_local.ops.doctor import run_checks

    findings = run_checks(settings_of(config_path))
    for f in findings:
        if as_json:
            click.echo(json.dumps(asdict(f)))
            continue
        click.echo(f"{f.level.upper():4}  {f.check}: {f.detail}")
        if f.fix:
            click.echo(f"      fix: {f.fix}")
    if any(f.level == "fail" for f in findings):
        sys.exit(1)


@click.group()
def sandbox() -> None:
    """Sandboxes of this instance."""


@sandbox.command("gc")
@config_option
@click.option("--apply", is_flag=True, help="Remove them (default: only list what would go).")
def sandbox_gc(config_path: Path | None, apply: bool) -> None:
    """Remove sandboxes, firewall rules, networks and leftovers that no live run of this
    instance owns. A dry run unless --apply."""
    import docker.errors

    from critique_local.ops.gc import collect

    try:
        actions = collect(settings_of(config_path), apply=apply)
    except docker.errors.DockerException as exc:
        raise click.ClickException(f"the Docker engine is not reachable: {exc}") from exc
    verb = "removed" if apply else "would remove"
    for a in actions:
        click.echo(f"{verb} {a.kind} {a.target}: {a.why}")
    click.echo(f"{len(actions)} item(s) {verb}" + ("" if apply or not actions else "; run again with --apply"))


@sandbox.command("ls")
@config_option
def sandbox_ls(config_path: Path | None) -> None:
    """This instance's sandboxes and whose they are: the run our store binds each to (a pooled
    sandbox a run took still carries the label critique.run=pool-...), or "pooled"."""
    import docker.errors

    from critique_local.ops.gc import listing

    try:
        rows = listing(settings_of(config_path))
    except docker.errors.DockerException as exc:
        raise click.ClickException(f"the Docker engine is not reachable: {exc}") from exc
    for r in rows:
        owner = f"run {r.run} ({r.status or 'unknown'})" if r.run else "pooled"
        click.echo(f"{r.short_id}  {r.name}  {'running' if r.running else 'stopped'}  {owner}")


@click.command()
@config_option
@click.option("--no-key", is_flag=True, help="Leave secret.key out (keep it safe elsewhere).")
@click.argument("path", type=click.Path(path_type=Path, file_okay=False))
def backup(config_path: Path | None, no_key: bool, path: Path) -> None:
    """Back up the database (consistent, while the server runs) and secret.key into the new
    directory PATH."""
    from critique_local.ops.backup import BackupError
    from critique_local.ops.backup import backup as make_backup

    settings = settings_of(config_path)
    try:
        manifest = make_backup(settings.server.data_dir, path.absolute(), include_key=not no_key)
    except BackupError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"backed up {settings.server.data_dir} (schema {manifest.schema_version}) to {path}")
    click.echo("it contains secret.key: keep it as private as the data dir" if manifest.includes_key else
               "secret.key left out: sealed secrets open only with the data dir's key")


@click.command()
@config_option
@click.option("--force", is_flag=True, help="Replace an existing database (kept beside it).")
@click.argument("path", type=click.Path(path_type=Path, file_okay=False, exists=True))
def restore(config_path: Path | None, force: bool, path: Path) -> None:
    """Restore the backup in PATH into server.data_dir; the server must be stopped."""
    from critique_local.app import claim_instance
    from critique_local.hoststate import InstanceInUse
    from critique_local.ops.backup import BackupError
    from critique_local.ops.backup import restore as do_restore
    from critique_local.store.migrations import SchemaTooNew

    settings = settings_of(config_path)
    try:
        claim = claim_instance(settings, wait_s=0)  # held while restoring: no server starts meanwhile
    except InstanceInUse as exc:
        raise click.ClickException(f"stop the server first: {exc}") from exc
    try:
        manifest = do_restore(path.absolute(), settings.server.data_dir, force=force)
    except (BackupError, SchemaTooNew) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        claim.release()
    click.echo(f"restored {path} (schema {manifest.schema_version}, made {manifest.created_at}) into "
               f"{settings.server.data_dir}; the next start migrates it if needed")
    if not manifest.includes_key:
        click.echo(f"the backup has no secret.key: put the original at {settings.server.data_dir / 'secret.key'} "
                   "(mode 0600) or sealed secrets will not open", err=True)


@click.command()
@config_option
@click.option("--check", is_flag=True, help="Only say what would run; exit code 1 when something would.")
def migrate(config_path: Path | None, check: bool) -> None:
    """Bring the database schema up to date (the server also does this at start)."""
    from critique_local.ops.migrate import plan
    from critique_local.store.db import Database
    from critique_local.store.migrations import SchemaTooNew

    settings = settings_of(config_path)
    try:
        p = plan(settings.db_path)
    except SchemaTooNew as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{settings.db_path}: schema {p.current}, this release {p.target}")
    if not p.steps:
        click.echo("up to date")
        return
    for number, statements in p.steps:
        click.echo(f"  {number}: {'; '.join(statements)}")
    if check:
        sys.exit(1)

    async def apply() -> None:
        db = await Database.open(settings.db_path)
        await db.close()

    asyncio.run(apply())
    click.echo(f"migrated to schema {p.target}")


@click.command("audit")
@config_option
@click.option("--run", "run_id", default=None, help="Only this run.")
@click.option("--user", default=None, help="Only this user (name).")
@click.option("--since", default=None, help="ISO 8601 time, e.g. 2026-01-31 or 2026-01-31T12:00:00Z.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per entry.")
def audit_cmd(config_path: Path | None, run_id: str | None, user: str | None, since: str | None, limit: int,
              as_json: bool) -> None:
    """Who created, forked, followed up, ended, cancelled and published which run (newest first)."""
    from critique_local.store import audit
    from critique_local.store.db import Database
    from critique_local.store.migrations import SchemaTooNew

    settings = settings_of(config_path)
    if not settings.db_path.exists():  # never create one here
        raise click.ClickException(f"no database at {settings.db_path}: pass the server's --config")

    async def read() -> list[audit.AuditEntry]:
        db = await Database.open(settings.db_path)
        try:
            return await audit.entries(db, run_id=run_id, user=user, since=since, limit=limit)
        finally:
            await db.close()

    try:
        found = asyncio.run(read())
    except SchemaTooNew as exc:
        raise click.ClickException(str(exc)) from exc
    for e in found:
        if as_json:
            click.echo(json.dumps(asdict(e)))
        else:
            who = f"{e.user or '-'} {e.key_prefix + '...' if e.key_prefix else '(server)'}"
            click.echo(f"{e.at}  {who}  {e.action}  {e.run_id or '-'}  {e.outcome}"
                       + (f"  {json.dumps(e.detail)}" if e.detail else ""))

