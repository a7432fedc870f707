"""``critique-local sandbox gc``: remove what this instance (this data dir's ``instance_id``) left
that no live run owns: its sandboxes, its firewall chain, the sandbox networks nobody uses, and
leftovers in the data dir (interrupted mirror clones, work repositories of ended runs whose
session can no longer be restored); and ``critique-local sandbox ls``: this instance's sandboxes
and whose they are.

Whose a sandbox is comes from the store first (the run whose ``sandbox_id`` it is), then from
its ``critique.run`` label: a pooled sandbox keeps the label ``critique.run=pool-<hex>`` (and an
empty ``critique.user``) after a run takes it, since Docker cannot relabel a container
(``sandboxes.base.run_of_sandbox``, which the server's sweep uses too).

Only this instance's things are touched (containers labelled ``critique.instance=<id>``, the
chain ``CRIT-<id>``); networks only when no container is attached, no running server
(``hoststate``) lists them, and no instance unknown to this host state (a server with another
``server.host_state_dir``) has a sandbox or a firewall chain on the host. Whether this
instance's server runs is asked of both the host's instance claims and the data dir's own lock
(``datalock``), so gc run with another ``host_state_dir`` than the server's still sees it
running. While it runs, gc stays out of its way: pooled sandboxes, its firewall chain,
networks and partial clones stay, and only sandboxes and work repositories of runs that ended
go. While it does not run, gc holds both locks, so the server cannot start meanwhile. A run's
work repository stays while its durable session state is kept (``sessions/<id>.state``: a
message may still restore the session, or fork it). Blocking (Docker SDK, iptables, file locks).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from critique_local.config import Settings
from critique_local.datalock import DataDirLock
from critique_local.hoststate import HostState, default_root
from critique_local.sandboxes import dockerhost, firewall
from critique_local.sandboxes.base import run_of_sandbox
from critique_local.sandboxes.container import LABEL_RUN
from critique_local.store import readonly

LIVE = ("queued", "running", "idle")
STATE_SUFFIX = ".state"  # runs/durable.py: sessions/<run id>.state
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Action:
    kind: str  # sandbox | firewall | network | mirror | workrepo
    target: str
    why: str


def _runs(db_path: Path) -> tuple[set[str], dict[str, str], set[str]]:
    """(live run ids, sandbox id -> the run bound to it, ended run ids)."""
    if not db_path.exists():
        return set(), {}, set()
    rows = readonly.run_sandboxes(db_path)
    live = {r[0] for r in rows if r[1] in LIVE}
    bound = {r[2]: r[0] for r in rows if r[2]}
    return live, bound, {r[0] for r in rows if r[1] not in LIVE}


@dataclass(frozen=True)
class Listed:
    """One sandbox of this instance: ``run`` is whose it is (``run_of_sandbox``: the run our
    store binds it to, else the run it was created for; None: pooled, no run took it) and
    ``status`` that run's status (None when pooled or unknown to the store)."""

    short_id: str
    name: str
    running: bool
    run: str | None
    status: str | None


def listing(settings: Settings) -> list[Listed]:
    """This instance's Docker sandboxes and whose they are. Raises docker.errors.DockerException
    when the engine cannot be reached."""
    import docker

    id_file = settings.server.data_dir / "instance_id"
    if settings.sandbox.backend != "docker" or not id_file.exists():
        return []
    instance = id_file.read_text().strip()
    statuses = {r[0]: r[1] for r in readonly.run_sandboxes(settings.db_path)} if settings.db_path.exists() else {}
    bound = _runs(settings.db_path)[1]
    client = docker.from_env(timeout=60)
    try:
        found = client.containers.list(all=True, filters={"label": f"{dockerhost.LABEL_INSTANCE}={instance}"},
                                       ignore_removed=True)
        rows = []
        for c in found:
            run = run_of_sandbox(str(c.id), c.labels.get(LABEL_RUN), bound, str(c.name))
            rows.append(Listed(str(c.short_id), str(c.name), c.status == "running", run, statuses.get(run or "")))
        return rows
    finally:
        client.close()


def collect(settings: Settings, apply: bool = False) -> list[Action]:
    """What gc removes (with ``apply``: removes it). Raises docker.errors.DockerException when
    the engine cannot be reached."""
    id_file = settings.server.data_dir / "instance_id"
    if not id_file.exists():
        return []
    instance = id_file.read_text().strip()
    host = HostState(default_root(settings.server.host_state_dir))
    lock = DataDirLock.take(settings.server.data_dir)
    try:
        with host.if_gone(instance) as gone:
            if gone is not None and lock is None:
                log.warning("the server of %s runs but holds no claim in %s: run gc with the server's configuration "
                            "(server.host_state_dir); treating it as running", settings.server.data_dir, host.root)
            return _collect(settings, host, instance, running=gone is None or lock is None, apply=apply)
    finally:
        if lock is not None:
            lock.release()


