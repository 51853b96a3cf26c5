"""Writer-side jobs that change tickets, products, blocks and zones in bulk.

A snapshot streams into a bare staging table (no indexes: ~10x faster than keeping two
random-order indexes up to date), builds the unique indexes on id and code, then swaps the
table in with two renames in one short transaction; readers see the old tickets until that
commit and the new ones right after. Usage rows are keyed by ticket id and stay untouched.
Deltas and imports upsert row by row so that one bad row is reported, not fatal.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

from offline_cache.records import BlockRow, ProductRow, SyncKind, TicketRow, ZoneRow
from offline_cache.schema import RETIRED, STAGING, TICKET_COLUMNS, ticket_index_ddl, tickets_ddl
from offline_cache.values import DeltaResult, Problem, SnapshotResult
from offline_cache.writer import LargeFn, Writer

ROWS_PER_STEP = 1000
ROWS_PER_GIL = 100
"""Rows per transaction when loading or importing: a few ms, the most a passage commit
waits behind a snapshot chunk."""
MAX_PROBLEMS = 100

_COLS = ", ".join(TICKET_COLUMNS)
_MARKS = ", ".join("?" * len(TICKET_COLUMNS))
_SET = ", ".join(f"{c} = excluded.{c}" for c in TICKET_COLUMNS[1:])
TICKET_UPSERT = (
    f"INSERT INTO tickets ({_COLS}) VALUES ({_MARKS}) ON CONFLICT(id) DO UPDATE SET {_SET} "
    # An older version of a ticket never overwrites a newer one (a replayed delta or import).
    "WHERE excluded.version >= tickets.version"
)
PRODUCT_UPSERT = (
    "INSERT INTO products (id, name, zones, reentry, slot_grace_before_s, slot_grace_after_s, "
    "version) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET name = excluded.name, "
    "zones = excluded.zones, reentry = excluded.reentry, "
    "slot_grace_before_s = excluded.slot_grace_before_s, "
    "slot_grace_after_s = excluded.slot_grace_after_s, version = excluded.version "
    "WHERE excluded.version >= products.version"
)
BLOCK_UPSERT = (
    "INSERT INTO blocks (kind, value, reason, until, version) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(kind, value) DO UPDATE SET reason = excluded.reason, until = excluded.until, "
    "version = excluded.version WHERE excluded.version >= blocks.version"
)
ZONE_UPSERT = (
    "INSERT INTO zones (zone, capacity) VALUES (?, ?) "
    "ON CONFLICT(zone) DO UPDATE SET capacity = excluded.capacity"
)
_DELETE = {
    "tickets": "DELETE FROM tickets WHERE id = ?",
    "products": "DELETE FROM products WHERE id = ?",
    "blocks": "DELETE FROM blocks WHERE kind = ? AND value = ?",
}

Steps = Generator[None, None, Any]


def clean_up(w: Writer) -> Steps:
    """Drop what a crash mid-snapshot left behind (staging or retired tickets)."""
    w.db.execute(f"DROP TABLE IF EXISTS {STAGING}")
    yield
    w.db.execute(f"DROP TABLE IF EXISTS {RETIRED}")


def snapshot_begin(version: int, force: bool) -> LargeFn:
    """Decide whether a snapshot of ``version`` applies; if so, create an empty staging table."""

    def steps(w: Writer) -> Steps:
        current = w.versions["tickets"]
        if not force and current > 0 and version == current:
            return "duplicate"
        if not force and version < current:
            return "stale"
        w.db.execute(f"DROP TABLE IF EXISTS {STAGING}")
        yield
        w.db.execute(tickets_ddl(STAGING))
        return "started"

    return steps


def snapshot_rows(rows: Sequence[TicketRow]) -> LargeFn:
    """Append validated rows to the staging table, a few thousand per transaction."""

    def steps(w: Writer) -> Steps:
        sql = f"INSERT INTO {STAGING} ({_COLS}) VALUES ({_MARKS})"
        for start in range(0, len(rows), ROWS_PER_STEP):
            if start:
                yield
            for sub in range(start, min(start + ROWS_PER_STEP, len(rows)), ROWS_PER_GIL):
                w.db.conn.executemany(
                    sql, rows[sub : min(sub + ROWS_PER_GIL, start + ROWS_PER_STEP)]
                )
                # Binding rows holds the GIL: let the event loop in between (decisions wait
                # behind this otherwise; measured with py-spy --gil during a 1 M snapshot).
                time.sleep(0)
        return len(rows)

    return steps


def snapshot_abandon(w: Writer) -> Steps:
    """Drop a half-loaded staging table."""
    yield from ()  # a one-transaction job
    w.db.execute(f"DROP TABLE IF EXISTS {STAGING}")


def _dedupe(w: Writer, column: str, problems: list[Problem]) -> int:
    """Keep the first row of each duplicated id or code; report the others by ticket id."""
    losers = (
        f"SELECT rowid, id FROM {STAGING} WHERE rowid NOT IN "
        f"(SELECT min(rowid) FROM {STAGING} GROUP BY {column})"
    )
    removed = 0
    for rowid, ticket_id in w.db.execute(losers).fetchall():
        if len(problems) < MAX_PROBLEMS:
            # The code itself is a bearer credential: name the ticket, never the code.
            problems.append(Problem(0, f"ticket {ticket_id[:80]}: duplicate {column}, dropped"))
        w.db.execute(f"DELETE FROM {STAGING} WHERE rowid = ?", [rowid])
        removed += 1
    return removed


def snapshot_finish(
    version: int, rejected: int, max_rejected_fraction: float, seconds: Callable[[], float]
) -> LargeFn:
    """Build the indexes, then swap the staging table in and record the version."""

    def steps(w: Writer) -> Steps:
        generation = int(w.get_state("tickets_generation", 0)) + 1
        problems: list[Problem] = []
        dropped = 0
        by_id, by_code, by_holder = ticket_index_ddl(STAGING, generation)
        for column, sql in (("id", by_id), ("code", by_code)):
            try:
                w.db.execute(sql)
            except sqlite3.IntegrityError:
                dropped += _dedupe(w, column, problems)
                w.db.execute(sql)
            yield
        w.db.execute(by_holder)
        yield
        count: int = w.db.execute(f"SELECT count(*) FROM {STAGING}").fetchone()[0]
        bad = rejected + dropped
        if bad > max_rejected_fraction * (count + bad) or (count == 0 and bad):
            w.db.execute(f"DROP TABLE {STAGING}")
            return SnapshotResult(
                "rejected", w.versions["tickets"], count, bad, tuple(problems), seconds()
            )
        w.db.execute(f"DROP TABLE IF EXISTS {RETIRED}")
        w.db.execute(f"ALTER TABLE tickets RENAME TO {RETIRED}")
        w.db.execute(f"ALTER TABLE {STAGING} RENAME TO tickets")
        w.set_state("tickets_generation", generation)
        w.set_state("tickets_version", version)

        def swapped() -> None:
            w.counts["tickets"] = count
            w.versions["tickets"] = version

        w.after_commit(swapped)
        yield
        # Freeing the old table's pages takes ~0.1 s per million rows: its own transaction.
        w.db.execute(f"DROP TABLE {RETIRED}")
        return SnapshotResult("applied", version, count, bad, tuple(problems), seconds())

    return steps


class _Tally:
    """Counts and problems of one delta or import job."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems[:MAX_PROBLEMS])
        self.rejected = len(problems)
        self.new = {"tickets": 0, "products": 0, "blocks": 0}
        self.done = {"tickets": 0, "products": 0, "blocks": 0, "zones": 0}

    def reject(self, index: int, reason: str) -> None:
        """Count a rejected row; keep its reason among the first MAX_PROBLEMS."""
        self.rejected += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(index, reason))


