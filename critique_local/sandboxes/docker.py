"""Docker backend: one container per run on an internal network (no route out).

The container runs ``sleep infinity`` under Docker's init as the unprivileged ``agent`` user,
with all capabilities dropped, ``no-new-privileges``, a read-only root filesystem, and limits
on CPU, memory, processes and open files. Writable are only ``/workspace``, ``/tmp`` and the
agent's home (``~``, with ``~/.local`` and ``~/.cache`` each on their own): size-limited tmpfs
mounts (their pages count as memory, so the memory limit covers them). The home is writable so
the agent works as on a developer's machine (``git config --global``, tool caches and settings). No host path is mounted and the Docker socket never is.
Container logs are discarded (log driver ``none``), so PID 1's stdout never fills the host's disk.

The network is internal (no route out), with container-to-container traffic disabled (no
sandbox reaches another), and DNS pointed nowhere (an internal network's embedded DNS would
otherwise forward queries out: CVE-2024-29018); with ``docker.host_firewall`` the embedded DNS
is also closed inside each sandbox, so it cannot look up other runs' containers. The server
reaches OpenCode at the container's address; the container reaches the host only at the
network's gateway address, and with ``docker.host_firewall`` only at this server's gateway and
egress proxy ports there. Runs with network mode ``open`` also join a second network with a
route out. What is shared with other servers on the host (networks, firewall rules) and who
may remove what: ``dockerhost``.

docker-py is blocking, so every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from critique_local.config import DockerSettings, SandboxSettings
from critique_local.errors import ErrorCode
from critique_local.hoststate import HostLockTimeout, InstanceClaim
from critique_local.sandboxes import dockerenv, dockerhost, firewall
from critique_local.sandboxes.base import (
    NAME_PREFIX,
    ResourceUsage,
    Sandbox,
    SandboxBackend,
    SandboxError,
    SandboxGone,
    SandboxInfo,
    SandboxSpec,
)
from critique_local.sandboxes.container import (
    AGENT_USER,
    ENGINE_ERRORS,
    LABEL,
    LABEL_INSTANCE,
    LABEL_RUN,
    LABEL_USER,
    TCP_SYN_RETRIES,
    DockerSandbox,
    why,
)

HOST_ERRORS = (firewall.FirewallError, HostLockTimeout, OSError)  # iptables, nsenter, the host lock
log = logging.getLogger(__name__)


class DockerBackend(dockerenv.DockerEnvironments, SandboxBackend):  # environments: dockerenv.py
    name = "docker"

    def __init__(self, sandbox: SandboxSettings, settings: DockerSettings, claim: InstanceClaim,
                 allow_open: bool = False) -> None:
        self._sandbox = sandbox
        self._settings = settings
        self._claim = claim
        self._host = claim.host
        self._instance = claim.instance_id
        self._allow_open = allow_open
        self._client: docker.DockerClient | None = None
        self._gateway_host: str | None = None
        self._bridges: list[str] = []  # the sandbox network's, then the open network's
        self._firewalled = False  # our chain is installed (removed again on close)
        self._close_dns = False  # sandboxes get Docker's embedded DNS closed (needs root)

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            raise SandboxError("docker backend not started")
        return self._client

    async def start(self) -> None:
        def setup() -> str:
            try:
                client = docker.from_env(timeout=120)
                client.ping()
            except docker.errors.DockerException as exc:
                raise SandboxError(f"Docker engine not reachable: {exc}", ErrorCode.DOCKER_UNAVAILABLE) from exc
            self._client = client
            try:
                client.images.get(self._sandbox.image)
            except docker.errors.ImageNotFound as exc:
                raise SandboxError(
                    f"sandbox image {self._sandbox.image} is missing: run sandboxes/docker/build.sh", ErrorCode.IMAGE_MISSING
                ) from exc
            names = [self._settings.network, *([self._settings.open_network] if self._allow_open else [])]
            self._claim.publish(networks=names)  # before the lock: nobody re-creates them under us
            with self._host.exclusive():
                nets = [dockerhost.ensure_network(client, self._host, self._instance, name, internal=i == 0)
                        for i, name in enumerate(names)]
            self._bridges = [dockerhost.bridge_of(net.attrs) for net in nets]
            return str(nets[0].attrs["IPAM"]["Config"][0]["Gateway"])

        try:
            self._gateway_host = await asyncio.to_thread(setup)
        except HostLockTimeout as exc:
            raise SandboxError(f"could not set up the sandbox network: {exc}", ErrorCode.DOCKER_UNAVAILABLE) from exc

    async def restrict_host(self, ports: list[int]) -> None:
        """Install this instance's firewall chain: sandboxes on our bridges reach exactly the
        gateway address at ``ports``. Also closes Docker's embedded DNS in every later sandbox."""
        if not self._settings.host_firewall or not self._bridges or self._gateway_host is None:
            return
        openings = [firewall.Opening(self._bridges[0], self._gateway_host, port) for port in ports]

        def install() -> None:
            firewall.check_available()
            with self._host.exclusive():
                firewall.install(self._instance, openings, self._bridges)

        try:
            await asyncio.to_thread(install)
        except HOST_ERRORS as exc:
            log.warning("host firewall for sandboxes not installed (%s); sandboxes can reach host services "
                        "listening on all addresses, and look up other sandboxes' names", exc)
            return
        self._firewalled = self._close_dns = True

    async def reclaim_host(self) -> None:
        def reclaim() -> None:
            dockerhost.reclaim(self.client, self._host, self._instance, rules=self._settings.host_firewall)
            if self._settings.host_firewall:
                dockerhost.prune_jumps(self.client, self._host)

        try:
            await asyncio.to_thread(reclaim)
        except (*ENGINE_ERRORS, *HOST_ERRORS) as exc:
            log.warning("could not remove what stopped servers left on the host: %s", exc)

    async def adopt(self, sandbox_id: str, run_id: str) -> None:
        try:
            await asyncio.to_thread(self.client.api.rename, sandbox_id, f"{NAME_PREFIX}{run_id}")
        except ENGINE_ERRORS as exc:
            log.warning("could not rename pooled sandbox %s: %s", sandbox_id[:12], exc)

    async def alive(self, sandbox_id: str) -> bool:
        def running() -> bool:
            try:
                return bool(self.client.api.inspect_container(sandbox_id)["State"]["Running"])
            except docker.errors.NotFound:
                return False

        try:
            return await asyncio.to_thread(running)
        except ENGINE_ERRORS:
            return True  # the engine is not answering: undecided, ask again later

    async def usage(self, sandbox_id: str) -> ResourceUsage:
        def stats() -> ResourceUsage:
            data = self.client.api.stats(sandbox_id, stream=False, one_shot=True)
            pids = data.get("pids_stats") or {}
            memory = data.get("memory_stats") or {}
            return ResourceUsage(pids=pids.get("current"), pids_limit=pids.get("limit") or self._sandbox.pids_limit,
                                 memory_limit_hits=memory.get("failcnt"))

        try:
            return await asyncio.to_thread(stats)
        except docker.errors.NotFound as exc:
            raise SandboxGone(f"container {sandbox_id[:12]} is gone") from exc
        except ENGINE_ERRORS as exc:
            raise SandboxError(f"stats failed: {why(exc)}") from exc

    async def close(self) -> None:
        if self._firewalled:
            def remove() -> None:
                with self._host.exclusive():
                    firewall.remove(self._instance)

            try:
                await asyncio.to_thread(remove)
            except HOST_ERRORS as exc:
                log.warning("could not remove this server's firewall rules (%s); the next server to start "
                            "removes them", exc)
        if self._client is not None:
            await asyncio.to_thread(self._client.close)

    def gateway_bind_host(self) -> str | None:
        return self._gateway_host

    async def create(self, spec: SandboxSpec) -> Sandbox:
        s = self._sandbox
        if spec.network_mode == "open" and not self._allow_open:
            raise SandboxError("network mode open is not enabled on this server", ErrorCode.NETWORK_MODE_NOT_ALLOWED)
        writable = "uid=1000,gid=1000,mode=0755,exec,nosuid,nodev"
        memory = s.memory_mb + s.workspace_mb + s.tmp_mb + 3 * s.home_mb
        kwargs: dict[str, Any] = {
            "image": spec.environment or s.image,
            "name": f"{NAME_PREFIX}{spec.run_id}",
            "labels": {LABEL: "1", LABEL_INSTANCE: self._instance, LABEL_RUN: spec.run_id, LABEL_USER: spec.user_id},
            "user": AGENT_USER,
            "init": True,
            "network": self._settings.network,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "nano_cpus": int(s.cpus * 1e9),
            "mem_limit": f"{memory}m",
            "memswap_limit": f"{memory}m",
            "pids_limit": s.pids_limit,
            "ulimits": [docker.types.Ulimit(name="nofile", soft=s.nofile, hard=s.nofile)],
            "read_only": True,
            "tmpfs": {
                "/workspace": f"size={s.workspace_mb}m,{writable}",
                "/tmp": f"size={s.tmp_mb}m,mode=1777,exec,nosuid,nodev",
                "/home/agent": f"size={s.home_mb}m,{writable}",  # mounted first: Docker orders by depth
                "/home/agent/.local": f"size={s.home_mb}m,{writable}",
                "/home/agent/.cache": f"size={s.home_mb}m,{writable}",
            },
            "environment": dict(spec.env),
            "working_dir": "/workspace",
            "detach": True,
            # whatever a sandbox writes to PID 1's stdout is discarded, never a file on the host's disk
            "log_config": docker.types.LogConfig(type=docker.types.LogConfig.types.NONE),
            # a connection whose packets are dropped (a firewall) fails after ~15 s instead of the
            # kernel's default ~130 s, so OpenCode reports and retries it well within
            # models.unreachable_timeout_s (the bridge to the host answers in well under a second)
            "sysctls": {"net.ipv4.tcp_syn_retries": str(TCP_SYN_RETRIES)},
        }

        if spec.network_mode != "open":
            kwargs["dns"] = ["127.0.0.1"]  # nothing answers there: names resolve only via /etc/hosts

        close_dns = self._close_dns and spec.network_mode != "open"  # open mode resolves names out

        def run() -> Container:
            container = self.client.containers.create(**kwargs)
            try:
                if spec.network_mode == "open":
                    self.client.networks.get(self._settings.open_network).connect(container)
                container.start()
                if close_dns:  # before anything of the agent's runs in it
                    container.reload()
                    firewall.block_dns(int(container.attrs["State"]["Pid"]))
                if spec.environment:
                    dockerenv.restore(self.client.api, str(container.id), AGENT_USER)
            except (docker.errors.APIError, firewall.FirewallError, RuntimeError):
                container.remove(force=True)
                raise
            return container

        try:
            container = await asyncio.to_thread(run)
        except firewall.FirewallError as exc:
            raise SandboxError(f"could not close Docker's DNS in a new sandbox: {exc}", ErrorCode.SANDBOX_START_FAILED) from exc
        except (*ENGINE_ERRORS, RuntimeError) as exc:
            raise SandboxError(f"could not start a sandbox: {why(exc)}", ErrorCode.SANDBOX_START_FAILED) from exc
        return DockerSandbox(self.client, container, self._settings.network)

    async def connect(self, sandbox_id: str) -> Sandbox | None:
        try:
            container = await asyncio.to_thread(self.client.containers.get, sandbox_id)
        except docker.errors.NotFound:
            return None
        except ENGINE_ERRORS as exc:
            raise SandboxError(f"could not look up sandbox {sandbox_id[:12]}: {why(exc)}") from exc
        if container.status != "running" or container.labels.get(LABEL_INSTANCE) != self._instance:
            return None
        return DockerSandbox(self.client, container, self._settings.network)

    async def destroy(self, sandbox_id: str) -> None:
        def remove() -> None:
            try:
                self.client.api.remove_container(sandbox_id, force=True, v=True)
            except docker.errors.NotFound:
                pass

        try:
            await asyncio.to_thread(remove)
        except ENGINE_ERRORS as exc:
            if "already in progress" not in str(exc):  # a concurrent remove finishes the job
                raise SandboxError(f"could not remove sandbox: {why(exc)}") from exc

    async def list_ours(self) -> list[SandboxInfo]:
        def listing() -> list[SandboxInfo]:
            # ignore_removed: one removed between the listing and its inspection (a pooled sandbox
            # whose start failed, a run's at its end) is simply not there, not an error
            found = self.client.containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}={self._instance}"},
                                                ignore_removed=True)
            return [SandboxInfo(str(c.id), c.labels.get(LABEL_RUN), c.status == "running", str(c.name)) for c in found]

        try:
            return await asyncio.to_thread(listing)
        except ENGINE_ERRORS as exc:
            raise SandboxError(f"could not list sandboxes: {why(exc)}") from exc