def _collect(settings: Settings, host: HostState, instance: str, running: bool, apply: bool) -> list[Action]:
    live, bound, ended = _runs(settings.db_path)
    actions: list[Action] = []
    if settings.sandbox.backend == "docker":
        actions += _docker(settings, host, instance, running, live, bound, apply)
    data = settings.server.data_dir
    states = data / "sessions"
    kept = {p.name.removesuffix(STATE_SUFFIX) for p in states.glob(f"*{STATE_SUFFIX}")} if states.is_dir() else set()
    runs_dir = data / "runs"
    for entry in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        run_id = entry.name.removesuffix(".partial").removesuffix(".git")
        if run_id in live or (run_id in ended and run_id in kept):
            continue  # a live run's, or an ended session a message may still restore (or fork)
        if run_id in ended or not running:
            actions.append(Action("workrepo", str(entry), f"run {run_id} is not live and its session state is "
                                  "not kept" if run_id in ended else f"run {run_id} is not in the database"))
            if apply:
                shutil.rmtree(entry, ignore_errors=True)
    if not running:
        for partial in sorted((data / "mirrors").glob("**/*.partial")):
            actions.append(Action("mirror", str(partial), "an interrupted clone"))
            if apply:
                shutil.rmtree(partial, ignore_errors=True)
    return actions


def _docker(settings: Settings, host: HostState, instance: str, running: bool, live: set[str],
            bound: dict[str, str], apply: bool) -> list[Action]:
    import docker
    import docker.errors

    client = docker.from_env(timeout=60)
    actions: list[Action] = []
    try:
        for c in client.containers.list(all=True, filters={"label": f"{dockerhost.LABEL_INSTANCE}={instance}"}):
            run = run_of_sandbox(str(c.id), c.labels.get(LABEL_RUN), bound, str(c.name))
            if (run and run in live) or (running and not run):
                continue  # a live run's, or (server running) a pooled one no run took
            why = f"run {run} is not live" if run else "a pooled sandbox of a stopped server"
            actions.append(Action("sandbox", f"{c.short_id} ({c.name})", why))
            if apply:
                try:
                    c.remove(force=True, v=True)
                except docker.errors.NotFound:
                    pass
        if running:
            return actions
        if settings.docker.host_firewall and shutil.which("iptables") and instance in firewall.instance_chains():
            actions.append(Action("firewall", firewall.chain_of(instance), "its server is not running"))
            if apply:
                with host.exclusive():
                    firewall.remove(instance)
        in_use = {n for r in host.live_records(excluding=instance) for n in r.networks}
        strangers = _strangers(client, host, instance, settings.docker.host_firewall)
        for name in dict.fromkeys([settings.docker.network, settings.docker.open_network]):
            nets = [n for n in client.networks.list(names=[name]) if n.name == name]
            for net in nets:
                net.reload()
                if (net.attrs.get("Labels") or {}).get(dockerhost.LABEL) != "1" or net.attrs.get("Containers"):
                    continue
                if name in in_use or strangers:
                    continue  # a running server (of this host state, or maybe of another) may use it
                actions.append(Action("network", name, "no container attached and no running server uses it"))
                if apply:
                    with host.exclusive():  # servers create networks under this lock: check again inside
                        net.reload()
                        users = {n for r in host.live_records(excluding=instance) for n in r.networks}
                        if not net.attrs.get("Containers") and name not in users:
                            net.remove()
                            if shutil.which("iptables"):
                                firewall.prune_bridges(dockerhost.existing_bridges(client))
    finally:
        client.close()
    return actions


def _strangers(client: Any, host: HostState, instance: str, rules: bool) -> set[str]:
    """Instances with a sandbox or a firewall chain on this host but no claim in this host
    state: servers with another ``server.host_state_dir``, which may be running (and using the
    shared networks) without this host state knowing."""
    known = host.known() | {instance}
    labelled = {c.labels.get(dockerhost.LABEL_INSTANCE, "") for c in
                client.containers.list(all=True, filters={"label": dockerhost.LABEL_INSTANCE})}
    chains = firewall.instance_chains() if rules and shutil.which("iptables") else set()
    return {i for i in labelled | chains if i and i not in known}
