"""The ``critique-local`` command: serve, keys (admin, local DB), runs (HTTP client)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
from httpx_sse import connect_sse

from critique_local.config import SCALAR_SECTIONS, ConfigError, Settings, load_settings
from critique_local.envs import cli as envs_cli
from critique_local.hoststate import InstanceInUse
from critique_local.services import Services
from critique_local.store.db import Database
from critique_local.store.keys import DEFAULT_SCOPES, create_key, list_keys, revoke_key

T = TypeVar("T")
config_option = click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
                             default=None, envvar="CRITIQUE_LOCAL_CONFIG", help="TOML config file.")


def _config_file(config_path: Path | None) -> Path | None:
    """``--config``/``CRITIQUE_LOCAL_CONFIG``, else ``./critique-local.toml`` when it exists."""
    if config_path is None and Path("critique-local.toml").exists():
        config_path = Path("critique-local.toml")
    return config_path.absolute() if config_path is not None else None


def _settings(config_path: Path | None) -> Settings:
    try:
        return load_settings(_config_file(config_path))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _with_db(settings: Settings, fn: Callable[[Database], Awaitable[T]]) -> T:
    if not settings.db_path.exists():  # e.g. run from another directory than the server
        click.echo(f"note: no database at {settings.db_path} yet; creating it. A server started elsewhere uses "
                   "its own (server.data_dir is relative to its config file, or to its working directory "
                   "without one): run this where the server runs, or pass the same --config.", err=True)

    async def go() -> T:
        db = await Database.open(settings.db_path)
        try:
            return await fn(db)
        finally:
            await db.close()

    return asyncio.run(go())


class _Main(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except httpx.TransportError as exc:  # one line, not a traceback, when the server is not there
            try:
                url = str(exc.request.url)
            except RuntimeError:  # no request attached
                url = "the server"
            raise click.ClickException(f"cannot reach {url}: {exc.__class__.__name__}: {exc} "
                                       "(is the server running? pass --url or CRITIQUE_LOCAL_URL)") from exc


@click.group(cls=_Main)
def main() -> None:
    """critique-local: a self-hosted Coding Agent API."""


@main.command()
@config_option
@click.option("--host", default=None, help="Override server.host.")
@click.option("--port", type=int, default=None, help="Override server.port.")
def serve(config_path: Path | None, host: str | None, port: int | None) -> None:
    """Start the API server."""
    from critique_local.app import serve as run_server

    config_file = _config_file(config_path)
    settings = _settings(config_file)
    if host is not None:
        settings.server.host = host
    if port is not None:
        settings.server.port = port
    logging.basicConfig(level=settings.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("critique_local").info(
        "configuration: %s", config_file or f"no file (defaults and CRITIQUE_LOCAL_* variables, relative paths "
                                            f"from {Path.cwd()})")

    def ready(services: Services) -> None:
        url = services.public_url
        click.echo(f"critique-local listening on {url} (sandbox backend: {services.backend.name})")
        click.echo(json.dumps({"event": "ready", "url": url, "gateway": services.gateway_url}), err=True)

    try:
        asyncio.run(run_server(settings, ready))
    except KeyboardInterrupt:
        pass
    except InstanceInUse as exc:
        raise click.ClickException(str(exc)) from exc


@main.group("config")
def config_group() -> None:
    """Inspect the configuration the server loads (file, defaults, CRITIQUE_LOCAL_* variables)."""


@config_group.command("get")
@config_option
@click.argument("name")
def config_get(config_path: Path | None, name: str) -> None:
    """Print one setting NAME (section.key, e.g. git.local_root) as the server loads it; path
    settings are absolute. Lists and tables are printed as JSON."""
    section, _, key = name.partition(".")
    settings = _settings(config_path)
    part = getattr(settings, section, None) if section in SCALAR_SECTIONS else None
    if part is None or key not in type(part).model_fields:
        raise click.ClickException(f"unknown setting {name!r} (section.key, e.g. git.local_root)")
    value = getattr(part, key)
    click.echo(json.dumps(value) if isinstance(value, (list, dict)) else str(value))


@main.group()
def keys() -> None:
    """Manage API keys (works on the local database; the server may be running)."""


@keys.command("create")
@config_option
@click.option("--user", "user_name", required=True, help="User name (created if new).")
@click.option("--scopes", default=",".join(DEFAULT_SCOPES), show_default=True, help="Comma-separated scopes.")
def keys_create(config_path: Path | None, user_name: str, scopes: str) -> None:
    """Create a key; the key itself is printed once, as the last line."""
    wanted = tuple(s.strip() for s in scopes.split(",") if s.strip())
    settings = _settings(config_path)
    try:
        plain, record = _with_db(settings, lambda db: create_key(db, user_name, wanted,
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
    for k in _with_db(_settings(config_path), lambda db: list_keys(db, user_name)):
        state = f"revoked {k.revoked_at}" if k.revoked_at else "active"
        click.echo(f"{k.id}  {k.user_name}  {k.prefix}...  {','.join(k.scopes)}  {k.created_at}  {state}")


@keys.command("revoke")
@config_option
@click.argument("key_id")
def keys_revoke(config_path: Path | None, key_id: str) -> None:
    """Revoke a key by id."""
    if not _with_db(_settings(config_path), lambda db: revoke_key(db, key_id)):
        raise click.ClickException(f"no active key {key_id}")
    click.echo(f"revoked {key_id}")


@main.group()
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

    settings = _settings(config_path)

    async def go(db: Database) -> float:
        user_id = await _user_id(db, user_name, settings)
        return await billing.grant(db, user_id, amount, "grant" if amount >= 0 else "adjust")

    click.echo(f"{user_name}: balance {_with_db(settings, go):.6f} credits")


@credits.command("show")
@config_option
@click.option("--user", "user_name", required=True)
def credits_show(config_path: Path | None, user_name: str) -> None:
    """Balance and plan of a user."""
    from critique_local import billing

    settings = _settings(config_path)

    async def go(db: Database) -> tuple[float, str]:
        user_id = await _user_id(db, user_name, settings)
        return await billing.balance(db, user_id), await billing.plan_of(db, settings.billing, user_id)

    balance, plan = _with_db(settings, go)
    click.echo(f"{user_name}: balance {balance:.6f} credits, plan {plan}")


@credits.command("plan")
@config_option
@click.option("--user", "user_name", required=True)
@click.argument("plan")
def credits_plan(config_path: Path | None, user_name: str, plan: str) -> None:
    """Put a user on PLAN (catalog models name the plans that may use them)."""

    settings = _settings(config_path)

    async def go(db: Database) -> None:
        await db.write("UPDATE users SET plan = ? WHERE id = ?", (plan, await _user_id(db, user_name, settings)))

    _with_db(settings, go)
    click.echo(f"{user_name}: plan {plan}")


@main.group()
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

    settings = _settings(config_path)

    async def go(db: Database) -> str:
        user_id = await ensure_user(db, user_name)
        secret, _ = await user_secret(db, SecretBox.from_data_dir(settings.server.data_dir), user_id, rotate=True)
        return secret

    secret = _with_db(settings, go)
    click.echo(f"new webhook signing secret for {user_name} (verify webhook-signature with it):")
    click.echo(secret)


@main.group()
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
    settings = _settings(config_path)
    box = SecretBox.from_data_dir(settings.server.data_dir)
    _with_db(settings, lambda db: store.put(db, box, repository, name, value))
    click.echo(f"{repository}: {name} set (given to validation commands; redacted from output)")


@secrets.command("list")
@config_option
def secrets_list(config_path: Path | None) -> None:
    """Names only; values are never shown."""
    from critique_local.store import secrets as store

    for repo, name, created in _with_db(_settings(config_path), store.names):
        click.echo(f"{repo}\t{name}\t{created}")


@secrets.command("delete")
@config_option
@click.argument("repository")
@click.argument("name")
def secrets_delete(config_path: Path | None, repository: str, name: str) -> None:
    from critique_local.store import secrets as store

    if not _with_db(_settings(config_path), lambda db: store.delete(db, repository, name)):
        raise click.ClickException(f"{repository} has no secret {name}")
    click.echo(f"{repository}: {name} deleted")


# ---- runs: an HTTP client for people ------------------------------------------------------

def _default_url() -> str:
    """The server this machine's configuration describes (``server.public_url``, else
    ``server.host``/``server.port`` from the config file and ``CRITIQUE_LOCAL_*`` variables), so
    ``CRITIQUE_LOCAL_SERVER_PORT=9000 make serve`` and the CLI agree without ``--url``."""
    try:
        config = os.environ.get("CRITIQUE_LOCAL_CONFIG")
        return load_settings(_config_file(Path(config) if config else None)).public_base_url()
    except (ConfigError, OSError):
        return "http://127.0.0.1:8787"


url_option = click.option("--url", envvar="CRITIQUE_LOCAL_URL", default=_default_url, show_default="the configured server",
                          help="Server base URL (or CRITIQUE_LOCAL_URL); default from server.public_url/host/port.")
key_option = click.option("--key", envvar="CRITIQUE_LOCAL_API_KEY", required=True, help="crt_ key (or env).")


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _check(resp: httpx.Response) -> Any:
    data = resp.json()
    if resp.status_code >= 400:
        err = data.get("error", {})
        raise click.ClickException(f"HTTP {resp.status_code} {err.get('code')}: {err.get('message')}")
    return data


@main.group()
def runs() -> None:
    """Create and follow runs on a server."""


@runs.command("create")
@url_option
@key_option
@click.option("--repo", required=True, help="owner/name")
@click.option("--prompt", required=True, help="Task text, or @FILE to read it from a file ('-' for stdin).")
@click.option("--model", default=None)
@click.option("--task-kind", type=click.Choice(["code", "plan"]), default="code")
@click.option("--ref", default=None)
@click.option("--title", default=None)
@click.option("--tag", "tags", multiple=True)
@click.option("--idempotency-key", default=None)
@click.option("--watch/--no-watch", default=False, help="Follow the stream until the run ends.")
def runs_create(url: str, key: str, repo: str, prompt: str, model: str | None, task_kind: str, ref: str | None,
                title: str | None, tags: tuple[str, ...], idempotency_key: str | None, watch: bool) -> None:
    if prompt == "-":
        prompt = sys.stdin.read()
    elif prompt.startswith("@") and os.path.isfile(prompt[1:]):
        prompt = Path(prompt[1:]).read_text()
    body: dict[str, Any] = {"repository": repo, "prompt": prompt, "taskKind": task_kind}
    for name, value in (("modelId", model), ("baseRef", ref), ("title", title)):
        if value:
            body[name] = value
    if tags:
        body["tags"] = list(tags)
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    run = _post(url, key, "/api/v1/coding-agent/runs", body, headers)
    if watch:
        _watch(url, key, run["id"])


@runs.command("get")
@url_option
@key_option
@click.argument("run_id")
@click.option("--patch", is_flag=True)
@click.option("--events", is_flag=True)
def runs_get(url: str, key: str, run_id: str, patch: bool, events: bool) -> None:
    params = {"patch": "1" if patch else "0", "events": "1" if events else "0"}
    with _client(url, key) as c:
        click.echo(json.dumps(_check(c.get(f"/api/v1/coding-agent/runs/{run_id}", params=params)), indent=2))


@runs.command("patch")
@url_option
@key_option
@click.argument("run_id")
def runs_patch(url: str, key: str, run_id: str) -> None:
    """Write the run's patch, exact bytes, to stdout (``> fix.patch && git apply fix.patch``)."""
    with _client(url, key) as c:
        resp = c.get(f"/api/v1/coding-agent/runs/{run_id}/patch")
    if resp.status_code >= 400:
        _check(resp)
    sys.stdout.buffer.write(resp.content)
    sys.stdout.buffer.flush()


