"""A stand-in for the ``e2b`` SDK at its boundary, following E2B's documented behaviour, with
each "sandbox" a local Docker container of our sandbox image on a network this module
creates. It is installed as ``sys.modules["e2b"]`` in a test server process
(``python -m tests.e2b_serve``), so the real E2B backend code runs every path against it:

- ``AsyncSandbox.create`` needs an API key and a known template; the sandbox is killed when its
  timeout passes unless ``set_timeout``/``connect`` extends it.
- ``commands.run`` runs ``bash -l -c CMD`` as the given user; a non-zero exit raises
  ``CommandExitException``; exceeding ``timeout`` (default 60 s) raises ``TimeoutException`` and
  kills the command, background commands included, unless ``timeout=0``.
- ``create_snapshot`` (a sandbox's filesystem kept: a Docker commit of its container; E2B also
  keeps memory, which a stand-in container cannot), ``AsyncSandbox.create(<snapshot id>)``
  starts from it, ``AsyncSandbox.delete_snapshot`` (False when unknown).
- ``files.write``/``files.read`` (``FileNotFoundException``), ``get_host``, ``kill`` (False
  when unknown), ``connect`` (``NotFoundException`` when gone), ``list`` with a metadata query
  and a paginator.

Every call is appended to ``CALLS`` (and, when ``E2B_STANDIN_LOG`` names a file, written there
as JSON lines) so tests can check what the backend asked for.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import shlex
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors

ALL_TRAFFIC = "0.0.0.0/0"
NETWORK = "critique-e2b-standin"
IMAGE = os.environ.get("E2B_STANDIN_IMAGE", "critique-local/sandbox:latest")
TEMPLATES = {"critique-local-opencode"}
LABEL = "critique.e2b-standin"
SNAPSHOT_LABEL = "critique.e2b-standin.snapshot"
SNAPSHOT_REPOSITORY = "critique-e2b-standin-snapshot"
CALLS: list[dict[str, Any]] = []


class SandboxException(Exception):
    pass


class AuthenticationException(SandboxException):
    pass


class NotFoundException(SandboxException):
    pass


class SandboxNotFoundException(NotFoundException):
    pass


class FileNotFoundException(NotFoundException):
    pass


class TimeoutException(SandboxException):
    pass


class CommandExitException(SandboxException):
    def __init__(self, stderr: str, stdout: str, exit_code: int, error: str | None) -> None:
        super().__init__(f"command exited with {exit_code}: {stderr[-200:]}")
        self.stderr, self.stdout, self.exit_code, self.error = stderr, stdout, exit_code, error


@dataclass
class SandboxQuery:
    metadata: dict[str, str] | None = None
    state: list[str] | None = None


@dataclass
class CommandResult:
    stderr: str
    stdout: str
    exit_code: int
    error: str | None = None


@dataclass
class SnapshotInfo:
    snapshot_id: str


def _snapshot_image(snapshot_id: str) -> str | None:
    found = _client().images.list(filters={"label": f"{SNAPSHOT_LABEL}={snapshot_id}"})
    return str(found[0].id) if found else None


@dataclass
class SandboxInfo:
    sandbox_id: str
    template_id: str
    metadata: dict[str, str] = field(default_factory=dict)
    state: str = "running"  # the SDK's SandboxState is a str enum: "running" | "paused"


def _record(call: str, **details: Any) -> None:
    entry = {"call": call, "at": time.time(), **details}
    CALLS.append(entry)
    path = os.environ.get("E2B_STANDIN_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")


def _client() -> docker.DockerClient:
    return docker.from_env(timeout=120)


def network_gateway() -> str:
    """Create (once) the stand-in's internal network; its gateway address reaches the host."""
    client = _client()
    try:
        net = client.networks.get(NETWORK)
    except docker.errors.NotFound:
        net = client.networks.create(NETWORK, driver="bridge", internal=True, labels={LABEL: "1"})
    return str(net.attrs["IPAM"]["Config"][0]["Gateway"])


_deadlines: dict[str, float] = {}
_reaper: asyncio.Task[None] | None = None


async def _reap() -> None:
    while True:
        await asyncio.sleep(0.5)
        now = time.monotonic()
        for sid, deadline in list(_deadlines.items()):
            if deadline <= now:
                _deadlines.pop(sid, None)
                _record("expired", sandbox_id=sid)
                await asyncio.to_thread(_remove, sid)


def _remove(sid: str) -> bool:
    try:
        _client().api.remove_container(sid, force=True)
        return True
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as exc:
        if "already in progress" in str(exc):
            return True
        raise SandboxException(str(exc)) from exc


def _require_key(opts: dict[str, Any]) -> None:
    if not (opts.get("api_key") or os.environ.get("E2B_API_KEY")):
        raise AuthenticationException("API key is required")


def _container(sid: str) -> Any:
    try:
        container = _client().containers.get(sid)
    except docker.errors.NotFound as exc:
        raise SandboxNotFoundException(f"sandbox {sid} not found") from exc
    if container.status != "running":
        raise SandboxNotFoundException(f"sandbox {sid} is not running")
    return container


