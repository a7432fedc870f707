"""The pull request each publishing run opened (on a remote host, or kept here for
``git.local_root`` repositories)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from critique_local.clock import now_iso
from critique_local.store.db import Database, Read, Row


@dataclass(frozen=True)
class PullRequestRow:
    run_id: str
    host: str
    repository_full_name: str
    number: int
    url: str
    branch: str
    base_ref: str
    head_sha: str
    state: str
    draft: bool
    title: str
    body: str
    created_at: str
    updated_at: str


_COLUMNS = ("run_id, host, repository_full_name, number, url, branch, base_ref, head_sha, state, draft, title, body, "
            "created_at, updated_at")


def of_run_read(run_id: str) -> Read[PullRequestRow | None]:
    return Read(f"SELECT {_COLUMNS} FROM pull_requests WHERE run_id = ?", (run_id,),
                lambda rows: _pull(rows[0]) if rows else None)


async def of_run(db: Database, run_id: str) -> PullRequestRow | None:
    found: PullRequestRow | None = (await db.read(of_run_read(run_id)))[0]
    return found


def _pull(row: Row) -> PullRequestRow:
    return PullRequestRow(run_id=row[0], host=row[1], repository_full_name=row[2], number=int(row[3]), url=row[4],
                          branch=row[5], base_ref=row[6], head_sha=row[7], state=row[8], draft=bool(row[9]),
                          title=row[10], body=row[11], created_at=row[12], updated_at=row[13])


LOCAL = "local"  # ``host`` of a pull request kept here (a ``git.local_root`` repository)


async def save(db: Database, pr: PullRequestRow) -> PullRequestRow:
    """Insert or update the run's pull request; returns it as saved. A new local one (``host``
    :data:`LOCAL`, ``number`` 0) is numbered next in its repository (1, 2, ...) in the same
    transaction, so two runs publishing to one repository at once never share a number."""
    async with db.tx() as conn:
        if pr.host == LOCAL and pr.number == 0:
            cur = await conn.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM pull_requests WHERE host = ? AND "
                                     "repository_full_name = ?", (LOCAL, pr.repository_full_name))
            row = await cur.fetchone()
            pr = dataclasses.replace(pr, number=int(row[0]) if row else 1)
        await conn.execute(
            f"INSERT INTO pull_requests ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(run_id) DO UPDATE SET url = excluded.url, head_sha = excluded.head_sha, "
            "state = excluded.state, draft = excluded.draft, title = excluded.title, body = excluded.body, "
            "updated_at = excluded.updated_at",
            (pr.run_id, pr.host, pr.repository_full_name, pr.number, pr.url, pr.branch, pr.base_ref, pr.head_sha,
             pr.state, int(pr.draft), pr.title, pr.body, pr.created_at or now_iso(), now_iso()),
        )
    return pr
