"""``make serve`` exactly as a new user runs it: in a clean copy of this tree (the files a fresh
clone would have, including uncommitted work), with no configuration file and every default,
reading the key and the commands it prints. Only the public port and the sandbox gateway port
are moved (a real ``make serve`` on 8787/8788 may be running on the same host), and the copy
reuses this checkout's virtualenv (a symlink; ``PYTHONPATH`` makes it import the copy's code)
instead of reinstalling it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import ROOT, free_port

READY = "critique-local listening on "
START_TIMEOUT_S = 300  # make + image check + server start on a loaded 2-core machine
GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}


def clean_copy(dest: Path) -> Path:
    """The tree as a fresh clone has it (tracked and untracked-but-not-ignored files), committed
    in a new repository at ``dest`` so that ``git status`` there shows what running it created."""
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode()
    for name in filter(None, listing.split("\0")):
        src = ROOT / name
        if not os.path.lexists(src) or src.is_dir():
            continue  # deleted in the working tree, or a nested repository
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name, follow_symlinks=False)
    env = {**os.environ, **GIT_ENV}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "clean copy"]):
        subprocess.run(["git", *args], cwd=dest, env=env, check=True, capture_output=True)
    (dest / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    # like the virtualenv, the web page's npm assets `make` installed here: the copy's make then
    # finds them current and never asks the npm registry (tests talk only to loopback)
    assets = ROOT / "critique_local/ui/node_modules"
    if assets.is_dir():
        (dest / "critique_local/ui/node_modules").symlink_to(assets, target_is_directory=True)
    # and the opencode binary the image build fetched from npm
    for fetched in (ROOT / ".cache").glob("opencode-*"):
        (dest / ".cache").mkdir(exist_ok=True)
        (dest / ".cache" / fetched.name).symlink_to(fetched, target_is_directory=True)
    return dest


@dataclass
class MadeServer:
    tree: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return (self.tree.parent / "make-serve.log").read_text(errors="replace")

    @property
    def key(self) -> str:
        found = re.search(r"^  export CRT_API_KEY=(\S+)$", self.output, re.M)
        assert found, self.output
        return found.group(1)

    def printed(self, after: str, lines: int) -> list[str]:
        """The ``lines`` command lines printed after the line ending with ``after`` (a command
        continued with a trailing backslash counts as one)."""
        text = self.output.split(after + "\n", 1)[1]
        commands = re.sub(r"\\\n\s*", "", text).splitlines()[:lines]
        return [line.strip() for line in commands]

    def git_status(self) -> str:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=self.tree,
                              capture_output=True, text=True, check=True, env={**os.environ, **GIT_ENV}).stdout

    def stop(self) -> None:
        """SIGTERM to make and the server (their own process group), then remove what the server
        left in Docker (an idle run's sandbox stays for the next start)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        instance = self.tree / ".critique-local" / "instance_id"
        if instance.exists():
            ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=critique.instance={instance.read_text().strip()}"],
                                 capture_output=True, text=True).stdout.split()
            if ids:
                subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)


def make_serve(base: Path) -> MadeServer:
    """Run ``make serve`` in a clean copy under ``base``; return once the server listens."""
    tree = clean_copy(base / "tree")
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CRITIQUE_LOCAL_") and k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PYTHONPATH")}
    env.update({"PYTHONPATH": str(tree), "CRITIQUE_LOCAL_SERVER_PORT": str(port),
                "CRITIQUE_LOCAL_DOCKER_GATEWAY_PORT": "0"})
    with (base / "make-serve.log").open("wb") as log:
        # -o: the (symlinked) virtualenv counts as installed; everything else runs as for a user
        proc = subprocess.Popen(["make", "-o", ".venv/.installed-stamp", "serve"], cwd=tree, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    made = MadeServer(tree, port, proc)
    deadline = time.monotonic() + START_TIMEOUT_S
    while READY not in made.output:
        if proc.poll() is not None or time.monotonic() > deadline:
            made.stop()
            raise RuntimeError(f"make serve did not start (exit {proc.returncode}):\n{made.output[-4000:]}")
        time.sleep(0.2)
    return made
