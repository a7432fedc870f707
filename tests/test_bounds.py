"""Bounds on untrusted data: JSON nesting, clipping with markers, the bounded SSE reader, the
size cap of stored events."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from critique_local import bounds
from critique_local.agent.opencode.normalize import Normalizer
from critique_local.agent.sse import sse_data
from critique_local.runs.events import MAX_EVENT_BYTES, bounded


def test_loads_refuses_deep_nesting_without_recursion_errors() -> None:
    for depth in (65, 1000, 200_000):
        with pytest.raises(bounds.TooDeep):
            bounds.loads("[" * depth + "]" * depth)
    assert bounds.loads('{"a": ' * 64 + "1" + "}" * 64) is not None
    with pytest.raises(ValueError):
        bounds.loads(b"\xff\xfe not json")


def test_clip_text_and_json_say_what_was_dropped() -> None:
    assert bounds.clip_text("abc", 5) == "abc"
    assert bounds.clip_text("x" * 10, 4) == "xxxx… [clipped: 6 more characters]"
    deep: object = "leaf"
    for _ in range(50):
        deep = {"k": [deep]}
    clipped = bounds.clip_json({"s": "y" * 5000, "l": list(range(500)), "d": deep}, max_chars=100, max_items=10,
                               max_depth=4)
    assert clipped["s"].endswith("[clipped: 4900 more characters]")
    assert clipped["l"][:10] == list(range(10)) and clipped["l"][10] == "… [clipped: 490 more items]"
    assert "nested too deep" in json.dumps(clipped["d"])
    assert bounds.json_size(clipped) < 2000


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _collect(stream: AsyncIterator[bytes], limit: int) -> list[bytes | None]:
    return [item async for item in sse_data(stream, limit)]


async def test_sse_reader_drops_events_over_the_bound_and_keeps_going() -> None:
    got = await _collect(_chunks(b"data: {\"a\": 1}\r\n\r\n", b"data: " + b"x" * 5000 + b"\n\n",
                                 b"event: e\ndata: {\"b\"", b": 2}\n", b"\n: comment\n\ndata: 1\ndata: 2\n\n"), 1000)
    assert got == [b'{"a": 1}', None, b'{"b": 2}', b"1\n2"]


async def test_sse_reader_memory_stays_bounded_on_a_line_without_end() -> None:
    async def endless() -> AsyncIterator[bytes]:
        for _ in range(2000):  # 128 MB without a newline
            yield b"d" * 65536
        yield b"\n\ndata: ok\n\n"

    tracemalloc.start()
    try:
        got = await _collect(endless(), 1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [b"ok"]
    assert peak < 8_000_000, peak


def test_stored_events_are_capped_and_marked() -> None:
    small = {"type": "tool", "output": "fine"}
    assert bounded(small) is small
    huge = {"type": "tool", "input": {f"k{i}": "v" * 3000 for i in range(500)}}
    clipped = bounded(huge)
    assert clipped["clipped"] is True and clipped["type"] == "tool"
    assert len(json.dumps(clipped)) <= MAX_EVENT_BYTES


def test_normalizer_survives_any_shape_and_clips_lists() -> None:
    norm = Normalizer("ses_1")
    for event in ({"type": "message.part.updated", "properties": []},
                  {"type": "message.part.updated", "properties": {"part": "x"}},
                  {"type": "session.error", "properties": {"error": "boom"}},
                  {"type": "file.edited", "properties": {"file": ["a"] * 10_000}}):
        row = norm(event)
        assert row is None or bounds.json_size(row) < 50_000
    row = norm({"type": "message.part.updated", "properties": {"part": {
        "type": "tool", "id": "p1", "tool": "bash", "state": {"status": "completed", "input": {"cmd": ["x" * 5000] * 500},
                                                              "output": "o" * 100_000}}}})
    assert row is not None and bounds.json_size(row) < 200_000
