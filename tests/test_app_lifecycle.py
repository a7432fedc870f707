"""The application's own life, in process: started and stopped through its cleanup contexts;
stopping ends open event streams at once instead of holding the shutdown for aiohttp's
handler deadline (60 s), and leaves queued runs queued for the next start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from critique_local.app import claim_instance, create_app
from critique_local.appkeys import DB, PUBLIC_URL
from critique_local.store import runs as store
from critique_local.store.db import Database
from critique_local.store.keys import create_key
from tests.conftest import SAMPLE_FILES
from tests.helpers import free_port, make_repo
from tests.inprocess import ServedAsInProduction, settings_for

RUNS = "/api/v1/coding-agent/runs"


async def test_stopping_ends_open_streams_and_keeps_queued_runs(tmp_path: Path) -> None:
    make_repo(tmp_path / "repos", "acme/web", SAMPLE_FILES)
    settings = settings_for(tmp_path)
    claim = await asyncio.to_thread(claim_instance, settings)
    try:
        app = create_app(settings, claim, execute_runs=False)
        port = free_port()
        app[PUBLIC_URL] = f"http://127.0.0.1:{port}"
        server = ServedAsInProduction(app, host="127.0.0.1", port=port)
        await server.start_server()
        key, _ = await create_key(app[DB], "alice", ("read:builder", "write:builder"))
        async with httpx.AsyncClient(base_url=app[PUBLIC_URL], headers={"Authorization": f"Bearer {key}"},
                                     timeout=httpx.Timeout(30, read=120)) as api:
            run = (await api.post(RUNS, json={"repository": "acme/web", "prompt": "@say hi"})).json()["run"]
            first = asyncio.Event()

            async def follow() -> list[str]:
                lines = []
                async with api.stream("GET", f"{RUNS}/{run['id']}/stream") as stream:
                    async for line in stream.aiter_lines():
                        lines.append(line)
                        if line.startswith("data:"):
                            first.set()
                return lines

            reader = asyncio.create_task(follow())
            await asyncio.wait_for(first.wait(), 60)
            await asyncio.wait_for(server.close(), 45)  # below the 60 s handler deadline
            lines = await asyncio.wait_for(reader, 15)
        assert "event: run.status" in lines and any('"status": "queued"' in line for line in lines)
    finally:
        claim.release()
    db = await Database.open(settings.db_path)  # the database was closed cleanly and kept the run
    try:
        kept = await store.get_run(db, run["id"])
        assert kept is not None and kept.status.value == "queued"
    finally:
        await db.close()
