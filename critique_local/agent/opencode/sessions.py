"""A session's state out of one OpenCode and into another: ``opencode export`` / ``opencode
import``, run in the sandbox next to the server (both read and write its storage,
``~/.local/share/opencode``, for the project in the workspace).

The export is OpenCode's own JSON (``{"info": {"id", ...}, "messages": [...]}``): opaque to the
server, and untrusted like everything the sandbox says, so it is bounded in size and checked for
a session id before it is imported anywhere.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from critique_local import bounds
from critique_local.agent.base import WORKSPACE
from critique_local.errors import AgentError
from critique_local.sandboxes.base import Sandbox

MAX_EXPORT_BYTES = 64_000_000
CLI_TIMEOUT_S = 120.0
IMPORT_DIR = "/tmp/critique-import"


def session_id_of(state: bytes) -> str:
    """The session id an export carries; ``AgentError`` when it carries none."""
    try:
        data = bounds.loads(state)
    except ValueError as exc:
        raise AgentError(f"the session export is not JSON ({str(exc)[:200]})") from exc
    info = data.get("info") if isinstance(data, dict) else None
    session_id = info.get("id") if isinstance(info, dict) else None
    if not isinstance(session_id, str) or not 0 < len(session_id) <= 200 or not session_id.startswith("ses"):
        raise AgentError("the session export has no session id")
    return session_id


def _export(state: bytes) -> dict[str, Any]:
    try:
        data = bounds.loads(state)
    except ValueError as exc:
        raise AgentError(f"the session state is not JSON ({str(exc)[:200]})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise AgentError("the session state has no messages")
    return data


def message_count(state: bytes) -> int:
    """How many messages an export holds (``{"info", "messages": [...]}``); AgentError otherwise."""
    return len(_export(state)["messages"])


def truncated(state: bytes, messages: int) -> bytes:
    """The export with only its first ``messages`` messages (each message carries its own parts,
    so a prefix is the transcript as it was at the end of an earlier turn); AgentError when
    ``state`` is not an export."""
    data = _export(state)
    data["messages"] = data["messages"][:max(0, messages)]
    return json.dumps(data, separators=(",", ":")).encode()


async def export_session(sandbox: Sandbox, session_id: str) -> bytes:
    res = await sandbox.exec(["opencode", "export", session_id], cwd=WORKSPACE, timeout_s=CLI_TIMEOUT_S,
                             max_output_bytes=MAX_EXPORT_BYTES)
    if not res.ok or res.truncated:
        why = "larger than the export limit" if res.truncated else res.stderr.decode(errors="replace")[-300:]
        raise AgentError(f"opencode export {session_id} failed (exit {res.exit_code}): {why}")
    # the CLI may print a line before the JSON: the export starts at the first brace
    out = res.stdout
    start = out.find(b"{")
    state = out[start:] if start >= 0 else b""
    if session_id_of(state) != session_id:
        raise AgentError(f"opencode export {session_id} exported another session")
    return state


def _tar_of(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def import_session(sandbox: Sandbox, state: bytes) -> str:
    session_id = session_id_of(state)
    with tempfile.TemporaryDirectory() as tmp:
        tar_path = Path(tmp) / "session.tar"
        await asyncio.to_thread(tar_path.write_bytes, _tar_of("session.json", state))
        await sandbox.exec(["mkdir", "-p", IMPORT_DIR], timeout_s=30)
        await sandbox.upload_tar(IMPORT_DIR, tar_path)
    res = await sandbox.exec(["opencode", "import", f"{IMPORT_DIR}/session.json"], cwd=WORKSPACE,
                             timeout_s=CLI_TIMEOUT_S, max_output_bytes=64_000)
    await sandbox.exec(["rm", "-rf", IMPORT_DIR], timeout_s=30)
    if not res.ok:
        raise AgentError(f"opencode import failed (exit {res.exit_code}): "
                         f"{res.stderr.decode(errors='replace')[-300:]}")
    return session_id
