"""One Docker sandbox: commands (``docker exec``), uploads, background processes and ports of
a running container; and the labels and error translation the Docker backend shares. The
container's hardening and networks are set up by :mod:`critique_local.sandboxes.docker`.

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

import docker
import docker.errors
from docker.models.containers import Container

from critique_local.sandboxes import dockerhost
from critique_local.sandboxes.base import Endpoint, ExecResult, Sandbox, SandboxError, SandboxGone

LABEL = dockerhost.LABEL
LABEL_INSTANCE = dockerhost.LABEL_INSTANCE
LABEL_RUN = "critique.run"
LABEL_USER = "critique.user"
AGENT_USER = "1000:1000"
# The engine refused (APIError) or could not be reached at all (requests' errors are OSErrors:
# the daemon stopped or is restarting): both are a SandboxError to the rest of the server.
ENGINE_ERRORS = (docker.errors.DockerException, OSError)
EXEC_GRACE_S = 30.0
TCP_SYN_RETRIES = 3  # connect gives up after 1 + 2 + 4 + 8 = 15 s
log = logging.getLogger(__name__)


def why(exc: BaseException) -> str:
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
            raise SandboxError(f"exec failed: {why(exc)}") from exc
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
            raise SandboxError(f"spawn failed: {why(exc)}") from exc

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
        """The container's address on the sandbox network, from what Docker last said about it
        (a running container keeps its address); inspected again only when that has none (a
        container described before it started)."""
        address = self._address()
        if not address:
            try:
                await asyncio.to_thread(self._container.reload)
            except docker.errors.NotFound as exc:
                raise SandboxGone(f"container {self.id[:12]} is gone") from exc
            except ENGINE_ERRORS as exc:
                raise SandboxError(f"could not inspect the sandbox: {why(exc)}") from exc
            address = self._address()
        if not address:
            raise SandboxError("container has no address on the sandbox network")
        return Endpoint(f"http://{address}:{port}")

    def _address(self) -> str | None:
        networks = (self._container.attrs.get("NetworkSettings") or {}).get("Networks") or {}
        address = (networks.get(self._network) or {}).get("IPAddress")
        return str(address) if address else None