class Commands:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self.sandbox = sandbox

    async def run(self, cmd: str, background: bool | None = None, envs: dict[str, str] | None = None,
                  user: str | None = None, cwd: str | None = None, timeout: float | None = 60,
                  **_: Any) -> Any:
        _record("commands.run", sandbox_id=self.sandbox.sandbox_id, cmd=cmd[:300], background=bool(background),
                timeout=timeout, user=user, cwd=cwd)
        api = _client().api
        tag = secrets.token_hex(6)
        wrapped = f"echo $$ > /tmp/.standin-{tag}.pid; exec bash -l -c {shlex.quote(cmd)}"
        try:
            exec_id = api.exec_create(self.sandbox.sandbox_id, ["bash", "-c", wrapped], user=user or "agent",
                                      workdir=cwd, environment=dict(envs or {}))["Id"]
        except docker.errors.NotFound as exc:
            raise SandboxNotFoundException(str(exc)) from exc
        except docker.errors.APIError as exc:  # e.g. 409 "is not running": E2B says not found
            raise SandboxNotFoundException(f"sandbox {self.sandbox.sandbox_id} not found: {exc}") from exc
        if background:
            await asyncio.to_thread(api.exec_start, exec_id, detach=True)
            if timeout:  # E2B's command timeout applies to background commands too
                asyncio.get_running_loop().call_later(
                    timeout, lambda: asyncio.ensure_future(self._kill(tag)))
            return None

        def run_blocking() -> tuple[bytes, bytes]:
            out, err = api.exec_start(exec_id, demux=True)
            return out or b"", err or b""

        task = asyncio.ensure_future(asyncio.to_thread(run_blocking))
        try:
            out, err = await asyncio.wait_for(asyncio.shield(task), timeout) if timeout else await task
        except TimeoutError as exc:
            await self._kill(tag)
            raise TimeoutException(f"command timed out after {timeout}s") from exc
        code = int(api.exec_inspect(exec_id).get("ExitCode") or 0)
        result = CommandResult(err.decode(errors="replace"), out.decode(errors="replace"), code)
        if code != 0:
            raise CommandExitException(result.stderr, result.stdout, code, None)
        return result

    async def _kill(self, tag: str) -> None:
        def kill() -> None:
            try:
                _client().api.exec_start(_client().api.exec_create(
                    self.sandbox.sandbox_id, ["bash", "-c", f"kill -9 $(cat /tmp/.standin-{tag}.pid) 2>/dev/null"],
                    user="root")["Id"])
            except docker.errors.APIError:
                pass

        _record("commands.kill", sandbox_id=self.sandbox.sandbox_id)
        await asyncio.to_thread(kill)


class Files:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self.sandbox = sandbox

    async def write(self, path: str, data: str | bytes, user: str | None = None, **_: Any) -> None:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        _record("files.write", sandbox_id=self.sandbox.sandbox_id, path=path, size=len(raw))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(os.path.basename(path))
            info.size, info.uid, info.gid, info.mode = len(raw), 1000, 1000, 0o644
            tar.addfile(info, io.BytesIO(raw))
        container = await asyncio.to_thread(_container, self.sandbox.sandbox_id)
        await asyncio.to_thread(container.put_archive, os.path.dirname(path) or "/", buf.getvalue())

    async def read(self, path: str, format: str = "text", user: str | None = None, **_: Any) -> Any:
        _record("files.read", sandbox_id=self.sandbox.sandbox_id, path=path)
        container = await asyncio.to_thread(_container, self.sandbox.sandbox_id)

        def get() -> bytes:
            try:
                stream, _ = container.get_archive(path)
            except docker.errors.NotFound as exc:
                raise FileNotFoundException(f"{path} not found") from exc
            with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                member = tar.getmembers()[0]
                extracted = tar.extractfile(member)
                return extracted.read() if extracted else b""

        data = await asyncio.to_thread(get)
        return data if format == "bytes" else data.decode()


class _Paginator:
    def __init__(self, items: list[SandboxInfo]) -> None:
        self._items = items
        self.has_next = True

    async def next_items(self) -> list[SandboxInfo]:
        self.has_next = False
        return self._items


