"""``python -m tests.durability_writer DB``: writes to a critique-local database as fast as it
can (events appended to a run from several tasks, run rows updated) and prints each write's
key once its transaction has committed, i.e. once the write is acknowledged. The durability
test kills it with SIGKILL at an arbitrary moment."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from critique_local.runs.spec import RunSpec
from critique_local.store import events, runs
from critique_local.store.db import Database
from critique_local.store.keys import ensure_user
from critique_local.tokens import new_id


async def main(path: Path) -> None:
    db = await Database.open(path)
    user = await ensure_user(db, "writer")
    repo = await runs.ensure_repository(db, new_id("repo"), "acme/durable", "local")
    run_ids = []
    for _ in range(4):
        new = runs.NewRun(id=new_id("run"), user_id=user, repository_id=repo, spec=RunSpec(), model_id="m",
                          task_kind="code", intent="other", base_ref=None, prompt="p")
        await runs.create_run(db, new, None)
        run_ids.append(new.id)
    print("ready", flush=True)

    async def writer(run_id: str) -> None:
        n = 0
        while True:
            n += 1
            row = await events.append(db, run_id, "builder.event", {"type": "text", "text": "x" * 200, "n": n})
            await runs.update_run(db, run_id, summary=f"after {n}")
            print(f"ack {run_id} {row.seq}", flush=True)

    await asyncio.gather(*(writer(r) for r in run_ids))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
