"""The sandbox interface. A sandbox is a remote-style machine: we run commands in it, upload a
tarball into it, start background processes, and reach a port inside it over HTTP. Nothing here
assumes a shared filesystem with the server, so a cloud backend fits as well as Docker.

Errors from the underlying SDK are translated to :class:`SandboxError` (``errors.py``, a
:class:`~critique_local.errors.RunError` with an ``ErrorCode``) at the backend boundary:
every method below raises :class:`SandboxError` or, when the sandbox no longer exists,
:class:`SandboxGone`; nothing else escapes a backend except cancellation. Times
are in seconds (``*_s``), sizes in bytes (``*_bytes``), paths are inside the sandbox unless typed
:class:`~pathlib.Path` (a file on the server).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from critique_local.errors import SandboxError, SandboxGone

__all__ = ["SandboxError", "SandboxGone"]  # defined in errors.py (one exception tree); backends import them here


@dataclass(frozen=True)
class SandboxSpec:
    """What a new sandbox is made for: the run (``run_id``; ``pool-...`` for a warm-pool sandbox
    no run holds yet) and its user (labels, names shown to operators), extra environment
    variables of every process in it, its network mode and the kept environment it starts from."""

    run_id: str
    user_id: str
    env: Mapping[str, str] = field(default_factory=dict)
    network_mode: str = "none"  # none | restricted (no route out either way) | open (a route out)
    environment: str | None = None  # a kept environment's ref (``save_environment``) to start from


@dataclass(frozen=True)
class ResourceUsage:
    """What the sandbox uses against its limits (None when the backend cannot tell)."""

    pids: int | None = None
    pids_limit: int | None = None
    memory_limit_hits: int | None = None  # times the memory limit was reached


@dataclass(frozen=True)
class ExecResult:
    """A finished command: its exit code (non-zero also when it was killed at its timeout), its
    output as bytes (each at most the call's ``max_output_bytes``; ``truncated`` when more was
    dropped)."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class Endpoint:
    """How the server reaches a port inside the sandbox."""

    base_url: str
    headers: Mapping[str, str] = field(default_factory=dict)


