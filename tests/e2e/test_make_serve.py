"""The shipped defaults are a tested configuration: ``make serve`` in a clean copy of the tree,
no configuration file, and the commands it prints, run as printed from another directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.helpers import git, wait_for
from tests.made_server import MadeServer

pytestmark = pytest.mark.e2e
RUN_TIMEOUT_S = 300


def shell(command: str, cwd: Path, key: str) -> subprocess.CompletedProcess[str]:
    """``command`` as a user pastes it into bash, in ``cwd``, with CRT_API_KEY exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRITIQUE_LOCAL_")}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env={**env, "CRT_API_KEY": key},
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def test_the_printed_curl_runs_to_idle_with_a_patch(made_server: MadeServer, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"  # users paste the commands wherever their shell is
    elsewhere.mkdir()
    [create] = made_server.printed("Start a run:", 1)
    assert create.startswith("curl ") and "critique/scripted" in create
    created = shell(create, elsewhere, made_server.key)
    assert created.returncode == 0, created.stderr
    run_id = json.loads(created.stdout)["run"]["id"]

    watch, get_patch = (line.replace("RUN_ID", run_id) for line in made_server.printed('(RUN_ID: the "id" in the answer):', 2))
    watched = shell(watch, elsewhere, made_server.key)
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.rstrip().splitlines()[-1].startswith("== idle"), watched.stdout
    assert "tool bash completed" in watched.stdout and "tool write completed" in watched.stdout

    run = json.loads(shell(get_patch, elsewhere, made_server.key).stdout)["run"]
    assert run["status"] == "idle" and run["error"] is None
    assert run["changedPaths"] == ["hello.py"] and run["summary"] == "Added farewell(name) to hello.py; the tests pass."
    assert "+def farewell(name):" in run["patch"]
    events = httpx.get(f"{made_server.url}/api/v1/coding-agent/runs/{run_id}", params={"events": "1"},
                       headers={"Authorization": f"Bearer {made_server.key}"}).json()["run"]["events"]
    assert any("1 passed" in str(e["data"].get("output")) for e in events)  # the demo's tests ran in the sandbox

    clone = tmp_path / "clone"  # the patch applies to the demo repository that make serve created
    git("clone", "-q", str(made_server.tree / "repos" / "demo" / "hello.git"), str(clone))
    (tmp_path / "run.patch").write_text(run["patch"])
    git("apply", "--index", str(tmp_path / "run.patch"), cwd=clone)
    assert "Goodbye" in (clone / "hello.py").read_text()

    # make serve created state, a demo repository and a key: none of it shows in git status
    assert made_server.git_status() == ""
    # the paths it resolved, absolute, are in the start-up log
    log = made_server.output
    paths = re.search(r"paths: (.*)", log)
    assert paths is not None, log
    assert f"server.data_dir={made_server.tree}/.critique-local, " in paths.group(1)
    assert f"git.local_root={made_server.tree}/repos, " in paths.group(1)
    assert "configuration: no file" in log


def test_keys_made_from_another_directory_reach_the_servers_database(made_server: MadeServer, tmp_path: Path) -> None:
    hint = made_server.output.split("create more with: ", 1)[1].split("):\n", 1)[0]
    key = shell(hint.replace("NAME", "second"), tmp_path, "").stdout.strip().splitlines()[-1]
    with httpx.Client(base_url=made_server.url, headers={"Authorization": f"Bearer {key}"}) as api:
        assert api.get("/api/v1/coding-agent/runs").status_code == 200

    # run without the printed `cd`, the CLI works on the database of where it runs, and says so
    stray = subprocess.run([str(made_server.tree / ".venv" / "bin" / "critique-local"), "keys", "create", "--user",
                            "stray"], cwd=tmp_path, capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if not k.startswith("CRITIQUE_LOCAL_")})
    assert stray.returncode == 0 and f"no database at {tmp_path}/.critique-local/critique.db" in stray.stderr
    refused = httpx.get(f"{made_server.url}/api/v1/coding-agent/runs",
                        headers={"Authorization": f"Bearer {stray.stdout.strip().splitlines()[-1]}"})
    assert refused.status_code == 401



def test_publishing_and_validation_work_with_the_default_paths(made_server: MadeServer) -> None:
    """Publishing reads the turn's bundle from <data_dir>/tmp into a scratch repository (git runs
    there), then pushes to the repository under git.local_root: relative defaults broke both."""
    prompt = "Add a farewell.\n@write farewell.py\ndef farewell(name):\n    return name\n@end\n@say Added farewell.py."
    with httpx.Client(base_url=made_server.url, headers={"Authorization": f"Bearer {made_server.key}"},
                      timeout=30) as api:
        run = api.post("/api/v1/coding-agent/runs", json={
            "repository": "demo/hello", "prompt": prompt, "validationMode": "basic",
            "publish": {"mode": "draft_pr", "branch": "critique-agent/defaults"}}).json()["run"]
        done = wait_for(api, run["id"], {"idle", "failed"}, timeout_s=RUN_TIMEOUT_S)
        assert done["status"] == "idle" and done["error"] is None, done["error"]
        assert done["validation"]["status"] == "passed"
        pushed = git("--git-dir", str(made_server.tree / "repos" / "demo" / "hello.git"), "rev-parse",
                     "refs/heads/critique-agent/defaults")
        assert pushed == done["draftPullRequest"]["headSha"]
        api.post(f"/api/v1/coding-agent/runs/{run['id']}/messages", json={"endSession": True})
