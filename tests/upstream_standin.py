"""A loopback OpenAI-compatible upstream that records what it receives (an external service)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from aiohttp import web

from critique_local.gateway.scripted import plan_reply
from critique_local.gateway.wire import stream_chunks

USAGE_IN, USAGE_OUT = 1000, 100


class UpstreamStandIn:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopping = asyncio.Event()  # bound to the stand-in's loop on first use

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"authorization": request.headers.get("Authorization"), "body": body})
        if body["model"].startswith("status-"):  # e.g. status-429: answer with that status
            return web.json_response({"error": {"message": "as requested"}}, status=int(body["model"][7:]))
        if body["model"] == "slow":
            await asyncio.sleep(5)
        if body["model"] == "hang":  # accepts the call and never answers (until the stand-in stops)
            await self._stopping.wait()
            return web.json_response({"error": {"message": "stopping"}}, status=503)
        if body.get("tools"):
            return await self._agentic(request, body)
        text = f"upstream says hi to {body['model']}"
        usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        if not body.get("stream"):
            return web.json_response({"id": "up-1", "object": "chat.completion", "created": 1, "model": body["model"],
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                   "finish_reason": "stop"}], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for delta, finish in (({"role": "assistant", "content": text}, None), ({}, "stop")):
            chunk = {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _agentic(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """Calls with tools (an agent): follow the ``@`` script in the prompt, one step per call,
        and report a fixed usage of 1000 prompt + 100 completion tokens per call."""
        reply = plan_reply(body["messages"], True)
        if reply.error:
            return web.json_response({"error": {"message": reply.error}}, status=400)
        chunks = stream_chunks(body["model"], reply, USAGE_IN, USAGE_OUT, include_usage=True)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def start(self) -> None:
        def run() -> None:
            asyncio.set_event_loop(self._loop)
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            runner = web.AppRunner(app)
            self._runner = runner
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
            self._ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        self._ready.wait(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stopping.set)
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
