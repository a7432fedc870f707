"""SQLite persistence: one connection in WAL mode; every write serialised through it."""

from critique_local.store.db import Database

__all__ = ["Database"]
