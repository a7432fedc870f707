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
import shlex
import socket
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from critique_local.config import DockerSettings, SandboxSettings
from critique_local.errors import ErrorCode
from critique_local.hoststate import HostLockTimeout, InstanceClaim
from critique_local.sandboxes import dockerenv, dockerhost, firewall
from critique_local.sandboxes.base import (
    Endpoint,
    ExecResult,
    ResourceUsage,
    Sandbox,
    SandboxBackend,
    SandboxError,
    SandboxGone,
    SandboxInfo,
    SandboxSpec,
)

LABEL = dockerhost.LABEL
LABEL_INSTANCE = dockerhost.LABEL_INSTANCE
LABEL_RUN = "critique.run"
LABEL_USER = "critique.user"
AGENT_USER = "1000:1000"
# The engine refused (APIError) or could not be reached at all (requests' errors are OSErrors:
# the daemon stopped or is restarting): both are a SandboxError to the rest of the server.
ENGINE_ERRORS = (docker.errors.DockerException, OSError)
HOST_ERRORS = (firewall.FirewallError, HostLockTimeout, OSError)  # iptables, nsenter, the host lock
EXEC_GRACE_S = 30.0
TCP_SYN_RETRIES = 3  # connect gives up after 1 + 2 + 4 + 8 = 15 s
log = logging.getLogger(__name__)


def _why(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc) if explanation or not isinstance(exc, OSError) else "the Docker engine is unreachable"


