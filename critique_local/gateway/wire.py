"""OpenAI chat-completions wire format: building responses and stream chunks."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from critique_local.gateway.scripted import Reply


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def _message(reply: Reply) -> dict[str, Any]:
    if reply.tool_name:
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_" + secrets.token_hex(8), "type": "function",
            "function": {"name": reply.tool_name, "arguments": json.dumps(reply.tool_args)}}]}
    return {"role": "assistant", "content": reply.text or ""}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(model: str, reply: Reply, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": _message(reply),
                     "finish_reason": "tool_calls" if reply.tool_name else "stop"}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def stream_chunks(
    model: str, reply: Reply, prompt_tokens: int, completion_tokens: int, include_usage: bool
) -> list[dict[str, Any]]:
    cid, created = completion_id(), int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    msg = _message(reply)
    if reply.tool_name:
        call = msg["tool_calls"][0]
        chunks = [
            chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                                        "function": {"name": call["function"]["name"],
                                                                     "arguments": ""}}]}, None),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": call["function"]["arguments"]}}]}, None),
            chunk({}, "tool_calls"),
        ]
    else:
        chunks = [chunk({"role": "assistant", "content": msg["content"]}, None), chunk({}, "stop")]
    if include_usage:
        chunks.append({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    return chunks
