"""E2B backend: one E2B cloud sandbox (Firecracker microVM) per run, from the template in
``sandboxes/e2b/``.

- Sandboxes are created with the run's id, user and our instance id in ``metadata`` (so a
  restarted server finds them with ``list``), a lifetime (``set_timeout`` keeps idle sessions
  alive until their expiry; ``kill`` ends them), and no public traffic: every request to a
  port inside needs the sandbox's traffic access token, which only the server holds.
- Commands run as the template's ``agent`` user. Background commands are started with
  ``timeout=0`` (the SDK's default 60 s would kill ``opencode serve``). A non-zero exit is an
  ``ExecResult``, not an exception.
- Network: mode ``none`` allows egress only to the model gateway's host
  (``e2b.gateway_url``, which must be reachable from E2B on port 80/443); ``open`` allows the
  internet when the operator enables it; ``restricted`` is refused, because E2B cannot report
  each connection to us the way the Docker backend's egress proxy does.

The SDK is imported lazily and can be replaced (``sdk=``) at this boundary: tests use a
stand-in that follows the SDK's documented behaviour.
"""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import logging
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import httpx

from critique_local.config import E2BSettings, SandboxSettings
from critique_local.errors import ErrorCode
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

log = logging.getLogger(__name__)
USER = "agent"
META_INSTANCE = "critique.instance"
META_RUN = "critique.run"
META_USER = "critique.user"
UPLOAD_PATH = "/tmp/critique-upload.tar"
TIMEOUT_EXIT = 137  # like `timeout --signal=KILL`


