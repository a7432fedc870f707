"""What Docker sandboxes share with other servers on the host: networks, firewall rules, and
the leftovers of servers that died.

- **Networks** are shared: servers configured with the same ``docker.network`` use one network.
  It is created (with a duplicate-name check, under the host lock) when missing and never
  removed, except to re-create one that allows container-to-container traffic, and only while
  no container and no other running server uses it.
- **Firewall rules and containers** belong to one instance (``critique.instance`` label,
  ``CRIT-<id>`` chain). A server removes another instance's chain once that instance is proven
  gone (its claim in this server's ``server.host_state_dir`` can be taken), and its containers
  once it also can never come back (its data dir no longer holds its id): until then a restart
  of that server reattaches them. An instance with no claim in this host state (a server with
  another ``host_state_dir``) cannot be proven gone: its chain and containers are never touched.

Every function blocks (Docker SDK, iptables, file locks): call them from a worker thread.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import docker
import docker.errors

from critique_local.errors import ErrorCode
from critique_local.hoststate import HostState
from critique_local.sandboxes import firewall
from critique_local.sandboxes.base import SandboxError

ICC = "com.docker.network.bridge.enable_icc"
BRIDGE_NAME = "com.docker.network.bridge.name"
LABEL = "critique.local"
LABEL_INSTANCE = "critique.instance"
log = logging.getLogger(__name__)


def bridge_of(attrs: dict[str, Any]) -> str:
    """The Linux bridge of a Docker bridge network (from its inspect attributes)."""
    return str((attrs.get("Options") or {}).get(BRIDGE_NAME) or f"br-{str(attrs['Id'])[:12]}")


def existing_bridges(client: docker.DockerClient) -> set[str]:
    return {bridge_of(n.attrs) for n in client.networks.list() if n.attrs.get("Driver") == "bridge"}


def ensure_network(client: docker.DockerClient, host: HostState, instance_id: str, name: str, *,
                   internal: bool) -> Any:
    """The network ``name``: created when missing, with container-to-container traffic disabled.
    Raises SandboxError(network_unsafe) when it exists with other settings and is in use. Call
    with the host lock held and this instance's networks already published."""
    found = client.networks.list(names=[name])
    found = [n for n in found if n.name == name]  # `names` matches substrings
    if len(found) > 1:
        raise SandboxError(f"there are {len(found)} Docker networks named {name}: remove the extra ones",
                           ErrorCode.NETWORK_UNSAFE)
    net = found[0] if found else None
    if net is not None:
        net.reload()
        if (net.attrs.get("Options") or {}).get(ICC) != "false" or bool(net.attrs.get("Internal")) != internal:
            users = [r.instance_id for r in host.live_records(excluding=instance_id) if name in r.networks]
            if net.attrs.get("Containers") or users:
                raise SandboxError(
                    f"network {name} allows container-to-container traffic or has the wrong routing, and "
                    f"{'containers' if net.attrs.get('Containers') else 'other servers (' + ', '.join(users) + ')'}"
                    " still use it: stop them, remove the network, then restart", ErrorCode.NETWORK_UNSAFE)
            net.remove()
            net = None
    if net is None:
        net = client.networks.create(name, driver="bridge", internal=internal, labels={LABEL: "1"},
                                     options={ICC: "false"}, check_duplicate=True)
        net.reload()
    return net


def reclaim(client: docker.DockerClient, host: HostState, own_instance: str, *, rules: bool) -> None:
    """Remove what instances proven gone left on the host: their firewall chains (at once, when
    ``rules``), and their containers once they can never come back. The Docker client is used
    only for the containers of instances that can never come back.

    Only instances this server's host state knows (a claim under ``server.host_state_dir``) are
    considered: a chain ``CRIT-<id>`` of an id that has no claim there belongs to a server with
    another ``host_state_dir`` (or another user's per-user fallback), which may well be running,
    so it stays, and so do that instance's containers."""
    known = host.known()
    chains = _chains() if rules else set()
    foreign = sorted(chains - known - {own_instance})
    if foreign:
        log.debug("leaving the firewall chains of instances with no claim in %s (servers with another "
                  "server.host_state_dir): %s", host.root, ", ".join(foreign))
    for instance in sorted(known - {own_instance}):
        record = host.read_record(instance)
        final = not record.can_return()
        with host.if_gone(instance, forget=final) as gone:
            if gone is None:
                continue  # it runs
            if instance in chains:
                log.info("removing the firewall rules of instance %s (its server is gone)", instance)
                with host.exclusive():
                    firewall.remove(instance)
            if final:
                leftovers = client.containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}={instance}"})
                for container in leftovers:
                    log.info("removing sandbox %s of instance %s (its server and data dir are gone)",
                             container.short_id, instance)
                    try:
                        container.remove(force=True, v=True)
                    except docker.errors.NotFound:
                        pass


def prune_jumps(client: docker.DockerClient, host: HostState) -> None:
    """Drop the INPUT jumps of bridges that no Docker network has any more (nothing when
    iptables cannot be used)."""
    try:
        firewall.check_available()
    except firewall.FirewallError:
        return
    with host.exclusive():  # networks are created under this lock too: none appears meanwhile
        for bridge in firewall.prune_bridges(existing_bridges(client)):
            log.info("removed the firewall jump of bridge %s (its network is gone)", bridge)


def _chains() -> set[str]:
    if shutil.which("iptables") is None:
        return set()
    try:
        return firewall.instance_chains()
    except firewall.FirewallError:
        return set()
