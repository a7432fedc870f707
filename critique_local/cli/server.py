"""``serve`` (start the API server) and ``config`` (inspect the configuration it loads)."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from pathlib import Path

import click

from critique_local.cli.common import config_file, config_option, settings_of
from critique_local.config import SCALAR_SECTIONS
from critique_local.hoststate import InstanceInUse
from critique_local.ops import logs
from critique_local.services import Services


@click.command()
@config_option
@click.option("--host", default=None, help="Override server.host.")
@click.option("--port", type=int, default=None, help="Override server.port.")
def serve(config_path: Path | None, host: str | None, port: int | None) -> None:
    """Start the API server."""
    from critique_local.app import serve as run_server

    chosen = config_file(config_path)
    settings = settings_of(chosen)
    if host is not None:
        settings.server.host = host
    if port is not None:
        settings.server.port = port
    logs.configure(settings.server.log_level, settings.server.log_format)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("critique_local").info(
        "configuration: %s", chosen or f"no file (defaults and CRITIQUE_LOCAL_* variables, relative paths "
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
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise click.ClickException(
            f"{settings.server.host}:{settings.server.port} is already in use (another server?): choose another "
            "port with --port, server.port or CRITIQUE_LOCAL_SERVER_PORT") from exc


@click.group("config")
def config_group() -> None:
    """Inspect the configuration the server loads (file, defaults, CRITIQUE_LOCAL_* variables)."""


@config_group.command("get")
@config_option
@click.argument("name")
def config_get(config_path: Path | None, name: str) -> None:
    """Print one setting NAME (section.key, e.g. git.local_root) as the server loads it; path
    settings are absolute. Lists and tables are printed as JSON."""
    section, _, key = name.partition(".")
    settings = settings_of(config_path)
    part = getattr(settings, section, None) if section in SCALAR_SECTIONS else None
    if part is None or key not in type(part).model_fields:
        raise click.ClickException(f"unknown setting {name!r} (section.key, e.g. git.local_root)")
    value = getattr(part, key)
    click.echo(json.dumps(value) if isinstance(value, (list, dict)) else str(value))
