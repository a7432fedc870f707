"""Docker backend: one container per run on an internal network (no route out).

The container runs ``sleep infinity`` under Docker's init as the unprivileged ``agent`` user,
with all capabilities dropped, ``no-new-privileges`` and CPU/memory/pids limits. No host path
is mounted and the Docker socket never is. The server reaches OpenCode at the container's
address on the internal network; the container reaches the model gateway at that network's
gateway address, which is the only host address it can route to.

docker-py is blocking, so every call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from critique_local.config import DockerSettings, SandboxSettings
from critique_local.sandboxes.base import (
    Endpoint,
    ExecResult,
    Sandbox,
    SandboxBackend,
    SandboxError,
    SandboxGone,
    SandboxInfo,
    SandboxSpec,
)

LABEL = "critique.local"
LABEL_INSTANCE = "critique.instance"
LABEL_RUN = "critique.run"
LABEL_USER = "critique.user"
AGENT_USER = "1000:1000"


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
        return await asyncio.to_thread(self._exec_blocking, wrapped, cwd, dict(env or {}), max_output_bytes)

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
        except docker.errors.APIError as exc:
            raise SandboxError(f"exec failed: {exc.explanation or exc}") from exc
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
        except docker.errors.APIError as exc:
            raise SandboxError(f"spawn failed: {exc.explanation or exc}") from exc

    async def upload_tar(self, dest_dir: str, tar_path: Path) -> None:
        def put() -> bool:
            with tar_path.open("rb") as fh:
                return bool(self._container.put_archive(dest_dir, fh))

        try:
            if not await asyncio.to_thread(put):
                raise SandboxError(f"upload into {dest_dir} was refused")
        except docker.errors.APIError as exc:
            raise SandboxError(f"upload failed: {exc.explanation or exc}") from exc

    async def endpoint(self, port: int) -> Endpoint:
        await asyncio.to_thread(self._container.reload)
        networks = self._container.attrs["NetworkSettings"]["Networks"]
        address = networks.get(self._network, {}).get("IPAddress")
        if not address:
            raise SandboxError("container has no address on the sandbox network")
        return Endpoint(f"http://{address}:{port}")


class DockerBackend(SandboxBackend):
    name = "docker"

    def __init__(self, sandbox: SandboxSettings, settings: DockerSettings, instance_id: str) -> None:
        self._sandbox = sandbox
        self._settings = settings
        self._instance = instance_id
        self._client: docker.DockerClient | None = None
        self._gateway_host: str | None = None

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
                raise SandboxError(f"Docker engine not reachable: {exc}", "docker_unavailable") from exc
            self._client = client
            try:
                client.images.get(self._sandbox.image)
            except docker.errors.ImageNotFound as exc:
                raise SandboxError(
                    f"sandbox image {self._sandbox.image} is missing: run sandboxes/docker/build.sh", "image_missing"
                ) from exc
            try:
                net = client.networks.get(self._settings.network)
            except docker.errors.NotFound:
                net = client.networks.create(self._settings.network, driver="bridge", internal=True,
                                             labels={LABEL: "1"})
            if not net.attrs.get("Internal"):
                raise SandboxError(f"network {self._settings.network} exists but is not internal", "network_unsafe")
            return str(net.attrs["IPAM"]["Config"][0]["Gateway"])

        self._gateway_host = await asyncio.to_thread(setup)

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)

    def gateway_bind_host(self) -> str | None:
        return self._gateway_host

    async def create(self, spec: SandboxSpec) -> Sandbox:
        s = self._sandbox
        kwargs: dict[str, Any] = {
            "image": s.image,
            "name": f"critique-{spec.run_id}",
            "labels": {LABEL: "1", LABEL_INSTANCE: self._instance, LABEL_RUN: spec.run_id, LABEL_USER: spec.user_id},
            "user": AGENT_USER,
            "init": True,
            "network": self._settings.network,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "nano_cpus": int(s.cpus * 1e9),
            "mem_limit": f"{s.memory_mb}m",
            "memswap_limit": f"{s.memory_mb}m",
            "pids_limit": s.pids_limit,
            "ulimits": [docker.types.Ulimit(name="nofile", soft=4096, hard=4096)],
            "environment": dict(spec.env),
            "working_dir": "/workspace",
            "detach": True,
        }

        def run() -> Container:
            container = self.client.containers.create(**kwargs)
            try:
                container.start()
            except docker.errors.APIError:
                container.remove(force=True)
                raise
            return container

        try:
            container = await asyncio.to_thread(run)
        except docker.errors.APIError as exc:
            raise SandboxError(f"could not start a sandbox: {exc.explanation or exc}", "sandbox_start_failed") from exc
        return DockerSandbox(self.client, container, self._settings.network)

    async def connect(self, sandbox_id: str) -> Sandbox | None:
        try:
            container = await asyncio.to_thread(self.client.containers.get, sandbox_id)
        except docker.errors.NotFound:
            return None
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
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc):
                raise SandboxError(f"could not remove sandbox: {exc.explanation or exc}") from exc

    async def list_ours(self) -> list[SandboxInfo]:
        def listing() -> list[SandboxInfo]:
            found = self.client.containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}={self._instance}"})
            return [SandboxInfo(str(c.id), c.labels.get(LABEL_RUN), c.status == "running") for c in found]

        return await asyncio.to_thread(listing)
