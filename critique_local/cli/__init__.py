"""The ``critique-local`` command: ``serve`` and ``config`` (cli/server.py), operator commands
on the local database (cli/admin.py: keys, credits, webhooks, secrets) and an HTTP client for
runs (cli/runs.py), and the operator's commands (cli/ops.py: doctor, sandbox gc, backup, restore,
migrate, audit); kept environments (cli/envs.py: envs)."""

from __future__ import annotations

import click

from critique_local.cli import admin, envs, ops, runs, server
from critique_local.cli.common import MainGroup


@click.group(cls=MainGroup)
def main() -> None:
    """critique-local: a self-hosted Coding Agent API."""


main.add_command(server.serve)
main.add_command(server.config_group)
main.add_command(admin.keys)
main.add_command(admin.credits)
main.add_command(admin.webhooks)
main.add_command(admin.secrets)
main.add_command(runs.runs)
for command in (ops.doctor, ops.sandbox, ops.backup, ops.restore, ops.migrate, ops.audit_cmd):
    main.add_command(command)
main.add_command(envs.envs)
