"""Operator commands on the local database (the server may be running): ``keys``,
``credits``, ``webhooks``, ``secrets``."""

from __future__ import annotations

import sys
from collections.abc import Awaitable
from pathlib import Path

import click

from critique_local.cli.common import config_option, settings_of, with_db
from critique_local.config import Settings
from critique_local.store.db import Database
from critique_local.store.keys import DEFAULT_SCOPES, create_key, list_keys, revoke_key


@click.group()
def keys() -> None:
    """Manage API keys (works on the local database; the server may be running)."""


@keys.command("create")
@config_option
@click.option("--user", "user_name", required=True, help="User name (created if new).")
@click.option("--scopes", default=",".join(DEFAULT_SCOPES), show_default=True, help="Comma-separated scopes.")
def keys_create(config_path: Path | None, user_name: str, scopes: str) -> None:
    """Create a key; the key itself is printed once, as the last line."""
    wanted = tuple(s.strip() for s in scopes.split(",") if s.strip())
    settings = settings_of(config_path)
    try:
        plain, record = with_db(settings, lambda db: create_key(db, user_name, wanted,
                                                                 settings.billing.initial_credits))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"created key {record.id} for user {user_name} with scopes {','.join(record.scopes)}")
    click.echo("store it now; it is not shown again:")
    click.echo(plain)


@keys.command("list")
@config_option
@click.option("--user", "user_name", default=None)
def keys_list(config_path: Path | None, user_name: str | None) -> None:
    """List keys (never the keys themselves)."""
    for k in with_db(settings_of(config_path), lambda db: list_keys(db, user_name)):
        state = f"revoked {k.revoked_at}" if k.revoked_at else "active"
        click.echo(f"{k.id}  {k.user_name}  {k.prefix}...  {','.join(k.scopes)}  {k.created_at}  {state}")


@keys.command("revoke")
@config_option
@click.argument("key_id")
def keys_revoke(config_path: Path | None, key_id: str) -> None:
    """Revoke a key by id."""
    if not with_db(settings_of(config_path), lambda db: revoke_key(db, key_id)):
        raise click.ClickException(f"no active key {key_id}")
    click.echo(f"revoked {key_id}")


@click.group()
def credits() -> None:
    """Credit balances and plans (managed billing)."""


def _user_id(db: Database, name: str, settings: Settings) -> Awaitable[str]:
    from critique_local.store.keys import ensure_user

    return ensure_user(db, name, settings.billing.initial_credits)


@credits.command("grant")
@config_option
@click.option("--user", "user_name", required=True)
@click.argument("amount", type=float)
def credits_grant(config_path: Path | None, user_name: str, amount: float) -> None:
    """Add AMOUNT credits (negative to take some away); prints the new balance."""
    from critique_local import billing

    settings = settings_of(config_path)

    async def go(db: Database) -> float:
        user_id = await _user_id(db, user_name, settings)
        return await billing.grant(db, user_id, amount, "grant" if amount >= 0 else "adjust")

    click.echo(f"{user_name}: balance {with_db(settings, go):.6f} credits")


@credits.command("show")
@config_option
@click.option("--user", "user_name", required=True)
def credits_show(config_path: Path | None, user_name: str) -> None:
    """Balance and plan of a user."""
    from critique_local import billing

    settings = settings_of(config_path)

    async def go(db: Database) -> tuple[float, str]:
        user_id = await _user_id(db, user_name, settings)
        return await billing.balance(db, user_id), await billing.plan_of(db, settings.billing, user_id)

    balance, plan = with_db(settings, go)
    click.echo(f"{user_name}: balance {balance:.6f} credits, plan {plan}")


@credits.command("plan")
@config_option
@click.option("--user", "user_name", required=True)
@click.argument("plan")
def credits_plan(config_path: Path | None, user_name: str, plan: str) -> None:
    """Put a user on PLAN (catalog models name the plans that may use them)."""

    from critique_local.store import ledger

    settings = settings_of(config_path)

    async def go(db: Database) -> None:
        await ledger.set_plan(db, await _user_id(db, user_name, settings), plan)

    with_db(settings, go)
    click.echo(f"{user_name}: plan {plan}")


@click.group()
def webhooks() -> None:
    """Webhook signing secrets (Standard Webhooks)."""


@webhooks.command("secret")
@config_option
@click.option("--user", "user_name", required=True)
def webhooks_secret(config_path: Path | None, user_name: str) -> None:
    """Create (or rotate) a user's signing secret; printed once, as the last line."""
    from critique_local.crypto import SecretBox
    from critique_local.store.keys import ensure_user
    from critique_local.webhooks import user_secret

    settings = settings_of(config_path)

    async def go(db: Database) -> str:
        user_id = await ensure_user(db, user_name)
        secret, _ = await user_secret(db, SecretBox.from_data_dir(settings.server.data_dir), user_id, rotate=True)
        return secret

    secret = with_db(settings, go)
    click.echo(f"new webhook signing secret for {user_name} (verify webhook-signature with it):")
    click.echo(secret)


@click.group()
def secrets() -> None:
    """Per-repository environment secrets for validation commands (encrypted at rest)."""


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


@secrets.command("set")
@config_option
@click.argument("repository")
@click.argument("name")
def secrets_set(config_path: Path | None, repository: str, name: str) -> None:
    """Set NAME for REPOSITORY (owner/name); the value is read from stdin, never from argv."""
    import re

    from critique_local.crypto import SecretBox
    from critique_local.repos.names import repository_name_problem
    from critique_local.store import secrets as store

    if problem := repository_name_problem(repository):
        raise click.BadParameter(problem, param_hint="REPOSITORY")
    if not re.fullmatch(_ENV_NAME, name):
        raise click.BadParameter("must be an environment variable name", param_hint="NAME")
    value = sys.stdin.read().rstrip("\n")
    if not value:
        raise click.UsageError("no value on stdin")
    settings = settings_of(config_path)
    box = SecretBox.from_data_dir(settings.server.data_dir)
    with_db(settings, lambda db: store.put(db, box, repository, name, value))
    click.echo(f"{repository}: {name} set (given to validation commands; redacted from output)")


@secrets.command("list")
@config_option
def secrets_list(config_path: Path | None) -> None:
    """Names only; values are never shown."""
    from critique_local.store import secrets as store

    for repo, name, created in with_db(settings_of(config_path), store.names):
        click.echo(f"{repo}\t{name}\t{created}")


@secrets.command("delete")
@config_option
@click.argument("repository")
@click.argument("name")
def secrets_delete(config_path: Path | None, repository: str, name: str) -> None:
    from critique_local.store import secrets as store

    if not with_db(settings_of(config_path), lambda db: store.delete(db, repository, name)):
        raise click.ClickException(f"{repository} has no secret {name}")
    click.echo(f"{repository}: {name} deleted")
