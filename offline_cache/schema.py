"""The cache's database file: connections, pragmas, the schema and its migrations.

One file (``gate.db`` in the state dir) holds tickets, products, usage, blocks, zones, sync
state and the outbox. ``PRAGMA user_version`` is the schema version; ``MIGRATIONS[n]`` takes
a database from version ``n`` to ``n + 1`` inside one transaction, so a crash mid-migration
leaves the previous version intact. To change the schema, append a function; never edit one
that has shipped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

from offline_cache.errors import SchemaError

TICKET_COLUMNS = (
    "id",
    "code",
    "channel",
    "product_id",
    "valid_from",
    "valid_to",
    "slot_start",
    "slot_end",
    "max_entries_per_day",
    "max_entries_total",
    "status",
    "holder_hash",
    "version",
)
"""Column order of the tickets table; ``records.TicketRow`` tuples follow it."""

STAGING = "tickets_staging"
RETIRED = "tickets_retired"


def tickets_ddl(table: str) -> str:
    """CREATE TABLE for the tickets table or its snapshot staging copy (indexes come later)."""
    # No inline UNIQUE/PRIMARY KEY: a snapshot loads into a bare table (10x faster than
    # keeping two random-order indexes up to date) and builds the indexes at the end.
    return f"""
        CREATE TABLE {table} (
            id TEXT NOT NULL,
            code TEXT NOT NULL,
            channel TEXT NOT NULL,
            product_id TEXT NOT NULL,
            valid_from REAL NOT NULL,
            valid_to REAL NOT NULL,
            slot_start REAL,
            slot_end REAL,
            max_entries_per_day INTEGER,
            max_entries_total INTEGER,
            status TEXT NOT NULL CHECK (status IN ('valid', 'refunded', 'revoked')),
            holder_hash TEXT,
            version INTEGER NOT NULL DEFAULT 0
        )"""


def ticket_index_ddl(table: str, generation: int) -> tuple[str, str, str]:
    """Unique indexes on id and code, and the holder index for ID cards, named by snapshot
    generation.

    SQLite cannot rename an index and a renamed table keeps its index names, so each
    snapshot's table gets names of its own and the swap never collides with the old ones.
    """
    return (
        f"CREATE UNIQUE INDEX tickets_id_g{generation} ON {table}(id)",
        f"CREATE UNIQUE INDEX tickets_code_g{generation} ON {table}(code)",
        # Partial: only real-name tickets carry a holder hash.
        f"CREATE INDEX tickets_holder_g{generation} ON {table}(holder_hash) "
        "WHERE holder_hash IS NOT NULL",
    )


def _v1(db: sqlite_utils.Database) -> None:
    """The full schema of the first release."""
    statements = [
        """CREATE TABLE products (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            zones TEXT NOT NULL,
            reentry TEXT,
            slot_grace_before_s REAL,
            slot_grace_after_s REAL,
            version INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID""",
        tickets_ddl("tickets"),
        *ticket_index_ddl("tickets", 0),
        """CREATE TABLE usage (
            ticket_id TEXT NOT NULL,
            zone TEXT NOT NULL,
            entries INTEGER NOT NULL DEFAULT 0,
            entries_today INTEGER NOT NULL DEFAULT 0,
            day TEXT,
            last_entry_at REAL,
            last_exit_at REAL,
            inside INTEGER NOT NULL DEFAULT 0,
            last_lane TEXT,
            PRIMARY KEY (ticket_id, zone)
        ) WITHOUT ROWID""",
        """CREATE TABLE blocks (
            kind TEXT NOT NULL CHECK (kind IN ('ticket', 'holder', 'face')),
            value TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT '',
            until REAL,
            version INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (kind, value)
        ) WITHOUT ROWID""",
        """CREATE TABLE zones (
            zone TEXT PRIMARY KEY,
            capacity INTEGER CHECK (capacity IS NULL OR capacity >= 0),
            occupancy INTEGER NOT NULL DEFAULT 0 CHECK (occupancy >= 0)
        ) WITHOUT ROWID""",
        "CREATE TABLE sync_state (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
        # AUTOINCREMENT: a number is never reused, even after acknowledged rows are deleted.
        """CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            lane TEXT,
            data TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )""",
        "CREATE INDEX outbox_kind ON outbox(kind)",
        # Rows are only ever appended or (once acknowledged) deleted; an edit is tampering.
        """CREATE TRIGGER outbox_append_only BEFORE UPDATE ON outbox
           BEGIN SELECT RAISE(ABORT, 'the outbox is append-only'); END""",
        "INSERT INTO sync_state (key, value) VALUES ('tickets_generation', 0)",
    ]
    for sql in statements:
        db.execute(sql)


def _v2(db: sqlite_utils.Database) -> None:
    """Nonces of signed cloud messages already applied, kept until the message expires."""
    db.execute("CREATE TABLE nonces (nonce TEXT PRIMARY KEY, exp REAL NOT NULL) WITHOUT ROWID")


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_v1, _v2)
SCHEMA_VERSION = len(MIGRATIONS)


def connect(path: Path, *, writer: bool = False) -> sqlite_utils.Database:
    """Open the file with the pragmas this cache relies on; the writer gets durable commits."""
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), never
    # opened behind our back by the sqlite3 module. check_same_thread=False: the cache
    # hands each connection to exactly one thread, but opens and closes it from another.
    conn = sqlite3.connect(
        str(path),
        isolation_level=None,
        check_same_thread=False,
        timeout=5.0 if writer else 0.5,
    )
    db = sqlite_utils.Database(conn, execute_plugins=False)
    if writer:
        # FULL: a commit that returned is on disk, even if the power goes a moment later.
        db.execute("PRAGMA synchronous=FULL")
        # FAST: freed pages of deleted rows are zeroed where that costs no extra I/O.
        db.execute("PRAGMA secure_delete=FAST")
        # Index builds of a 1 M-ticket snapshot pass ~40 MB through the WAL: shrink it after.
        db.execute("PRAGMA journal_size_limit=67108864")
        db.execute("PRAGMA cache_size=-8000")
    else:
        db.execute("PRAGMA query_only=1")
        # No mmap: mapped pages count in RSS, and a million random lookups touch them all.
        db.execute("PRAGMA cache_size=-16000")
    return db


def user_version(db: sqlite_utils.Database) -> int:
    """The schema version recorded in the file."""
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    return version


def migrate(db: sqlite_utils.Database) -> int:
    """Bring the file up to SCHEMA_VERSION (WAL on); returns the version it started at."""
    start = user_version(db)
    if start > SCHEMA_VERSION:
        raise SchemaError(
            f"database schema version {start} is newer than this software "
            f"({SCHEMA_VERSION}); refusing to touch it"
        )
    if start >= 1 and "outbox" not in db.table_names():
        raise SchemaError(
            "database has a user_version but no outbox table: not a gate-agent cache "
            "(an event store from before the cache?)"
        )
    db.execute("PRAGMA journal_mode=WAL")
    for version in range(start, SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[version](db)
            db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return start