def _upsert(w: Writer, kind: str, index: int, row: tuple[Any, ...], tally: _Tally) -> None:
    """Insert or update one row; a conflict (e.g. a code another ticket holds) is reported."""
    if kind == "tickets":
        exists = w.db.execute("SELECT 1 FROM tickets WHERE id = ?", [row[0]]).fetchone()
        sql = TICKET_UPSERT
    elif kind == "products":
        exists, sql = True, PRODUCT_UPSERT
    elif kind == "blocks":
        exists, sql = True, BLOCK_UPSERT
    else:
        exists, sql = True, ZONE_UPSERT
    try:
        w.db.execute(sql, row)
    except sqlite3.IntegrityError:
        why = "code already used by another ticket" if kind == "tickets" else "refused by the db"
        tally.reject(index, f"{kind[:-1]} {str(row[0])[:80]}: {why}")
        return
    tally.done[kind] += 1
    if not exists:
        tally.new[kind] += 1


def _recount(w: Writer, tally: _Tally, kinds: set[str]) -> None:
    """Update the in-memory counts (and the products generation) once the job is durable."""
    counts = {
        k: w.db.execute(f"SELECT count(*) FROM {k}").fetchone()[0]
        for k in kinds & {"products", "blocks"}
    }
    new_tickets = tally.new["tickets"]

    def apply() -> None:
        w.counts.update(counts)
        w.counts["tickets"] += new_tickets
        if "products" in kinds:
            w.products_gen += 1

    w.after_commit(apply)


def delta(
    kind: SyncKind,
    from_version: int,
    to_version: int,
    rows: Sequence[tuple[int, tuple[Any, ...]]],
    deletes: Sequence[tuple[str, ...]],
    replace_all: bool,
    problems: Sequence[Problem],
) -> LargeFn:
    """Apply one delta (or a whole-table replacement) in one transaction, or report why not."""

    def steps(w: Writer) -> Steps:
        yield from ()  # a one-transaction job
        current = w.versions[kind]
        if to_version <= current:
            return DeltaResult("duplicate", kind, current)
        if not replace_all and from_version > current:
            return DeltaResult("gap", kind, current)
        tally = _Tally(problems)
        deleted = 0
        if replace_all:
            deleted = w.db.execute(f"DELETE FROM {kind}").rowcount
        for key in deletes:
            removed = w.db.execute(_DELETE[kind], key).rowcount
            deleted += removed
            if kind == "tickets":
                tally.new["tickets"] -= removed
        for index, row in rows:
            _upsert(w, kind, index, row, tally)
        w.set_state(f"{kind}_version", to_version)
        _recount(w, tally, {kind})

        def advanced() -> None:
            w.versions[kind] = to_version

        w.after_commit(advanced)
        return DeltaResult(
            "applied",
            kind,
            to_version,
            tally.done[kind],
            deleted,
            tally.rejected,
            tuple(tally.problems),
        )

    return steps


ImportRow = tuple[int, str, TicketRow | ProductRow | BlockRow | ZoneRow]


def import_rows(rows: Sequence[ImportRow]) -> LargeFn:
    """Upsert validated import rows (by line), a few thousand per transaction."""

    def steps(w: Writer) -> Steps:
        tally = _Tally(())
        for start in range(0, len(rows), ROWS_PER_STEP):
            if start:
                yield
            kinds = set()
            for index, kind, row in rows[start : start + ROWS_PER_STEP]:
                _upsert(w, kind, index, row, tally)
                kinds.add(kind)
            _recount(w, tally, kinds)
            tally.new["tickets"] = 0
        return tally.done, tally.rejected, tally.problems

    return steps
