"""``runs``: an HTTP client for people (create, follow, message, cancel runs on a server)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
import httpx
from httpx_sse import connect_sse

from critique_local.cli.common import config_file
from critique_local.config import ConfigError, load_settings


def _default_url() -> str:
    """The server this machine's configuration describes (``server.public_url``, else
    ``server.host``/``server.port`` from the config file and ``CRITIQUE_LOCAL_*`` variables), so
    ``CRITIQUE_LOCAL_SERVER_PORT=9000 make serve`` and the CLI agree without ``--url``."""
    try:
        config = os.environ.get("CRITIQUE_LOCAL_CONFIG")
        return load_settings(config_file(Path(config) if config else None)).public_base_url()
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


@click.group()
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
@click.option("--no-fallback", is_flag=True, help="Answer 409 instead of restoring or chaining when the session ended.")
@click.option("--chain", is_flag=True, help="Start a chained run instead of restoring when the session ended.")
@click.option("--watch/--no-watch", default=False)
def runs_send(url: str, key: str, run_id: str, prompt: str, no_fallback: bool, chain: bool, watch: bool) -> None:
    """Send a follow-up (an ended session is restored on the same run id, else a chained run is printed)."""
    body: dict[str, Any] = {"prompt": prompt,
                            "fallback": "none" if no_fallback else "chain" if chain else "restore"}
    run = _post(url, key, f"/api/v1/coding-agent/runs/{run_id}/messages", body)
    if watch:
        _watch(url, key, run["id"])


@runs.command("fork")
@url_option
@key_option
@click.argument("run_id")
@click.option("--turn", type=int, required=True, help="The turn whose tree and transcript the fork starts from.")
@click.option("--prompt", default=None, help="The fork's first turn (without it the fork waits idle).")
@click.option("--title", default=None)
@click.option("--idempotency-key", default=None)
@click.option("--watch/--no-watch", default=False)
def runs_fork(url: str, key: str, run_id: str, turn: int, prompt: str | None, title: str | None,
              idempotency_key: str | None, watch: bool) -> None:
    """Fork a run at a turn into a new run (printed)."""
    body: dict[str, Any] = {"turn": turn, **({"prompt": prompt} if prompt else {}), **({"title": title} if title else {})}
    run = _post(url, key, f"/api/v1/coding-agent/runs/{run_id}/fork", body,
                {"Idempotency-Key": idempotency_key} if idempotency_key else None)
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
