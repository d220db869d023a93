"""SQLite storage: schema and migrations, one writer thread, and the tables' sync helpers."""

from mailfence.store.db import StoreError, connect, open_database
from mailfence.store.writer import Writer

__all__ = ["StoreError", "Writer", "connect", "open_database"]