@runs.command("list")
@url_option
@key_option
@click.option("--limit", default=20, show_default=True)
def runs_list(url: str, key: str, limit: int) -> None:
    with _client(url, key) as c:
        data = _check(c.get("/api/v1/coding-agent/runs", params={"limit": limit}))
    for r in data["data"]:
        click.echo(f"{r['id']}  {r['status']:<10} {r['repository']['fullName']:<30} {r['createdAt']}  "
                   f"{(r['title'] or '')[:40]}")


def format_event(kind: str, data: dict[str, Any]) -> str:
    """One readable line per event for ``runs watch``."""
    if kind == "run.status":
        extra = f" ({data['error']['code']}: {data['error']['message']})" if data.get("error") else ""
        return f"== {data['status']} [{data['lifecycle']}]{extra}"
    t = data.get("type")
    if t == "tool":
        detail = data.get("title") or json.dumps(data.get("input", {}))[:100]
        return f"   tool {data.get('tool')} {data.get('status')}: {detail}"
    if t == "text":
        return "   says: " + str(data.get("text", "")).replace("\n", "\n         ")
    if t == "file.edited":
        return f"   edited {data.get('path')}"
    if t == "error":
        return f"!! error {data.get('code') or data.get('name')}: {data.get('message')}"
    if t == "agent.ready":
        return f"   agent ready after {data.get('sinceCreatedMs')} ms"
    return f"   {t}"