class AsyncSandbox:
    def __init__(self, sandbox_id: str, ip: str) -> None:
        self.sandbox_id = sandbox_id
        self._ip = ip
        self.traffic_access_token = secrets.token_hex(16)
        self.commands = Commands(self)
        self.files = Files(self)

    def get_host(self, port: int) -> str:
        return f"{self._ip}:{port}"

    @classmethod
    async def create(cls, template: str | None = None, timeout: int | None = None,
                     metadata: dict[str, str] | None = None, envs: dict[str, str] | None = None,
                     secure: bool | None = None, allow_internet_access: bool | None = None,
                     network: dict[str, Any] | None = None, **opts: Any) -> AsyncSandbox:
        global _reaper
        _require_key(opts)
        _record("create", template=template, timeout=timeout, metadata=metadata, network=network,
                allow_internet_access=allow_internet_access, secure=secure)
        image = IMAGE if template in TEMPLATES else await asyncio.to_thread(_snapshot_image, str(template))
        if image is None:
            raise NotFoundException(f"template {template} not found")
        await asyncio.to_thread(network_gateway)

        def start() -> tuple[str, str]:
            container = _client().containers.run(
                image, ["sleep", "infinity"], detach=True, init=True, network=NETWORK, environment=dict(envs or {}),
                labels={LABEL: "1", **{f"meta.{k}": v for k, v in (metadata or {}).items()}})
            container.reload()
            return str(container.id), str(container.attrs["NetworkSettings"]["Networks"][NETWORK]["IPAddress"])

        sid, ip = await asyncio.to_thread(start)
        _deadlines[sid] = time.monotonic() + (timeout or 300)
        if _reaper is None or _reaper.done():
            _reaper = asyncio.create_task(_reap())
        return cls(sid, ip)

    async def create_snapshot(self, **opts: Any) -> SnapshotInfo:
        snapshot_id = f"snap-{secrets.token_hex(8)}"
        _record("create_snapshot", sandbox_id=self.sandbox_id, snapshot_id=snapshot_id)

        def commit() -> None:
            container = _container(self.sandbox_id)
            container.commit(repository=SNAPSHOT_REPOSITORY, tag=snapshot_id,
                             conf={"Labels": {SNAPSHOT_LABEL: snapshot_id}})

        await asyncio.to_thread(commit)
        return SnapshotInfo(snapshot_id)

    @classmethod
    async def delete_snapshot(cls, snapshot_id: str, **opts: Any) -> bool:
        _require_key(opts)
        _record("delete_snapshot", snapshot_id=snapshot_id)

        def remove() -> bool:
            image = _snapshot_image(snapshot_id)
            if image is None:
                return False
            _client().images.remove(image, force=True)
            return True

        return await asyncio.to_thread(remove)

    @classmethod
    async def pause(cls, sandbox_id: str, **opts: Any) -> bool:
        """As the SDK's ``AsyncSandbox.pause(sandbox_id)``: memory and filesystem are kept (here:
        the container is frozen); ``connect`` resumes it."""
        _require_key(opts)
        _record("pause", sandbox_id=sandbox_id)

        def freeze() -> bool:
            _container(sandbox_id).pause()
            return True
        return await asyncio.to_thread(freeze)

    @classmethod
    async def connect(cls, sandbox_id: str, timeout: int | None = None, **opts: Any) -> AsyncSandbox:
        _require_key(opts)
        _record("connect", sandbox_id=sandbox_id, timeout=timeout)

        def resume() -> Any:
            try:
                found = _client().containers.get(sandbox_id)
            except docker.errors.NotFound as exc:
                raise SandboxNotFoundException(f"sandbox {sandbox_id} not found") from exc
            if found.status == "paused":
                found.unpause()
                _record("resume", sandbox_id=sandbox_id)
            return _container(sandbox_id)
        container = await asyncio.to_thread(resume)
        _deadlines[sandbox_id] = time.monotonic() + (timeout or 300)
        return cls(sandbox_id, str(container.attrs["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]))

    @classmethod
    async def kill(cls, sandbox_id: str, **opts: Any) -> bool:
        _require_key(opts)
        _record("kill", sandbox_id=sandbox_id)
        _deadlines.pop(sandbox_id, None)
        return await asyncio.to_thread(_remove, sandbox_id)

    @classmethod
    async def set_timeout(cls, sandbox_id: str, timeout: int, **opts: Any) -> None:
        _require_key(opts)
        _record("set_timeout", sandbox_id=sandbox_id, timeout=timeout)
        await asyncio.to_thread(_container, sandbox_id)
        _deadlines[sandbox_id] = time.monotonic() + timeout

    @classmethod
    async def get_info(cls, sandbox_id: str, **opts: Any) -> SandboxInfo:
        """As the SDK: ``SandboxNotFoundException`` once a sandbox is killed or expired."""
        _require_key(opts)
        _record("get_info", sandbox_id=sandbox_id)
        container = await asyncio.to_thread(_container, sandbox_id)
        meta = {k[5:]: v for k, v in container.labels.items() if k.startswith("meta.")}
        return SandboxInfo(sandbox_id, "critique-local-opencode", meta)

    @classmethod
    def list(cls, query: SandboxQuery | None = None, **opts: Any) -> _Paginator:
        _require_key(opts)
        wanted = (query.metadata if query else None) or {}
        found = []
        for c in _client().containers.list(filters={"label": LABEL}):
            meta = {k[5:]: v for k, v in c.labels.items() if k.startswith("meta.")}
            if all(meta.get(k) == v for k, v in wanted.items()):
                found.append(SandboxInfo(str(c.id), "critique-local-opencode", meta))
        return _Paginator(found)
