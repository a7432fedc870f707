"""``critique-local sandbox gc``: remove what this instance (this data dir's ``instance_id``) left
that no live run owns: its sandboxes, its firewall chain, the sandbox networks nobody uses, and
leftovers in the data dir (interrupted mirror clones, work repositories of ended runs whose
session can no longer be restored).

Only this instance's things are touched (containers labelled ``critique.instance=<id>``, the
chain ``CRIT-<id>``); networks only when no container is attached and no running server
(``hoststate``) lists them. Whether this instance's server runs is asked of both the host's instance claims and the data dir's own lock
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

from critique_local.config import Settings
from critique_local.datalock import DataDirLock
from critique_local.hoststate import HostState, default_root
from critique_local.sandboxes import dockerhost, firewall
from critique_local.store import readonly

LIVE = ("queued", "running", "idle")
STATE_SUFFIX = ".state"  # runs/durable.py: sessions/<run id>.state
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Action:
    kind: str  # sandbox | firewall | network | mirror | workrepo
    target: str
    why: str


def _runs(db_path: Path) -> tuple[set[str], set[str], set[str]]:
    """(live run ids, their sandbox ids, ended run ids)."""
    if not db_path.exists():
        return set(), set(), set()
    rows = readonly.run_sandboxes(db_path)
    live = {r[0] for r in rows if r[1] in LIVE}
    return live, {r[2] for r in rows if r[1] in LIVE and r[2]}, {r[0] for r in rows if r[1] not in LIVE}


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
    live, live_sandboxes, ended = _runs(settings.db_path)
    actions: list[Action] = []
    if settings.sandbox.backend == "docker":
        actions += _docker(settings, host, instance, running, live, live_sandboxes, apply)
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
            live_sandboxes: set[str], apply: bool) -> list[Action]:
    import docker
    import docker.errors

    client = docker.from_env(timeout=60)
    actions: list[Action] = []
    try:
        for c in client.containers.list(all=True, filters={"label": f"{dockerhost.LABEL_INSTANCE}={instance}"}):
            run = c.labels.get("critique.run")
            if c.id in live_sandboxes or (run and run in live) or (running and not run):
                continue  # a live run's, or (server running) a pooled one
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
        for name in dict.fromkeys([settings.docker.network, settings.docker.open_network]):
            nets = [n for n in client.networks.list(names=[name]) if n.name == name]
            for net in nets:
                net.reload()
                if (net.attrs.get("Labels") or {}).get(dockerhost.LABEL) != "1" or net.attrs.get("Containers"):
                    continue
                if name in in_use:
                    continue
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
