"""Docker environments: an image layered on the sandbox image that holds what setup left in a
sandbox's ``/workspace`` and home, as one tar file at :data:`ENV_TAR`.

A sandbox's writable places are tmpfs mounts (the root filesystem is read-only), so committing
the set-up container itself would keep nothing. Instead the set-up sandbox's workspace and home
are streamed out (``tar`` run inside it as the agent user), put into a created-never-started
container of the sandbox image, and that container is committed. The image's configuration is
the sandbox image's: setup's environment (where the repository's secrets are) is given to each
``exec`` and is never part of any container's configuration, so no image carries it. A sandbox
started from the image extracts the tar into its tmpfs mounts before anything else runs in it.

Blocking (docker-py): callers run these in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors

from critique_local.config import SandboxSettings
from critique_local.sandboxes.base import Sandbox, SandboxError

ENV_DIR = "opt/critique-env"
ENV_TAR = f"/{ENV_DIR}/env.tar"
REPOSITORY = "critique-local/env"
LABEL_ENV = "critique.env"
LABEL_KEY = "critique.env.key"
CHUNK = 1 << 20
AGENT_USER = "1000:1000"


class TooLarge(Exception):
    pass


def export(api: docker.APIClient, container_id: str, user: str, dest: Path, max_bytes: int) -> int:
    """Stream the sandbox's workspace and home (as ``tar`` inside it sees them, as ``user``)
    into ``dest``; returns its size. Raises TooLarge past ``max_bytes``, RuntimeError when tar
    fails."""
    exec_id = api.exec_create(container_id, ["tar", "-C", "/", "-cf", "-", "workspace", "home/agent"], user=user,
                              workdir="/")["Id"]
    size, err = 0, bytearray()
    with dest.open("wb") as fh:
        for out, errs in api.exec_start(exec_id, stream=True, demux=True):
            if out:
                size += len(out)
                if size > max_bytes:
                    raise TooLarge(f"the environment is larger than {max_bytes // 1_000_000} MB")
                fh.write(out)
            if errs and len(err) < 4096:
                err.extend(errs)
    code = api.exec_inspect(exec_id).get("ExitCode")
    if code != 0:
        raise RuntimeError(f"packing the environment failed ({code}): {err.decode(errors='replace')[-300:]}")
    return size


def _wrapped(tar_path: Path, size: int) -> Iterator[bytes]:
    """A tar stream holding ``tar_path`` as :data:`ENV_TAR` (root-owned, readable by all)."""
    folder = tarfile.TarInfo(ENV_DIR)
    folder.type, folder.mode = tarfile.DIRTYPE, 0o755
    yield folder.tobuf(tarfile.GNU_FORMAT)
    member = tarfile.TarInfo(ENV_TAR.lstrip("/"))
    member.size, member.mode = size, 0o644
    yield member.tobuf(tarfile.GNU_FORMAT)
    with tar_path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk
    yield b"\0" * ((512 - size % 512) % 512) + b"\0" * 1024


def commit(client: docker.DockerClient, base_image: str, tar_path: Path, size: int, tag: str,
           labels: dict[str, str]) -> str:
    """An image of ``base_image`` plus ``tar_path`` at :data:`ENV_TAR`; returns its id."""
    api = client.api
    # never started; created with the image's own command, which the commit keeps
    # (without our instance label: the orphan sweep would take a stopped container of ours for debris)
    helper = api.create_container(base_image, network_disabled=True, labels={LABEL_ENV: "helper"})["Id"]
    try:
        if not api.put_archive(helper, "/", _wrapped(tar_path, size)):
            raise RuntimeError("could not put the environment into its image")
        image = api.commit(helper, repository=REPOSITORY, tag=tag, conf={"Labels": labels})
        return str(image["Id"])
    finally:
        try:
            api.remove_container(helper, force=True)
        except docker.errors.APIError:
            pass


def restore(api: docker.APIClient, container_id: str, user: str) -> None:
    """Extract the environment into a new sandbox's workspace and home (before anything else
    runs in it). Raises RuntimeError when that fails."""
    exec_id = api.exec_create(container_id, ["tar", "-C", "/", "-xf", ENV_TAR], user=user, workdir="/")["Id"]
    out = api.exec_start(exec_id)
    code = api.exec_inspect(exec_id).get("ExitCode")
    if code != 0:
        raise RuntimeError(f"restoring the environment failed ({code}): {bytes(out).decode(errors='replace')[-300:]}")


def remove(client: docker.DockerClient, ref: str) -> bool:
    """Remove an environment image (True also when it is gone already); False while a container
    still uses it."""
    try:
        client.api.remove_image(ref)
        return True
    except docker.errors.NotFound:
        return True
    except docker.errors.APIError as exc:
        if exc.status_code == 409:  # in use by a sandbox
            return False
        raise


class DockerEnvironments:
    """The environment methods of the Docker backend (``SandboxBackend``'s optional ones)."""

    _sandbox: SandboxSettings
    _instance: str
    name = "docker"

    @property
    def client(self) -> docker.DockerClient:
        raise NotImplementedError

    async def environment_base(self) -> str | None:
        try:
            image = await asyncio.to_thread(self.client.api.inspect_image, self._sandbox.image)
        except (docker.errors.DockerException, OSError) as exc:
            raise SandboxError(f"could not inspect the sandbox image: {exc}") from exc
        return str(image["Id"])

    async def save_environment(self, sandbox: Sandbox, name: str, max_bytes: int) -> tuple[str, int | None]:
        labels = {LABEL_ENV: "1", LABEL_KEY: name, "critique.instance": self._instance}

        def save() -> tuple[str, int]:
            fd, raw = tempfile.mkstemp(prefix="critique-env-", suffix=".tar")
            os.close(fd)
            path = Path(raw)
            try:
                size = export(self.client.api, sandbox.id, AGENT_USER, path, max_bytes)
                return commit(self.client, self._sandbox.image, path, size, f"{self._instance}-{name[:24]}",
                              labels), size
            finally:
                path.unlink(missing_ok=True)

        try:
            return await asyncio.to_thread(save)
        except TooLarge as exc:
            raise SandboxError(str(exc)) from exc
        except (docker.errors.DockerException, OSError, RuntimeError) as exc:
            raise SandboxError(f"could not keep the environment: {exc}") from exc

    async def delete_environment(self, ref: str) -> bool:
        try:
            return await asyncio.to_thread(remove, self.client, ref)
        except (docker.errors.DockerException, OSError) as exc:
            raise SandboxError(f"could not remove environment image: {exc}") from exc
