"""A Server-Sent Events reader with a size bound, for streams from a sandbox.

General SSE clients buffer a whole line before looking at it, so a server that never sends a
newline grows the reader's memory without limit. Here neither a line nor an event's data ever
holds more than ``max_bytes``: an event over the bound is dropped (reported as ``None``) and
the stream goes on with the next one. Only ``data:`` fields are used; ``event:``, ``id:``,
``retry:`` and comments are skipped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator


async def sse_data(chunks: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes | None]:
    """The ``data`` of each event in ``chunks`` (raw bytes of the stream), or None for an event
    whose data (or any line of it) is larger than ``max_bytes``."""
    line = bytearray()
    line_long = False
    data = bytearray()
    has_data = False
    event_over = False
    async for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not line_long:
                line += piece
                if len(line) > max_bytes:
                    line_long = True
                    del line[max_bytes:]  # a prefix says what kind of line it was
            if end < 0:
                break
            start = end + 1
            raw, long = bytes(line), line_long
            line.clear()
            line_long = False
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if not raw and not long:  # a blank line ends the event
                if has_data:
                    yield None if event_over else bytes(data)
                data.clear()
                has_data = event_over = False
                continue
            if not raw.startswith(b"data:"):
                continue
            has_data = True
            value = raw[5:]
            value = value[1:] if value.startswith(b" ") else value
            if long or event_over or len(data) + len(value) + 1 > max_bytes:
                event_over = True
                data.clear()
                continue
            if data:
                data += b"\n"
            data += value