def _watch(url: str, key: str, run_id: str) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(30, read=None)) as c:
        with connect_sse(c, "GET", f"/api/v1/coding-agent/runs/{run_id}/stream") as source:
            if source.response.status_code >= 400:
                source.response.read()
                _check(source.response)
            for sse in source.iter_sse():
                if sse.data:  # heartbeat comments arrive as events without data
                    click.echo(format_event(sse.event, json.loads(sse.data)))


def _post(url: str, key: str, path: str, body: dict[str, Any] | None = None,
          headers: dict[str, str] | None = None) -> dict[str, Any]:
    """POST, print the run that answers in one line, return it."""
    with _client(url, key) as c:
        run: dict[str, Any] = _check(c.post(path, json=body, headers=headers or {}))["run"]
    click.echo(f"{run['id']}  {run['status']}  [{run['lifecycle']}]  turns={run['turnCount']}")
    return run


@runs.command("send")
@url_option
@key_option
@click.argument("run_id")
@click.option("--prompt", required=True)
@click.option("--no-fallback", is_flag=True, help="Answer 409 instead of chaining when the session ended.")
@click.option("--watch/--no-watch", default=False)
def runs_send(url: str, key: str, run_id: str, prompt: str, no_fallback: bool, watch: bool) -> None:
    """Send a follow-up (a chained run is printed when the session had ended)."""
    body: dict[str, Any] = {"prompt": prompt, "fallback": "none" if no_fallback else "chain"}
    run = _post(url, key, f"/api/v1/coding-agent/runs/{run_id}/messages", body)
    if watch:
        _watch(url, key, run["id"])


@runs.command("end")
@url_option
@key_option
@click.argument("run_id")
def runs_end(url: str, key: str, run_id: str) -> None:
    """End the warm session (destroys the sandbox)."""
    _post(url, key, f"/api/v1/coding-agent/runs/{run_id}/messages", {"endSession": True})


@runs.command("cancel")
@url_option
@key_option
@click.argument("run_id")
def runs_cancel(url: str, key: str, run_id: str) -> None:
    """Cancel a queued, running or idle run."""
    _post(url, key, f"/api/v1/coding-agent/runs/{run_id}/cancel")


@runs.command("watch")
@url_option
@key_option
@click.argument("run_id")
def runs_watch(url: str, key: str, run_id: str) -> None:
    """Follow a run's live stream as a readable log."""
    _watch(url, key, run_id)


main.add_command(envs_cli.envs)  # critique-local envs (critique_local/envs/cli.py)
