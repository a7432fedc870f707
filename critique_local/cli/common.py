"""What every command group shares: the --config option, loading settings, the local database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx

from critique_local.config import ConfigError, Settings, load_settings
from critique_local.store.db import Database

T = TypeVar("T")
config_option = click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
                             default=None, envvar="CRITIQUE_LOCAL_CONFIG", help="TOML config file.")


def config_file(config_path: Path | None) -> Path | None:
    """``--config``/``CRITIQUE_LOCAL_CONFIG``, else ``./critique-local.toml`` when it exists."""
    if config_path is None and Path("critique-local.toml").exists():
        config_path = Path("critique-local.toml")
    return config_path.absolute() if config_path is not None else None


def settings_of(config_path: Path | None) -> Settings:
    try:
        return load_settings(config_file(config_path))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def with_db(settings: Settings, fn: Callable[[Database], Awaitable[T]]) -> T:
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


class MainGroup(click.Group):
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
