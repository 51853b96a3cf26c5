"""Offline cache: the gate's local source of truth (SQLite through sqlite-utils).

Tickets, products, usage, blocks, zone occupancy, sync state and the outbox of events, in one
file (``gate.db``). ``Cache`` is the entry point; ``verify_chain`` and ``read_events`` work on
the file directly (gatectl, tests, the demo).
"""

from offline_cache.cache import Cache, validate_tickets
from offline_cache.errors import (
    CacheClosed,
    CacheError,
    RecordError,
    SchemaError,
    SiteKeyError,
    UnknownReservation,
)
from offline_cache.outbox import ChainReport, StoredEvent, read_events, verify_chain
from offline_cache.privacy import holder_hash, load_site_key
from offline_cache.values import (
    DeltaResult,
    ImportResult,
    Problem,
    Reservation,
    SnapshotResult,
    ValidatedChunk,
)

__all__ = [
    "Cache",
    "CacheClosed",
    "CacheError",
    "ChainReport",
    "DeltaResult",
    "ImportResult",
    "Problem",
    "RecordError",
    "Reservation",
    "SchemaError",
    "SiteKeyError",
    "SnapshotResult",
    "StoredEvent",
    "UnknownReservation",
    "ValidatedChunk",
    "holder_hash",
    "load_site_key",
    "read_events",
    "validate_tickets",
    "verify_chain",
]
