"""The server's git runner (repos/git.py): output over its limit kills git, and the call ends."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from critique_local.repos.git import OutputTooLarge, clean_env, run_git_bytes


def big_blob(tmp_path: Path) -> str:
    """A repository at ``tmp_path/repo`` holding an 8 MB blob; its id."""
    blob = tmp_path / "big.bin"
    blob.write_bytes(os.urandom(8_000_000))
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    return subprocess.run(["git", "hash-object", "-w", str(blob)], cwd=tmp_path / "repo", check=True,
                          capture_output=True, text=True).stdout.strip()


async def test_output_over_the_limit_kills_git_and_returns(tmp_path: Path) -> None:
    # git writes far more than the limit: the reader stops early with output still in the pipe
    sha = big_blob(tmp_path)
    for _ in range(3):
        with pytest.raises(OutputTooLarge):
            # the bound only catches a hang (before the fix: Process.wait() never returned)
            await asyncio.wait_for(run_git_bytes(["cat-file", "blob", sha], tmp_path / "repo", clean_env(), 120,
                                                 max_bytes=100_000), 90)
    out = await run_git_bytes(["cat-file", "blob", sha], tmp_path / "repo", clean_env(), 120, max_bytes=10_000_000)
    assert len(out) == 8_000_000
