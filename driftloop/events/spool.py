"""A bounded, durable, first-in first-out spool of Kafka records, kept on disk while Kafka is away.

SQLite from the standard library holds the records: one file, one table whose integer
primary key is the arrival order, so a replay reads them back in the order they came. The
journal is WAL with ``synchronous=NORMAL``: a committed record survives the process being
killed or restarted (the promise the gateway makes); only an operating-system crash or power
loss may take the last commits with it, the price of not waiting for an fsync per batch.
``persist-queue`` and ``diskcache`` would do the same over SQLite, with a dependency and
without the batch append and ranged acknowledgement used here.

A spool is used from one thread (the gateway's event loop): its calls are short, batched
transactions, so they do not need a thread of their own. It has one writer: opening it takes
an exclusive lock on ``<spool>.lock`` for the spool's life, and a second process (a second
gateway given the same path) is refused with ``SpoolInUseError`` rather than replaying,
acknowledging and deleting another's records. The operating system drops the lock with its
holder, so a killed gateway's spool opens again at once.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, NamedTuple

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS spooled_record (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key BLOB,
    value BLOB NOT NULL
)
"""


class SpoolInUseError(RuntimeError):
    """The spool file is held by another live process: each writer needs a spool of its own."""


class SpoolRecord(NamedTuple):
    """A Kafka record waiting for its broker: topic, key and value bytes.

    A named tuple, immutable like a frozen dataclass at half its construction cost: the
    gateway builds one per prediction on the request path.
    """

    topic: str
    key: bytes | None
    value: bytes


@dataclass(frozen=True, slots=True)
class SpooledRecord:
    """A record read back from the spool, with its position for ``Spool.acknowledge``."""

    position: int
    record: SpoolRecord


class Spool:
    """Bounded FIFO of Kafka records in one SQLite file; survives a process restart."""

    def __init__(self, path: Path, *, max_records: int) -> None:
        if max_records < 1:
            raise ValueError("a spool holds at least one record")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_records = max_records
        self._lock = _hold(path.with_name(f"{path.name}.lock"))
        # isolation_level=None: transactions are explicit, one per batch.
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        (count,) = self._db.execute("SELECT count(*) FROM spooled_record").fetchone()
        self._depth: int = int(count)
        self.dropped = 0

    @property
    def depth(self) -> int:
        """Records waiting."""
        return self._depth

    @property
    def full(self) -> bool:
        """Whether a new record would be refused."""
        return self._depth >= self.max_records

    def extend(self, records: Iterable[SpoolRecord]) -> int:
        """Append records in order, in one transaction; returns how many were refused (full)."""
        batch = list(records)
        room = max(self.max_records - self._depth, 0)
        accepted, refused = batch[:room], len(batch) - min(room, len(batch))
        if accepted:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO spooled_record (topic, key, value) VALUES (?, ?, ?)",
                    accepted,  # each record is a (topic, key, value) tuple
                )
            self._depth += len(accepted)
        self.dropped += refused
        return refused

    def peek(self, limit: int) -> list[SpooledRecord]:
        """The oldest ``limit`` records, oldest first, left in the spool."""
        rows: Sequence[tuple[int, str, bytes | None, bytes]] = self._db.execute(
            "SELECT id, topic, key, value FROM spooled_record ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [
            SpooledRecord(position, SpoolRecord(topic, key, value))
            for position, topic, key, value in rows
        ]

    def acknowledge(self, up_to: int) -> None:
        """Remove every record up to and including position ``up_to`` (they reached Kafka)."""
        with self._transaction():
            cursor = self._db.execute("DELETE FROM spooled_record WHERE id <= ?", (up_to,))
        self._depth -= int(cursor.rowcount)

    def close(self) -> None:
        """Close the file and let go of it; the records stay for the next process."""
        self._db.close()
        self._lock.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


def _hold(lock_path: Path) -> IO[str]:
    """An exclusive, non-blocking lock on ``lock_path``, held while the file stays open."""
    handle = lock_path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise SpoolInUseError(
            f"the spool {lock_path.with_suffix('')} is in use by {holder}: give each gateway "
            "its own GATEWAY_SPOOL_PATH"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        self._db.execute("COMMIT" if error is None else "ROLLBACK")
