"""The outbox: append-only events with gap-free sequence numbers and a hash chain.

Each row's ``hash`` is the hex SHA-256 of the previous row's hash (32 raw bytes; the
genesis is 32 zero bytes) followed by the row's canonical event: compact JSON, keys sorted,
UTF-8 without ASCII escaping, of ``{"data", "id", "kind", "lane", "seq", "ts"}``, numbers as
Python's ``json`` writes them (shortest round-trip floats). The cloud recomputes it with the
same rules, so it can prove that nothing between two rows was removed, added or altered.
Acknowledged rows are deleted from the front; the last deleted row's seq and hash stay in
``sync_state`` as the chain's anchor.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

GENESIS = "0" * 64


@dataclass(frozen=True)
class StoredEvent:
    """One outbox row as stored: seq, UUIDv7 id, epoch time, kind, lane, data and its chain."""

    seq: int
    id: str
    ts: float
    kind: str
    lane: str | None
    data: dict[str, Any] = field(default_factory=dict)
    prev_hash: str = ""
    hash: str = ""


@dataclass(frozen=True)
class ChainReport:
    """What ``verify_chain`` found: ok, rows checked, and the first bad seq with why."""

    ok: bool
    count: int
    first_bad_seq: int | None = None
    reason: str = ""


def canonical_json(obj: Any) -> str:
    """Compact, sorted-key JSON; raises on values JSON cannot carry exactly."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _plain(obj: Any) -> Any:
    """A JSON-safe copy: non-finite floats and unknown objects become strings."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_plain(v) for v in obj]
    return str(obj)


def data_json(data: Mapping[str, Any]) -> str:
    """Canonical JSON of an event's data; never raises (odd values are stringified)."""
    try:
        return canonical_json(data)
    except (TypeError, ValueError):
        return canonical_json(_plain(data))


def event_canonical(
    event_id: str, seq: int, ts: float, kind: str, lane: str | None, data: str
) -> str:
    """The canonical event text that the chain hashes (``data`` already canonical JSON)."""
    # Assembled by hand, in sorted key order, to skip re-parsing the data on the hot path;
    # verify_chain re-canonicalises the stored data, so both paths agree by construction.
    dump = json.dumps
    return (
        f'{{"data":{data},"id":{dump(event_id, ensure_ascii=False)},'
        f'"kind":{dump(kind, ensure_ascii=False)},"lane":{dump(lane, ensure_ascii=False)},'
        f'"seq":{seq},"ts":{dump(ts)}}}'
    )


def chain_hash(prev_hash: str, canonical: str) -> str:
    """hex SHA-256(prev hash bytes || canonical event bytes)."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical.encode("utf-8")).hexdigest()


def _connect(path: Path) -> sqlite_utils.Database:
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=2.0)
    return sqlite_utils.Database(conn, execute_plugins=False)


def read_events(
    path: Path, since_seq: int = 0, kind: str | None = None, limit: int | None = None
) -> Iterator[StoredEvent]:
    """Read stored events in order (for tests, the demo, gatectl and the sync sender)."""
    db = _connect(path)
    try:
        sql = "SELECT seq, id, ts, kind, lane, data, prev_hash, hash FROM outbox WHERE seq > ?"
        args: list[Any] = [since_seq]
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        for row in db.execute(sql, args).fetchall():
            yield StoredEvent(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), *row[6:])
    finally:
        db.close()


def anchor(db: sqlite_utils.Database) -> tuple[int, str]:
    """Seq and hash of the last acknowledged (deleted) row: where the stored chain starts."""
    rows = dict(
        db.execute(
            "SELECT key, value FROM sync_state WHERE key IN ('outbox_anchor_seq', "
            "'outbox_anchor_hash')"
        ).fetchall()
    )
    return int(rows.get("outbox_anchor_seq", 0)), str(rows.get("outbox_anchor_hash", GENESIS))


def issued_seq(db: sqlite_utils.Database) -> int:
    """The highest seq ever issued (survives deletion of every row)."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
    return int(row[0]) if row else 0


def verify_chain(source: Path | str | sqlite_utils.Database) -> ChainReport:
    """Check that seqs run gap-free from the anchor and every hash links and matches."""
    db = source if isinstance(source, sqlite_utils.Database) else _connect(Path(source))
    began = not db.conn.in_transaction
    try:
        if began:
            # One read snapshot, so a concurrent mark_sent cannot move the anchor mid-check.
            db.execute("BEGIN")
        return _verify(db)
    finally:
        if began:
            db.execute("COMMIT")
        if db is not source:
            db.close()


def _verify(db: sqlite_utils.Database) -> ChainReport:
    expected_seq, prev = anchor(db)
    count = 0
    cursor = db.execute(
        "SELECT seq, id, ts, kind, lane, data, prev_hash, hash FROM outbox ORDER BY seq"
    )
    for seq, event_id, ts, kind, lane, data, prev_hash, stored_hash in cursor:
        expected_seq += 1
        if seq != expected_seq:
            return ChainReport(False, count, expected_seq, f"seq {expected_seq} is missing")
        if prev_hash != prev:
            return ChainReport(False, count, seq, "prev_hash does not link to the previous row")
        try:
            canonical_data = canonical_json(json.loads(data))
        except (TypeError, ValueError):
            return ChainReport(False, count, seq, "data is not valid JSON")
        if not isinstance(ts, float | int) or not isinstance(event_id, str):
            return ChainReport(False, count, seq, "id or ts has the wrong type")
        expected = chain_hash(
            prev, event_canonical(event_id, seq, float(ts), kind, lane, canonical_data)
        )
        if stored_hash != expected:
            return ChainReport(False, count, seq, "hash mismatch: the row was altered")
        prev = stored_hash
        count += 1
    issued = issued_seq(db)
    if issued > expected_seq:
        return ChainReport(
            False, count, expected_seq + 1, f"rows {expected_seq + 1}..{issued} are missing"
        )
    return ChainReport(True, count)
