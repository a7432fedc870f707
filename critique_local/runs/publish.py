"""``publish.mode: draft_pr``: a turn's changes become a commit on a branch and a draft pull
request.

What is pushed is built by the server from exactly what the run reports: the turn's tree was
read out of the sandbox as git objects into the run's own repository on the server (checked
by ``index-pack --strict``; see ``runs/collect.py``), the run's patch is the server's diff of
that tree against the base, and the commit is made here, after the turn, with ``git
commit-tree`` of that same tree (parent = the base commit or the run's previous published
commit, author and committer from config). Nothing the agent does afterwards, and nothing in
the sandbox's git configuration, can change it. The server pushes it with its own
credentials; the sandbox never holds a token. Pushes are never forced: if someone else moved
the branch, publishing fails instead of overwriting.

For ``git.local_root`` repositories the branch is pushed to the bare repository and the pull
request record is kept by us (``run.draftPullRequest``), so air-gapped installs still get a
reviewable branch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx

from critique_local.errors import RunFailure
from critique_local.repos.git import run_git
from critique_local.repos.hosts import HostError, Source
from critique_local.repos.names import branch_problem, protected_pattern, slug
from critique_local.repos.workrepo import SAFE_ENV, RunRepo
from critique_local.runs.collect import TurnResult
from critique_local.runs.validate import ValidationResult
from critique_local.services import Services
from critique_local.store import pulls
from critique_local.store import runs as runs_store
from critique_local.store.pulls import PullRequestRow
from critique_local.store.runs import RunRow


class PublishError(Exception):
    def __init__(self, message: str, head_sha: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.head_sha = head_sha  # set when the branch was pushed but the pull request step failed


@dataclass(frozen=True)
class PublishOutcome:
    status: str  # published | skipped | failed
    message: str
    branch: str | None = None
    head_sha: str | None = None
    number: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "branch": self.branch, "headSha": self.head_sha,
                "pullRequestNumber": self.number}


def default_branch(prefix: str, run: RunRow, first_prompt: str) -> str:
    text = run.spec.title or first_prompt
    return f"{prefix}{slug(text)}-{run.id.removeprefix('run_')[:8]}"


def title_of(run: RunRow, first_prompt: str) -> str:
    text = (run.spec.title or "").strip()
    if not text:
        lines = [ln.strip() for ln in first_prompt.splitlines() if ln.strip() and not ln.startswith("@")]
        text = lines[0] if lines else f"critique-local run {run.id}"
    return text if len(text) <= 72 else text[:71] + "…"


def pr_body(run: RunRow, run_url: str, turn_idx: int, summary: str | None, result: TurnResult,
            validation: ValidationResult | None) -> str:
    stats = result.diff_stats
    lines = [
        f"Opened by critique-local for run [`{run.id}`]({run_url}) (turn {turn_idx}, model `{run.model_id}`).",
        "",
    ]
    if summary:
        lines += ["### Summary", "", summary.strip()[:4000], ""]
    lines += ["### Changes", "",
              f"{stats['filesChanged']} file(s) changed, +{stats['additions']} -{stats['deletions']}", ""]
    lines += [f"- `{p}`" for p in result.changed_paths[:200]]
    if len(result.changed_paths) > 200:
        lines.append(f"- … and {len(result.changed_paths) - 200} more")
    lines += ["", "### Validation", ""]
    if validation is None:
        lines.append("validationMode `minimal`: no checks were run.")
    else:
        mark = {"passed": "✅ passed", "failed": "❌ failed", "skipped": "⚠️ skipped"}[validation.status]
        lines.append(f"validationMode `{validation.mode}`: **{mark}**"
                     + (f" — `{validation.command}` exited {validation.exit_code} in {validation.duration_ms} ms"
                        if validation.command else "")
                     + (f" after {validation.repair_turns} repair turn(s)" if validation.repair_turns else ""))
        if validation.output_tail.strip():
            tail = validation.output_tail.strip()[-3000:].replace("```", "'''")
            lines += ["", "<details><summary>Output (tail)</summary>", "", "```", tail, "```", "", "</details>"]
    return "\n".join(lines) + "\n"


class Publisher:
    def __init__(self, services: Services) -> None:
        self.s = services

    async def publish(self, run: RunRow, repo: RunRepo, turn_idx: int, publish: dict[str, Any],
                      first_prompt: str, summary: str | None, result: TurnResult,
                      validation: ValidationResult | None) -> PublishOutcome:
        existing = await pulls.of_run(self.s.db, run.id)
        branch = existing.branch if existing else (
            publish.get("branch") or default_branch(self.s.settings.publish.branch_prefix, run, first_prompt))
        try:
            return await self._publish(run, repo, turn_idx, branch, existing, first_prompt, summary, result,
                                       validation)
        except PublishError as exc:
            return PublishOutcome("failed", exc.message, branch, exc.head_sha)
        except (HostError, RunFailure) as exc:
            return PublishOutcome("failed", exc.message, branch)
        except TimeoutError:
            return PublishOutcome("failed", f"pushing took longer than publish.timeout_s "
                                  f"({self.s.settings.publish.timeout_s:.0f} s)", branch)
        except httpx.HTTPError as exc:
            return PublishOutcome("failed", f"the git host did not answer: {exc.__class__.__name__}: {exc}", branch)

    async def _publish(self, run: RunRow, repo: RunRepo, turn_idx: int, branch: str,
                       existing: PullRequestRow | None, first_prompt: str, summary: str | None, result: TurnResult,
                       validation: ValidationResult | None) -> PublishOutcome:
        settings = self.s.settings.publish
        source = self.s.hosts.resolve(run.repository_full_name)
        if source is None:
            raise PublishError(f"repository {run.repository_full_name} is no longer available")
        base = run.base_branch
        if not base:
            raise PublishError(f"the base ref {run.base_ref!r} is not a branch; a pull request needs a base branch")
        if problem := branch_problem(branch):
            raise PublishError(f"branch {branch!r} {problem}")
        if branch == base:
            raise PublishError(f"refusing to push to {branch!r}: it is the run's base branch")
        if pattern := protected_pattern(branch, settings.protected_branches):
            raise PublishError(f"refusing to push to {branch!r}: protected by {pattern!r} (publish.protected_branches)")
        assert run.base_commit is not None
        # on top of what this run last pushed to the branch (a pull request step that failed after
        # its push is retried by the next turn), else the base commit
        parent = existing.head_sha if existing else await self._pushed_head(run, branch) or run.base_commit
        if not result.changed_paths and existing is None:
            return PublishOutcome("skipped", "no changes: no branch pushed and no pull request opened", None)
        title = title_of(run, first_prompt)
        env = {"GIT_AUTHOR_NAME": settings.author_name, "GIT_AUTHOR_EMAIL": settings.author_email,
               "GIT_COMMITTER_NAME": settings.author_name, "GIT_COMMITTER_EMAIL": settings.author_email}
        run_url = f"{self.s.public_url}/api/v1/coding-agent/runs/{run.id}"
        message = f"{title}\n\nCritique-Run: {run_url}\nCritique-Turn: {turn_idx}\n"
        if await repo.tree_of(parent) == result.tree:
            if existing is not None or parent == run.base_commit:
                return PublishOutcome("skipped", "no changes since the last published commit; the pull request "
                                      "was left as it is", branch, parent, existing.number if existing else None)
            commit = parent  # pushed by an earlier turn whose pull request step failed
        else:
            commit = await repo.commit(result.tree, parent, message, env)
            await asyncio.wait_for(self._push(source, repo, commit, branch), settings.timeout_s)
        body = pr_body(run, run_url, turn_idx, summary, result, validation)
        try:
            pr = await self._pull_request(run, source, existing, branch, base, commit, title, body, run_url)
        except (HostError, httpx.HTTPError) as exc:
            why = exc.message if isinstance(exc, HostError) else f"{exc.__class__.__name__}: {exc}"
            raise PublishError(f"pushed {commit[:12]} to {branch}, but the pull request could not be "
                               f"{'updated' if existing else 'opened'} ({why}); the next turn with "
                               "publish retries", commit) from exc
        pr = await pulls.save(self.s.db, pr)
        verb = "updated" if existing else "opened"
        return PublishOutcome("published", f"pushed {commit[:12]} to {branch}; {verb} draft pull request "
                              f"#{pr.number}", branch, commit, pr.number)

    async def _pushed_head(self, run: RunRow, branch: str) -> str | None:
        for turn in reversed(await runs_store.turns_of(self.s.db, run.id)):
            done = turn["publish"]
            if done and done.get("branch") == branch and done.get("headSha"):
                return str(done["headSha"])
        return None

    async def _push(self, source: Source, repo: RunRepo, commit: str, branch: str) -> None:
        env = {**await source.git_env(), **SAFE_ENV}
        try:
            await run_git(["push", "--quiet", "--", source.url, f"{commit}:refs/heads/{branch}"], repo.path, env,
                          self.s.settings.publish.timeout_s)
        except RunFailure as exc:
            if "rejected" in exc.message or "non-fast-forward" in exc.message or "fetch first" in exc.message:
                raise PublishError(f"branch {branch!r} already exists with other commits; nothing was "
                                   "overwritten (choose another publish.branch)") from exc
            raise PublishError(f"pushing {branch!r} failed: {exc.message}") from exc

    async def _pull_request(self, run: RunRow, source: Source, existing: PullRequestRow | None, branch: str,
                            base: str, commit: str, title: str, body: str, run_url: str) -> PullRequestRow:
        created = existing.created_at if existing else ""
        if source.host is None:
            number = existing.number if existing else 0  # 0: numbered as it is saved (``pulls.save``)
            return PullRequestRow(run.id, pulls.LOCAL, source.full_name, number, f"{run_url}#draftPullRequest", branch,
                                  base, commit, existing.state if existing else "open", True, title, body, created, "")
        if existing:
            remote = await source.host.update_pull_request(source.full_name, existing.number, title=title, body=body)
        else:
            remote = await source.host.open_pull_request(source.full_name, head=branch, base=base, title=title,
                                                         body=body)
        return PullRequestRow(run.id, source.kind, source.full_name, remote.number, remote.url, branch, base, commit,
                              remote.state, remote.draft, title, body, created, "")

