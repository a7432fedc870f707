"""The work-tree snapshot's one command (``runs/snapshot.py``): run here with bash and git on a
scratch repository, as the sandbox runs it, and its output read back the way the server reads
it: free space first (a full workspace stops it before git), the pack on stdout, nothing left
in /tmp; and the pure parts (records, the pack after its marker, ``df`` output)."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import pytest

from critique_local.config import SandboxSettings
from critique_local.errors import ErrorCode, RunFailure
from critique_local.repos.checkout import NEUTRAL_ATTRIBUTES
from critique_local.runs.snapshot import SCRIPT, parse_records, split_pack
from critique_local.runs.watchdog import MIN_FREE_KB, Watchdog, full_of
from tests.helpers import git

MAX_PACK = 1_000_000


def snapshot_of(ws: Path, base_tree: str, *, max_pack: int = MAX_PACK, min_kb: int = 0,
                mounts: tuple[str, ...] = ()) -> tuple[int, dict[bytes, list[bytes]], bytes | None]:
    mounts = mounts or (str(ws),)
    res = subprocess.run(["bash", "-c", SCRIPT, "critique-snapshot", base_tree, NEUTRAL_ATTRIBUTES, str(max_pack),
                          str(min_kb), *mounts], cwd=ws, capture_output=True, check=False)
    head, pack = split_pack(res.stdout)
    return res.returncode, parse_records(head), pack


@pytest.fixture
def base(tmp_path: Path) -> tuple[Path, str]:
    ws = tmp_path / "ws"
    ws.mkdir()
    git("init", "-q", cwd=ws)
    (ws / "a.txt").write_bytes(b"one\n")
    (ws / "bin.dat").write_bytes(bytes(range(256)))
    git("add", "-A", cwd=ws)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "base", cwd=ws)
    return ws, git("rev-parse", "HEAD^{tree}", cwd=ws).strip()


def test_the_pack_comes_on_stdout_and_recreates_the_tree(base: tuple[Path, str], tmp_path: Path) -> None:
    ws, base_tree = base
    (ws / "a.txt").write_bytes(b"one\ntwo\r\n")
    (ws / os.fsdecode(b"new \xe9.bin")).write_bytes(b"\0PACKDATA\0\xff")  # a name that is not UTF-8
    code, records, pack = snapshot_of(ws, base_tree)
    assert code == 0, records
    assert records[b"BASETREE"] == [base_tree.encode()] and b"DF" in records and b"FULL" not in records
    assert pack is not None and len(pack) == int(records[b"PACKSIZE"][0]) > 0
    assert not Path(records[b"DIR"][0].decode()).exists()  # the script removed its folder
    # the server's side: a repository holding only the base indexes the thin pack, and has the tree
    server = tmp_path / "server.git"
    git("clone", "-q", "--bare", str(ws), str(server))
    subprocess.run(["git", "index-pack", "--strict", "--fix-thin", "--stdin"], cwd=server, input=pack, check=True,
                   capture_output=True)
    tree = records[b"TREE"][0].decode()
    listed = subprocess.run(["git", "ls-tree", "-r", "-z", tree], cwd=server, capture_output=True, check=True).stdout
    assert b"new \xe9.bin" in listed
    blob = next(e for e in listed.split(b"\0") if e.endswith(b"\tnew \xe9.bin")).split()[2].decode()
    assert subprocess.run(["git", "cat-file", "blob", blob], cwd=server, capture_output=True,
                          check=True).stdout == b"\0PACKDATA\0\xff"


def test_an_unchanged_tree_sends_an_empty_pack(base: tuple[Path, str]) -> None:
    ws, base_tree = base
    code, records, pack = snapshot_of(ws, base_tree)
    assert code == 0 and records[b"TREE"] == [base_tree.encode()]
    assert records[b"PACKSIZE"] == [b"0"] and pack == b""


def test_a_pack_over_the_limit_is_not_sent(base: tuple[Path, str]) -> None:
    ws, base_tree = base
    (ws / "big.txt").write_bytes(b"x" * 5000)
    code, records, pack = snapshot_of(ws, base_tree, max_pack=10)
    assert code == 0 and int(records[b"PACKSIZE"][0]) > 10 and pack is None


def test_a_full_workspace_stops_it_before_git(base: tuple[Path, str]) -> None:
    ws, base_tree = base
    code, records, pack = snapshot_of(ws, base_tree, min_kb=1 << 60)
    assert code == 0 and records[b"FULL"] == [str(ws).encode()] and pack is None
    assert b"DIR" not in records and b"TREE" not in records  # git never ran
    assert b"Available" in records[b"DF"][0]


def test_records_are_read_key_by_value() -> None:
    out = b"DIR\0/tmp/x\0NESTED\0PACKDATA\0NESTED\0a\0PACKSIZE\x003\0PACKDATA\0" + base64.b64encode(b"\0P\0")
    head, pack = split_pack(out)
    assert pack == b"\0P\0"
    assert parse_records(head) == {b"DIR": [b"/tmp/x"], b"NESTED": [b"PACKDATA", b"a"], b"PACKSIZE": [b"3"]}
    assert split_pack(b"DIR\0/tmp/x\0PACKSIZE\x009\0") == (b"DIR\0/tmp/x\0PACKSIZE\x009\0", None)
    assert split_pack(b"") == (b"", None)


def test_full_mounts_from_df_output() -> None:
    df = ("Filesystem 1024-blocks Used Available Capacity Mounted on\n"
          f"tmpfs 131072 131072 {MIN_FREE_KB - 1} 100% /workspace\n"
          "tmpfs 65536 10 65526 1% /tmp\n"
          "garbage line\n")
    assert full_of(df) == ["/workspace"]
    assert full_of("") == []
    check = Watchdog(None, SandboxSettings()).disk_check()  # type: ignore[arg-type]  # no backend needed
    assert check.mounts[0] == "/workspace" and check.min_free_kb == MIN_FREE_KB
    with pytest.raises(RunFailure) as failed:
        check.check(df)
    assert failed.value.code is ErrorCode.WORKSPACE_FULL
    check.check(df.replace(f" {MIN_FREE_KB - 1} 100% /workspace", " 5000 96% /workspace"))  # /tmp alone: no