POOL_PREFIX = "pool-"  # the run id a pooled sandbox is created (and labelled) with
NAME_PREFIX = "critique-"  # a Docker sandbox's name: critique-<run id> (a pooled one's: renamed when taken)


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox of this instance as :meth:`SandboxBackend.list_ours` finds it. ``run_id``: the
    run it was *created* for (its ``critique.run`` label or metadata): ``pool-<hex>`` for a pooled
    one, also after a run took it (labels cannot change); ``running``: else stopped or paused;
    ``name``: its name where the backend has names (Docker: ``critique-<run id>``, renamed to the
    run's when a run takes a pooled one). Whose it is now: :func:`run_of_sandbox`."""

    id: str
    run_id: str | None
    running: bool
    name: str | None = None


def run_of_sandbox(sandbox_id: str, created_for: str | None, bound: Mapping[str, str],
                   name: str | None = None) -> str | None:
    """The run a sandbox belongs to: the run our store binds it to (``runs.sandbox_id``, the one
    truth, also for a pooled sandbox a run took), else the run it was created for, else (a
    pooled sandbox a run took and no longer holds, e.g. after a restore gave it another) the run
    its name ``critique-<run id>`` names; None for a pooled sandbox no run took. ``bound``:
    sandbox id -> run id, from the store."""
    if sandbox_id in bound:
        return bound[sandbox_id]
    if created_for and not created_for.startswith(POOL_PREFIX):
        return created_for
    bare = (name or "").lstrip("/")  # Docker's API prefixes names with a slash
    named = bare[len(NAME_PREFIX):] if bare.startswith(NAME_PREFIX) else ""
    return named if named and not named.startswith(POOL_PREFIX) else None


class Sandbox(abc.ABC):
    """One running sandbox (a container, a cloud VM). ``id`` is the backend's id, stable across
    server restarts (:meth:`SandboxBackend.connect` reattaches by it)."""

    id: str

    @abc.abstractmethod
    async def exec(
        self,
        argv: list[str],
        *,
        cwd: str = "/workspace",
        env: Mapping[str, str] | None = None,
        timeout_s: float = 60,
        max_output_bytes: int = 1_000_000,
    ) -> ExecResult:
        """Run ``argv`` (no shell) to completion as the sandbox user in ``cwd`` with ``env`` added.
        Killed after ``timeout_s`` seconds (a non-zero exit code); output beyond
        ``max_output_bytes`` is dropped (``truncated`` says so). A non-zero exit is a result, not
        an error; SandboxError when the command could not be run or did not end even after it was
        killed, SandboxGone when the sandbox is gone."""

    @abc.abstractmethod
    async def spawn(self, argv: list[str], *, env: Mapping[str, str], cwd: str, log_path: str) -> None:
        """Start ``argv`` in the background (it outlives this call) with ``env`` in ``cwd``; its
        stdout and stderr go to the file ``log_path`` inside the sandbox. Returns once started;
        SandboxError when it could not be started."""

    @abc.abstractmethod
    async def upload_tar(self, dest_dir: str, tar_path: Path) -> None:
        """Extract the server-side tarball ``tar_path`` into ``dest_dir`` inside the sandbox (as the
        sandbox user). SandboxError when the upload or the extraction failed."""

    @abc.abstractmethod
    async def endpoint(self, port: int) -> Endpoint:
        """Where the server reaches TCP ``port`` inside the sandbox: a base URL (``http://host:port``)
        and headers every request must carry (e.g. a cloud backend's access token).
        SandboxError when the sandbox has no reachable address."""

    async def read_file(self, path: str, max_bytes: int) -> bytes | None:
        """A file's bytes (binary-safe), or None when it is missing or larger than ``max_bytes``."""
        res = await self.exec(["bash", "-c", 'test -f "$1" && test "$(stat -c %s "$1")" -le "$2" && cat "$1"',
                               "read", path, str(max_bytes)], timeout_s=120, max_output_bytes=max_bytes)
        return res.stdout if res.ok and not res.truncated else None


class SandboxBackend(abc.ABC):
    """Creates, finds and removes the sandboxes of one server instance (labelled with its
    instance id, so servers sharing a host or an account never touch each other's). Constructing
    a backend touches nothing; :meth:`start` is the first call that reaches the engine or cloud."""

    name: str
    network_modes: frozenset[str] = frozenset({"none", "restricted", "open"})  # safety.network modes it enforces

    @abc.abstractmethod
    async def start(self) -> None:
        """Prepare shared resources (networks, templates). Called once at server start; raises
        SandboxError (e.g. code ``docker_unavailable``, ``image_missing``) when sandboxes cannot
        be made."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release what :meth:`start` set up for this instance (sandboxes stay: warm sessions
        outlive a restart). Never raises for things already gone."""

    @abc.abstractmethod
    def gateway_bind_host(self) -> str | None:
        """An address the server should listen on so sandboxes reach the model gateway, or None
        when sandboxes reach the gateway through ``gateway_url`` configured elsewhere."""

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec) -> Sandbox:
        """A new running sandbox for ``spec`` (its environment, network mode and owner labels).
        SandboxError (code ``sandbox_start_failed``) when it cannot be started."""

    @abc.abstractmethod
    async def connect(self, sandbox_id: str) -> Sandbox | None:
        """Reattach to a live sandbox (e.g. after a restart); None when it is gone or stopped.
        SandboxError when the backend cannot tell (engine unreachable)."""

    @abc.abstractmethod
    async def destroy(self, sandbox_id: str) -> None:
        """Remove the sandbox (its processes and files); no error when it is already gone.
        SandboxError when the backend cannot be reached (the sweep tries again later)."""

    @abc.abstractmethod
    async def list_ours(self) -> list[SandboxInfo]:
        """Every sandbox this server instance created that still exists (running or stopped),
        with the run it was created for. SandboxError when the backend cannot list them."""

    async def extend(self, sandbox_id: str, seconds: float) -> None:  # noqa: B027 - optional
        """Keep the sandbox alive at least ``seconds`` more from now (remote sandboxes have a
        lifetime; the default does nothing). SandboxGone when it is gone, SandboxError when the
        backend refuses."""

    async def pause(self, sandbox_id: str) -> bool:
        """Pause the sandbox in place, keeping its memory and processes while they cost nothing
        (E2B); False when this backend cannot (Docker: the caller stops the agent's processes
        and keeps the sandbox, ``runs/pause.py``). SandboxError when pausing failed."""
        return False

    async def resume(self, sandbox_id: str) -> Sandbox | None:
        """A sandbox paused by :meth:`pause`, running again; None when it is gone. SandboxError
        when the backend cannot tell."""
        return None

    async def adopt(self, sandbox_id: str, run_id: str) -> None:  # noqa: B027 - optional
        """A pooled sandbox now belongs to ``run_id`` (for names shown to operators)."""

    async def usage(self, sandbox_id: str) -> ResourceUsage:
        """Resource use against the sandbox's limits, for the run watchdog (fields None where the
        backend cannot tell). SandboxGone when the sandbox is gone."""
        return ResourceUsage()

    async def alive(self, sandbox_id: str) -> bool:
        """Whether the sandbox still runs (True when the backend cannot tell cheaply)."""
        return True

    # ---- environments (``envs/``): optional; a backend without them runs setup in every sandbox

    async def environment_base(self) -> str | None:
        """What environments of this backend are layered on (image id, template), for their key;
        None when the backend cannot keep environments."""
        return None

    async def save_environment(self, sandbox: Sandbox, name: str, max_bytes: int) -> tuple[str, int | None]:
        """Keep ``sandbox``'s ``/workspace`` and home as an environment later sandboxes start from
        (``SandboxSpec.environment``); returns (ref, size in bytes or None). Raises SandboxError,
        also when the contents exceed ``max_bytes``."""
        raise SandboxError(f"the {self.name} backend cannot keep environments")

    async def delete_environment(self, ref: str) -> bool:
        """Remove a kept environment (True also when it was gone already); False while a sandbox
        still uses it (it is tried again at the next eviction)."""
        return True

    async def restrict_host(self, ports: list[int]) -> None:  # noqa: B027 - optional: remote backends have no host
        """Let sandboxes reach only these TCP ports of the host (the gateway, the egress proxy).
        Never raises: rules that cannot be put in place are logged as a warning."""

    async def reclaim_host(self) -> None:  # noqa: B027 - optional: remote backends have no host
        """Remove what other server instances left on this host once they are proven gone
        (never raises: problems are logged and the next sweep tries again)."""
