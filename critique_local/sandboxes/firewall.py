"""iptables rules for Docker sandboxes, owned per server instance (``docker.host_firewall``).

On the host (filter table)::

    INPUT             -i <bridge> -j CRITIQUE-SANDBOX                     one per sandbox bridge (shared)
    CRITIQUE-SANDBOX  -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT  replies to what the host opened
                      -i <bridge> -m comment --comment critique-local:<id> -j CRIT-<id>   per instance
                      -j DROP                                              anything else from a sandbox bridge
    CRIT-<id>         -i <bridge> -d <gateway>/32 -p tcp --dport <port> -j ACCEPT  that instance's listeners

The shared rules only ever let sandboxes reach less, so they stay while their bridge exists
(whoever holds the host lock adds them when missing; an INPUT jump goes once no Docker network
has that bridge any more). An instance's chain and the jumps to it are removed by that instance
when it stops, or by any server once the instance is proven gone (``critique_local.hoststate``):
never because some port did or did not answer.

Inside each sandbox's network namespace, :func:`block_dns` rejects everything sent to Docker's
embedded DNS (127.0.0.11), which would otherwise answer the names and reverse lookups of the
other containers on the network (other runs' sandboxes).

Every function blocks (it runs iptables): call them from a worker thread.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

SHARED_CHAIN = "CRITIQUE-SANDBOX"
CHAIN_PREFIX = "CRIT-"
INSTANCE_CHAIN = re.compile(r"CRIT-[0-9a-f]{16}")
EMBEDDED_DNS = "127.0.0.11/32"
TIMEOUT_S = 60
ESTABLISHED = ("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")


class FirewallError(Exception):
    """iptables (or nsenter) is missing, not permitted, or refused a rule."""


@dataclass(frozen=True)
class Opening:
    """What sandboxes on ``bridge`` may reach on the host: TCP to ``address``:``port``."""

    bridge: str
    address: str
    port: int


def chain_of(instance_id: str) -> str:
    return f"{CHAIN_PREFIX}{instance_id}"


def _tag(instance_id: str) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", f"critique-local:{instance_id}")


def _ipt(*args: str, netns_pid: int | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["nsenter", f"--net=/proc/{netns_pid}/ns/net"] if netns_pid is not None else []
    try:
        return subprocess.run([*prefix, "iptables", "-w", *args], capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FirewallError(f"iptables {' '.join(args)}: {exc}") from exc


def _must(*args: str, netns_pid: int | None = None) -> None:
    res = _ipt(*args, netns_pid=netns_pid)
    if res.returncode != 0:
        raise FirewallError(f"iptables {' '.join(args)}: {res.stderr.strip() or f'exit {res.returncode}'}")


def _has(*args: str) -> bool:
    return _ipt("-C", *args).returncode == 0


def _arg(rule: list[str], flag: str) -> str | None:
    return rule[rule.index(flag) + 1] if flag in rule[:-1] else None


def _rules(chain: str) -> list[list[str]]:
    """The chain's rules as ``iptables -S`` prints them, split (empty when it does not exist)."""
    res = _ipt("-S", chain)
    return [shlex.split(line) for line in res.stdout.splitlines() if line.startswith("-A ")] if res.returncode == 0 else []


def _legacy(rule: list[str], instance_id: str) -> bool:
    """A rule this instance added to the shared chain before instances had chains of their own."""
    return _arg(rule, "--comment") == f"critique-{instance_id}"


def check_available() -> None:
    """Raise FirewallError when iptables is missing or cannot be used (not root)."""
    if shutil.which("iptables") is None:
        raise FirewallError("iptables is not installed")
    res = _ipt("-n", "-L", "INPUT")
    if res.returncode != 0:
        raise FirewallError(f"iptables is not usable: {res.stderr.strip()}")


def install(instance_id: str, openings: Iterable[Opening], bridges: Iterable[str]) -> None:
    """Let sandboxes on ``bridges`` reach exactly ``openings`` of the host (this instance's
    listeners) and nothing else. Replaces what this instance installed before. Call with the
    host lock held."""
    check_available()
    openings = list(openings)
    if _ipt("-n", "-L", SHARED_CHAIN).returncode != 0:
        _must("-N", SHARED_CHAIN)
    if not _has(SHARED_CHAIN, *ESTABLISHED):
        _must("-I", SHARED_CHAIN, "1", *ESTABLISHED)
    if not _has(SHARED_CHAIN, "-j", "DROP"):
        _must("-A", SHARED_CHAIN, "-j", "DROP")
    own = chain_of(instance_id)
    _must("-F", own) if _ipt("-n", "-L", own).returncode == 0 else _must("-N", own)
    for o in openings:
        _must("-A", own, "-i", o.bridge, "-d", f"{o.address}/32", "-p", "tcp", "--dport", str(o.port), "-j", "ACCEPT")
    wanted = {o.bridge for o in openings}
    for rule in _rules(SHARED_CHAIN):
        if (rule[-2:] == ["-j", own] and _arg(rule, "-i") not in wanted) or _legacy(rule, instance_id):
            _ipt("-D", *rule[1:])
    for bridge in sorted(wanted):
        if not _has(SHARED_CHAIN, "-i", bridge, *_tag(instance_id), "-j", own):
            _must("-I", SHARED_CHAIN, "2", "-i", bridge, *_tag(instance_id), "-j", own)
    for bridge in sorted({*bridges, *wanted}):
        if not _has("INPUT", "-i", bridge, "-j", SHARED_CHAIN):
            _must("-I", "INPUT", "1", "-i", bridge, "-j", SHARED_CHAIN)


def remove(instance_id: str) -> None:
    """Remove the instance's chain and every jump to it (nothing when there is none)."""
    if shutil.which("iptables") is None:
        return
    own = chain_of(instance_id)
    for rule in _rules(SHARED_CHAIN):
        if rule[-2:] == ["-j", own] or _legacy(rule, instance_id):
            _ipt("-D", *rule[1:])
    if _ipt("-n", "-L", own).returncode == 0:
        _must("-F", own)
        _must("-X", own)


def instance_chains() -> set[str]:
    """Instance ids that have a chain on this host."""
    res = _ipt("-S")
    return {parts[1][len(CHAIN_PREFIX):] for parts in (line.split() for line in res.stdout.splitlines())
            if len(parts) == 2 and parts[0] == "-N" and INSTANCE_CHAIN.fullmatch(parts[1])}


def prune_bridges(existing: set[str]) -> list[str]:
    """Drop INPUT jumps for bridges that no Docker network has any more; returns those bridges."""
    gone = []
    for rule in _rules("INPUT"):
        bridge = _arg(rule, "-i")
        if rule[-2:] == ["-j", SHARED_CHAIN] and bridge is not None and bridge not in existing:
            _ipt("-D", *rule[1:])
            gone.append(bridge)
    return gone


def block_dns(netns_pid: int) -> None:
    """Reject everything sent to Docker's embedded DNS from the network namespace of process
    ``netns_pid`` (a sandbox's init): names of other containers stay unknown to it. Raises
    FirewallError when the rule could not be added."""
    if not shutil.which("nsenter"):
        raise FirewallError("nsenter is not installed")
    _must("-I", "OUTPUT", "1", "-d", EMBEDDED_DNS, "-j", "REJECT", netns_pid=netns_pid)
