"""The OpenCode configuration a sandbox gets: one provider (our gateway), no outside traffic,
and permissions that never wait for a human."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from critique_local.agent.base import McpServer

PROVIDER_ID = "critique"
TOKEN_ENV = "CRITIQUE_GATEWAY_TOKEN"
OPENCODE_PORT = 4096
MCP_TIMEOUT_MS = 30_000  # OpenCode's per-request MCP timeout (its 5 s default is tight on a loaded host)

# The container is the security boundary (SECURITY.md); inside it the agent works as on a
# developer's machine: /tmp, $HOME caches and the web (as far as the run's network policy lets it)
# are allowed. Permissions only make sure a headless run never waits for a human: every rule that
# would "ask" is an answer instead. Last matching rule wins, so the specific ones follow "*".
HEADLESS_PERMISSIONS: dict[str, str] = {
    "*": "allow",
    "external_directory": "allow",  # OpenCode asks for paths outside /workspace (e.g. /tmp)
    "doom_loop": "deny",  # the same call three times in one model answer: refused at once
    "question": "deny",  # the question tool waits for a human answer
}
# plan: OpenCode's plan agent, told to leave the tree alone, without its file-editing tools. The
# tree-only guarantee does not rest on this (a shell or a subagent can write files): the server
# discards whatever a plan turn changed in the tree (runs/plan_guard.py).
PLAN_PERMISSIONS: dict[str, str] = {**HEADLESS_PERMISSIONS, "edit": "deny"}


def opencode_config(gateway_url: str, model_id: str, context_tokens: int, output_tokens: int,
                    mcp_servers: Sequence[McpServer] = ()) -> str:
    """JSON for ``OPENCODE_CONFIG_CONTENT``. The gateway token is read from the environment
    (``{env:...}``) so it is not repeated in the config text; it is also the bearer token of
    every ``mcp_servers`` URL (remote servers, reached through the server's relay)."""
    config: dict[str, Any] = {
        "$schema": "https://opencode.ai/config.json",
        "autoupdate": False,
        "share": "disabled",
        # OpenCode's own per-step snapshots (a shadow git repository of the whole tree, refreshed
        # before every model call: seconds on a large tree) serve its undo/revert, which a
        # headless run does not use: the server computes the patch with git itself.
        "snapshot": False,
        "provider": {
            PROVIDER_ID: {
                "npm": "@ai-sdk/openai-compatible",
                "name": "critique-local gateway",
                "options": {"baseURL": gateway_url, "apiKey": "{env:" + TOKEN_ENV + "}"},
                "models": {
                    model_id: {
                        "name": model_id,
                        "tool_call": True,
                        "limit": {"context": context_tokens, "output": output_tokens},
                    }
                },
            }
        },
        "model": f"{PROVIDER_ID}/{model_id}",
        "small_model": f"{PROVIDER_ID}/{model_id}",
        "permission": HEADLESS_PERMISSIONS,
        "agent": {"plan": {"permission": PLAN_PERMISSIONS}},
    }
    if mcp_servers:
        config["mcp"] = {s.name: {"type": "remote", "url": s.url, "enabled": True, "oauth": False,
                                  "timeout": MCP_TIMEOUT_MS, "headers": {"Authorization": "Bearer {env:" + TOKEN_ENV + "}"}}
                         for s in mcp_servers}
    return json.dumps(config)