class DockerSandbox(Sandbox):
    def __init__(self, client: docker.DockerClient, container: Container, network: str) -> None:
        self._api = client.api
        self._container = container
        self._network = network
        self.id = str(container.id)

    async def exec(
        self,
        argv: list[str],
        *,
        cwd: str = "/workspace",
        env: Mapping[str, str] | None = None,
        timeout_s: float = 60,
        max_output_bytes: int = 1_000_000,
    ) -> ExecResult:
        wrapped = ["timeout", "--signal=KILL", f"{max(1, int(timeout_s))}s", *argv]
        try:
            # `timeout` ends the command, but a process that escaped its group (setsid) can hold
            # the output stream open: past this deadline the call is given up (its thread is
            # freed when the sandbox is removed, which closes the stream).
            return await asyncio.wait_for(
                asyncio.to_thread(self._exec_blocking, wrapped, cwd, dict(env or {}), max_output_bytes),
                timeout_s + EXEC_GRACE_S)
        except TimeoutError as exc:
            raise SandboxError(f"a command in the sandbox did not finish within {timeout_s:.0f} s "
                               "(a process kept its output open)") from exc

    def _exec_blocking(self, argv: list[str], cwd: str, env: dict[str, str], cap: int) -> ExecResult:
        api = self._api
        try:
            exec_id = api.exec_create(self.id, argv, user=AGENT_USER, workdir=cwd, environment=env)["Id"]
            out, err = bytearray(), bytearray()
            truncated = False
            for chunk_out, chunk_err in api.exec_start(exec_id, stream=True, demux=True):
                for buf, chunk in ((out, chunk_out), (err, chunk_err)):
                    if chunk:
                        room = cap - len(buf)
                        if len(chunk) > room:
                            truncated = True
                        buf.extend(chunk[: max(room, 0)])
            code = api.exec_inspect(exec_id).get("ExitCode")
        except docker.errors.NotFound as exc:
            raise SandboxGone(f"container {self.id[:12]} is gone") from exc
        except ENGINE_ERRORS as exc:
            raise SandboxError(f"exec failed: {_why(exc)}") from exc
        return ExecResult(int(code if code is not None else -1), bytes(out), bytes(err), truncated)

    async def spawn(self, argv: list[str], *, env: Mapping[str, str], cwd: str, log_path: str) -> None:
        line = f"exec {shlex.join(argv)} >{shlex.quote(log_path)} 2>&1"
        api = self._api

        def start() -> None:
            exec_id = api.exec_create(self.id, ["bash", "-c", line], user=AGENT_USER, workdir=cwd,
                                      environment=dict(env))["Id"]
            api.exec_start(exec_id, detach=True)

        try:
            await asyncio.to_thread(start)
        except docker.errors.NotFound as exc:
            raise SandboxGone(f"container {self.id[:12]} is gone") from exc
        except ENGINE_ERRORS as exc:
            raise SandboxError(f"spawn failed: {_why(exc)}") from exc

    async def upload_tar(self, dest_dir: str, tar_path: Path) -> None:
        """Streamed into ``tar -x`` inside the sandbox (the root filesystem is read-only and the
        workspace is a tmpfs, which Docker's archive API cannot write to)."""
        try:
            code, err = await asyncio.to_thread(self._stdin_exec, ["tar", "-x", "-C", dest_dir, "-f", "-"], tar_path)
        except docker.errors.NotFound as exc:
            raise SandboxGone(f"container {self.id[:12]} is gone") from exc
        except ENGINE_ERRORS as exc:
            raise SandboxError(f"upload failed: {exc}") from exc
        if code != 0:
            raise SandboxError(f"upload into {dest_dir} failed: {err.decode(errors='replace')[-300:]}")

    def _stdin_exec(self, argv: list[str], source: Path) -> tuple[int, bytes]:
        api = self._api
        exec_id = api.exec_create(self.id, argv, user=AGENT_USER, stdin=True, stdout=True, stderr=True)["Id"]
        sock = api.exec_start(exec_id, socket=True)
        raw: socket.socket = sock._sock  # type: ignore[union-attr]  # the hijacked connection to the daemon
        try:
            with source.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    raw.sendall(chunk)
            raw.shutdown(socket.SHUT_WR)
            err = bytearray()
            buf = b""
            while data := raw.recv(65536):
                buf += data
                while len(buf) >= 8:  # Docker's multiplexed stream: 8-byte header per frame
                    stream, size = buf[0], struct.unpack(">I", buf[4:8])[0]
                    if len(buf) < 8 + size:
                        break
                    if stream == 2 and len(err) < 65536:
                        err.extend(buf[8:8 + size])
                    buf = buf[8 + size:]
        finally:
            sock.close()
        code = api.exec_inspect(exec_id).get("ExitCode")
        return int(code if code is not None else -1), bytes(err)

    async def endpoint(self, port: int) -> Endpoint:
        try:
            await asyncio.to_thread(self._container.reload)
        except docker.errors.NotFound as exc:
            raise SandboxGone(f"container {self.id[:12]} is gone") from exc
        except ENGINE_ERRORS as exc:
            raise SandboxError(f"could not inspect the sandbox: {_why(exc)}") from exc
        networks = self._container.attrs["NetworkSettings"]["Networks"]
        address = networks.get(self._network, {}).get("IPAddress")
        if not address:
            raise SandboxError("container has no address on the sandbox network")
        return Endpoint(f"http://{address}:{port}")


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
        try:
            await asyncio.to_thread(dockerhost.reclaim, self.client, self._host, self._instance,
                                    rules=self._settings.host_firewall)
        except (*ENGINE_ERRORS, *HOST_ERRORS) as exc:
            log.warning("could not remove what stopped servers left on the host: %s", exc)

    async def adopt(self, sandbox_id: str, run_id: str) -> None:
        try:
            await asyncio.to_thread(self.client.api.rename, sandbox_id, f"critique-{run_id}")
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
            raise SandboxError(f"stats failed: {_why(exc)}") from exc

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
            "name": f"critique-{spec.run_id}",
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
            raise SandboxError(f"could not start a sandbox: {_why(exc)}", ErrorCode.SANDBOX_START_FAILED) from exc
        return DockerSandbox(self.client, container, self._settings.network)

    async def connect(self, sandbox_id: str) -> Sandbox | None:
        try:
            container = await asyncio.to_thread(self.client.containers.get, sandbox_id)
        except docker.errors.NotFound:
            return None
        except ENGINE_ERRORS as exc:
            raise SandboxError(f"could not look up sandbox {sandbox_id[:12]}: {_why(exc)}") from exc
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
                raise SandboxError(f"could not remove sandbox: {_why(exc)}") from exc

    async def list_ours(self) -> list[SandboxInfo]:
        def listing() -> list[SandboxInfo]:
            found = self.client.containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}={self._instance}"})
            return [SandboxInfo(str(c.id), c.labels.get(LABEL_RUN), c.status == "running") for c in found]

        try:
            return await asyncio.to_thread(listing)
        except ENGINE_ERRORS as exc:
            raise SandboxError(f"could not list sandboxes: {_why(exc)}") from exc