def _is_address(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


def _errors(sdk: ModuleType) -> tuple[type[Exception], ...]:
    """What the SDK raises when a call fails: its own exceptions, and its HTTP client's (httpx)
    or the OS's when E2B cannot be reached at all. All of them become SandboxErrors."""
    return (sdk.SandboxException, getattr(sdk, "AuthenticationException", sdk.SandboxException), httpx.HTTPError,
            OSError)


class E2BSandbox(Sandbox):
    def __init__(self, sdk: ModuleType, box: Any) -> None:
        self.sdk = sdk
        self.box = box
        self.id = str(box.sandbox_id)

    def _translate(self, exc: Exception) -> SandboxError:
        if isinstance(exc, (self.sdk.NotFoundException, getattr(self.sdk, "SandboxNotFoundException", ()))):
            return SandboxGone(f"E2B sandbox {self.id} is gone")
        return SandboxError(f"E2B: {exc}")

    async def exec(self, argv: list[str], *, cwd: str = "/workspace", env: Mapping[str, str] | None = None,
                   timeout_s: float = 60, max_output_bytes: int = 1_000_000) -> ExecResult:
        cmd = shlex.join(["timeout", "--signal=KILL", f"{max(1, int(timeout_s))}s", *argv])
        try:
            res = await self.box.commands.run(cmd, envs=dict(env or {}), cwd=cwd, user=USER, timeout=timeout_s + 30)
            code, out, err = res.exit_code, res.stdout, res.stderr
        except self.sdk.CommandExitException as exc:
            code, out, err = exc.exit_code, exc.stdout, exc.stderr
        except self.sdk.TimeoutException:
            return ExecResult(TIMEOUT_EXIT, b"", b"timed out", False)
        except _errors(self.sdk) as exc:
            raise self._translate(exc) from exc
        stdout, stderr = (out or "").encode(), (err or "").encode()
        truncated = len(stdout) > max_output_bytes or len(stderr) > max_output_bytes
        return ExecResult(int(code), stdout[:max_output_bytes], stderr[:max_output_bytes], truncated)

    async def read_file(self, path: str, max_bytes: int) -> bytes | None:
        try:
            data = await self.box.files.read(path, format="bytes", user=USER)
        except _errors(self.sdk) as exc:
            if isinstance(exc, getattr(self.sdk, "FileNotFoundException", ())):
                return None
            raise self._translate(exc) from exc
        return bytes(data) if len(data) <= max_bytes else None

    async def spawn(self, argv: list[str], *, env: Mapping[str, str], cwd: str, log_path: str) -> None:
        line = f"exec {shlex.join(argv)} >{shlex.quote(log_path)} 2>&1"
        try:
            await self.box.commands.run(f"bash -c {shlex.quote(line)}", background=True, timeout=0, envs=dict(env),
                                        cwd=cwd, user=USER)
        except _errors(self.sdk) as exc:
            raise self._translate(exc) from exc

    async def upload_tar(self, dest_dir: str, tar_path: Path) -> None:
        data = await asyncio.to_thread(tar_path.read_bytes)
        try:
            await self.box.files.write(UPLOAD_PATH, data, user=USER)
        except _errors(self.sdk) as exc:
            raise self._translate(exc) from exc
        res = await self.exec(["bash", "-c", f'tar -x -C "$1" -f {UPLOAD_PATH} && rm -f {UPLOAD_PATH}', "upload",
                               dest_dir], timeout_s=600)
        if not res.ok:
            raise SandboxError(f"upload into {dest_dir} failed: {res.stderr.decode(errors='replace')[-300:]}")

    async def endpoint(self, port: int) -> Endpoint:
        host = self.box.get_host(port)
        scheme = "http" if _is_address(host) else "https"
        token = getattr(self.box, "traffic_access_token", None)
        return Endpoint(f"{scheme}://{host}", {"e2b-traffic-access-token": token} if token else {})


class E2BBackend(SandboxBackend):
    name = "e2b"
    network_modes = frozenset({"none", "open"})

    def __init__(self, settings: E2BSettings, sandbox: SandboxSettings, instance_id: str, gateway_url: str,
                 allow_open: bool = False, sdk: ModuleType | None = None) -> None:
        self.settings = settings
        self._sandbox = sandbox
        self._instance = instance_id
        self._gateway_url = gateway_url
        self._allow_open = allow_open
        self._sdk = sdk

    @property
    def sdk(self) -> ModuleType:
        if self._sdk is None:
            try:
                self._sdk = importlib.import_module("e2b")
            except ImportError as exc:
                raise SandboxError("the e2b package is missing: pip install 'critique-local[e2b]'",
                                   ErrorCode.E2B_UNAVAILABLE) from exc
        return self._sdk

    def _api(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"api_key": self.settings.api_key or os.environ.get("E2B_API_KEY") or None}
        if self.settings.domain:
            opts["domain"] = self.settings.domain
        return opts

    async def start(self) -> None:
        if not (self.settings.api_key or os.environ.get("E2B_API_KEY")):
            raise SandboxError("sandbox.backend e2b needs e2b.api_key or E2B_API_KEY", ErrorCode.E2B_UNAVAILABLE)
        if not self._gateway_url:
            raise SandboxError("sandbox.backend e2b needs e2b.gateway_url: this server's /api/v1 as E2B sandboxes "
                               "reach it (https, port 443)", ErrorCode.E2B_UNAVAILABLE)
        _ = self.sdk

    async def close(self) -> None:
        return None

    def gateway_bind_host(self) -> str | None:
        return None

    def _network(self, mode: str) -> dict[str, Any]:
        if mode == "open":
            return {"allow_public_traffic": False}
        gateway = urlsplit(self._gateway_url).hostname or ""
        return {"allow_out": [gateway], "deny_out": [self.sdk.ALL_TRAFFIC], "allow_public_traffic": False}

    async def create(self, spec: SandboxSpec) -> Sandbox:
        if spec.network_mode == "restricted":
            raise SandboxError("network mode restricted is not available on the e2b backend (connections could "
                               "not be logged); use none or the docker backend", ErrorCode.NETWORK_MODE_NOT_SUPPORTED)
        if spec.network_mode == "open" and not self._allow_open:
            raise SandboxError("network mode open is not enabled on this server", ErrorCode.NETWORK_MODE_NOT_ALLOWED)
        metadata = {META_INSTANCE: self._instance, META_RUN: spec.run_id, META_USER: spec.user_id}
        try:
            box = await self.sdk.AsyncSandbox.create(
                template=spec.environment or self.settings.template, timeout=int(self._sandbox.turn_timeout_s + 600), metadata=metadata,
                envs=dict(spec.env), secure=True, allow_internet_access=spec.network_mode == "open",
                network=self._network(spec.network_mode), **self._api())
        except _errors(self.sdk) as exc:
            raise SandboxError(f"could not start an E2B sandbox: {exc}", ErrorCode.SANDBOX_START_FAILED) from exc
        return E2BSandbox(self.sdk, box)

    async def environment_base(self) -> str | None:
        return f"e2b:{self.settings.template}"

    async def save_environment(self, sandbox: Sandbox, name: str, max_bytes: int) -> tuple[str, int | None]:
        """An E2B snapshot of the set-up sandbox (the SDK's ``create_snapshot``); later sandboxes
        are created from its id. E2B does not report its size."""
        assert isinstance(sandbox, E2BSandbox)
        try:
            info = await sandbox.box.create_snapshot()
        except _errors(self.sdk) as exc:
            raise SandboxError(f"E2B create_snapshot failed: {exc}") from exc
        return str(info.snapshot_id), None

    async def delete_environment(self, ref: str) -> bool:
        try:
            await self.sdk.AsyncSandbox.delete_snapshot(ref, **self._api())  # False: gone already
            return True
        except _errors(self.sdk) as exc:
            raise SandboxError(f"E2B delete_snapshot failed: {exc}") from exc

    async def connect(self, sandbox_id: str) -> Sandbox | None:
        try:
            box = await self.sdk.AsyncSandbox.connect(sandbox_id, timeout=int(self._sandbox.turn_timeout_s + 600),
                                                      **self._api())
        except _errors(self.sdk) as exc:
            if isinstance(exc, (self.sdk.NotFoundException, getattr(self.sdk, "SandboxNotFoundException", ()))):
                return None
            raise SandboxError(f"E2B connect failed: {exc}") from exc
        return E2BSandbox(self.sdk, box)

    async def pause(self, sandbox_id: str) -> bool:
        """E2B's own pause (memory and filesystem kept; a paused sandbox costs nothing and does not
        time out); the next :meth:`resume` (``connect``) resumes it."""
        try:
            await self.sdk.AsyncSandbox.pause(sandbox_id, **self._api())
        except self.sdk.NotFoundException:
            return False
        except _errors(self.sdk) as exc:
            raise SandboxError(f"E2B pause failed: {exc}") from exc
        return True

    async def resume(self, sandbox_id: str) -> Sandbox | None:
        return await self.connect(sandbox_id)  # connecting to a paused sandbox resumes it

    async def destroy(self, sandbox_id: str) -> None:
        try:
            await self.sdk.AsyncSandbox.kill(sandbox_id, **self._api())
        except self.sdk.NotFoundException:
            pass
        except _errors(self.sdk) as exc:
            raise SandboxError(f"E2B kill failed: {exc}") from exc

    async def extend(self, sandbox_id: str, seconds: float) -> None:
        try:
            await self.sdk.AsyncSandbox.set_timeout(sandbox_id, int(seconds), **self._api())
        except self.sdk.NotFoundException as exc:
            raise SandboxGone(f"E2B sandbox {sandbox_id} is gone") from exc
        except _errors(self.sdk) as exc:
            raise SandboxError(f"E2B set_timeout failed: {exc}") from exc

    async def alive(self, sandbox_id: str) -> bool:
        try:
            info = await self.sdk.AsyncSandbox.get_info(sandbox_id, **self._api())
        except self.sdk.NotFoundException:
            return False
        except _errors(self.sdk):
            return True  # the API is not answering: undecided, ask again later
        return str(getattr(info.state, "value", info.state)) == "running"

    async def list_ours(self) -> list[SandboxInfo]:
        query = self.sdk.SandboxQuery(metadata={META_INSTANCE: self._instance})
        found: list[SandboxInfo] = []
        try:
            paginator = self.sdk.AsyncSandbox.list(query=query, **self._api())
            while True:
                for item in await paginator.next_items():
                    metadata = getattr(item, "metadata", None) or {}
                    found.append(SandboxInfo(str(item.sandbox_id), metadata.get(META_RUN), True))
                if not paginator.has_next:
                    return found
        except _errors(self.sdk) as exc:
            raise SandboxError(f"E2B list failed: {exc}") from exc
