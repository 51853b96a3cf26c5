"""Append-only local event store (SQLite, WAL): passages, alarms, emergencies, faults, audits.

Every event gets a UUIDv7 at the gate and a gap-free local sequence number. Writes happen
on a dedicated writer thread with group commits, so the daemon's event loop (and with it
the safety monitor) never waits on the disk. The cloud outbox of a later issue builds on
this table.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils
import uuid_utils

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    id: str
    ts: float
    kind: str
    lane: str | None
    data: dict[str, Any] = field(default_factory=dict)


def _open(path: Path) -> sqlite_utils.Database:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite_utils.Database(path)
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: an event the daemon reported is on disk even if the power goes a moment later.
    db.execute("PRAGMA synchronous=FULL")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version < 1:
        db.executescript(
            """
            CREATE TABLE IF NOT EXISTS events (
                seq INTEGER PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                ts REAL NOT NULL,
                kind TEXT NOT NULL,
                lane TEXT,
                data TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS events_kind ON events(kind);
            PRAGMA user_version = 1;
            """
        )
    return db


class EventStore:
    """Durable append-only event log with a background writer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = _open(path)
        self._queue: queue.Queue[tuple[str, float, str, str | None, str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.written = 0
        self.failed = 0

    def start(self) -> None:
        # The writer gets its own connection: sqlite connections are not shared across threads.
        self._thread = threading.Thread(target=self._writer, name="event-store", daemon=True)
        self._thread.start()

    def append(self, kind: str, lane: str | None = None, **data: Any) -> str:
        """Queue one event for writing; returns its id. Never blocks on the disk."""
        event_id = str(uuid_utils.uuid7())
        payload = json.dumps(data, separators=(",", ":"), sort_keys=True, default=str)
        self._queue.put((event_id, time.time(), kind, lane, payload))
        return event_id

    def _writer(self) -> None:
        db = sqlite_utils.Database(self.path)
        db.execute("PRAGMA synchronous=FULL")
        stop = False
        while not stop:
            item = self._queue.get()
            batch = []
            while item is not None:
                batch.append(item)
                if len(batch) >= 500:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            else:
                stop = True
            if not batch:
                continue
            try:
                with db.conn:
                    db.conn.executemany(
                        "INSERT INTO events (id, ts, kind, lane, data) VALUES (?, ?, ?, ?, ?)",
                        batch,
                    )
                self.written += len(batch)
            except Exception:
                # Keep the daemon running; the count shows up in status and the log says why.
                self.failed += len(batch)
                log.exception("event store: failed to write %d events", len(batch))
        db.close()

    def close(self) -> None:
        """Write everything queued, then stop the writer."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None
        self._db.close()

    def stats(self) -> dict[str, int]:
        return {"written": self.written, "failed": self.failed, "queued": self._queue.qsize()}


def read_events(path: Path, since_seq: int = 0, kind: str | None = None) -> Iterator[StoredEvent]:
    """Read stored events in order (for tests, the demo and gatectl)."""
    db = sqlite_utils.Database(path)
    try:
        sql = "SELECT seq, id, ts, kind, lane, data FROM events WHERE seq > ?"
        args: list[Any] = [since_seq]
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        for row in db.execute(sql + " ORDER BY seq", args).fetchall():
            yield StoredEvent(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]))
    finally:
        db.close()
