"""Log context and formats: every log record carries ``request_id`` and ``run_id`` (empty when
none applies), taken from context variables that the request middleware and the scheduler set;
``server.log_format = "json"`` writes one JSON object per line with them."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
RUN_ID: contextvars.ContextVar[str] = contextvars.ContextVar("run_id", default="")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = ("asctime", "levelname", "name", "message", "request_id", "run_id")


class ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``run_id`` to every record (it never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.run_id = RUN_ID.get()
        return True


# libraries that log one INFO line per HTTP request (every call to a sandbox's agent, the Docker
# engine's API, webhooks): at level info they would drown the server's own lines
CHATTY = ("httpx", "httpcore")


def configure(level: str, fmt: str) -> None:
    """Root logging for ``serve``: ``fmt`` is ``text`` or ``json`` (``server.log_format``).
    ``level`` applies to the server's own loggers; :data:`CHATTY` libraries log warnings and
    errors only, unless ``level`` is ``debug``."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(list(JSON_FIELDS), rename_fields={"asctime": "time",
                                                                              "levelname": "level",
                                                                              "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING)


@contextlib.contextmanager
def run_context(run_id: str) -> Iterator[None]:
    """What is logged inside the block carries ``run_id``; the previous run id after it."""
    token = RUN_ID.set(run_id)
    try:
        yield
    finally:
        RUN_ID.reset(token)


def for_run(run_id: str) -> None:
    """Tag what the current task (and the tasks it starts) logs with ``run_id``."""
    RUN_ID.set(run_id)
