"""The README's curl walk-through works as written: run verbatim against the server that
``make serve`` starts with every default (in a clean copy of the tree)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.helpers import ROOT
from tests.made_server import MadeServer

pytestmark = pytest.mark.e2e


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Walk-through", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return str(blocks[0])


def test_readme_walkthrough(made_server: MadeServer) -> None:
    env = {**os.environ, "BASE": made_server.url, "CRT_API_KEY": made_server.key}
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough()], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.count("Status: idle") == 2
    assert "event: builder.event" in out and "event: run.status" in out
    assert '"summary": "Added farewell.py with farewell(name)."' in out
    assert '"changedPaths": [\n    "farewell.py"\n  ]' in out
    assert "+    return f\\\"Goodbye, {name}!\\\"" in out
    assert "Goodbye, 42!" in out  # the agent's bash step ran the new code
    assert re.search(r"farewell\.py +\| +2 \+\+\n +test_farewell\.py +\| +4 \+{4}\n", out)  # the raw patch
    assert '"turnCount": 2' in out and '"Added test_farewell.py; it passes."' in out
    assert "1 passed" in out  # the follow-up's pytest ran in the same sandbox, next to turn 1's file
    assert '"status": "completed",\n  "lifecycle": "finished",\n  "terminal": true,\n  "sessionActive": false' in out
    resumed = out.split('"sessionActive": false\n}', 1)[1]
    assert "id: 5\n" not in resumed and "id: 6\n" in resumed  # ?after=5 resumes after event 5
