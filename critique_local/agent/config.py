"""The OpenCode configuration a sandbox gets: one provider (our gateway), no outside traffic,
and permissions that never wait for a human."""

from __future__ import annotations

import json
from typing import Any

PROVIDER_ID = "critique"
TOKEN_ENV = "CRITIQUE_GATEWAY_TOKEN"
OPENCODE_PORT = 4096

# "ask" rules would block a headless run forever; these deny them outright instead.
HEADLESS_PERMISSIONS: dict[str, str] = {
    "*": "allow",
    "external_directory": "deny",
    "doom_loop": "deny",
    "webfetch": "deny",
    "question": "deny",
}
# plan must leave the tree unchanged: no edits and no shell (a shell can write anything).
PLAN_PERMISSIONS: dict[str, str] = {**HEADLESS_PERMISSIONS, "edit": "deny", "bash": "deny"}


def opencode_config(gateway_url: str, model_id: str, context_tokens: int, output_tokens: int) -> str:
    """JSON for ``OPENCODE_CONFIG_CONTENT``. The gateway token is read from the environment
    (``{env:...}``) so it is not repeated in the config text."""
    config: dict[str, Any] = {
        "$schema": "https://opencode.ai/config.json",
        "autoupdate": False,
        "share": "disabled",
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
    return json.dumps(config)
