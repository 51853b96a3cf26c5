"""The gate's local source of truth: what the rules decide on, and what the cloud must hear.

Threads and ownership:
- one writer thread owns every write (``writer.Writer``); callers never wait on the disk
  unless they ask for a future and wait on it;
- reads for decisions run on the caller's thread (the daemon's event loop) with their own
  connection per thread; WAL lets them run while the writer commits or a snapshot loads;
- reservations live in memory, owned by the event-loop thread: a crash or restart releases
  them all by construction, which is what "a reservation left by a crash is released on
  start-up" needs. An entry that was reserved but never committed was never used.

A reservation counts as used (``Situation.held``) from ``reserve`` until its commit is
durable; the writer marks it done only after COMMIT returned, and a lookup counts the holds
before it reads usage, so an entry is never missing from both (it may briefly be in both:
the safe side).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlite_utils
import uuid_utils

from offline_cache import sync
from offline_cache.errors import CacheClosed, CacheError, RecordError, UnknownReservation
from offline_cache.outbox import ChainReport, StoredEvent, data_json, verify_chain
from offline_cache.records import (
    MAX_CODE,
    SyncKind,
    block_row,
    delete_key,
    product_from_row,
    product_row,
    ticket_row,
    zone_row,
)
from offline_cache.schema import connect, migrate
from offline_cache.values import (
    DeltaResult,
    Hold,
    ImportResult,
    Problem,
    Reservation,
    SnapshotResult,
    ValidatedChunk,
)
from offline_cache.writer import Writer
from verify.model import (
    Block,
    Decision,
    Point,
    Policy,
    Product,
    Situation,
    Ticket,
    Usage,
    local_day,
)

log = logging.getLogger(__name__)

SNAPSHOT_CHUNK = 10_000
"""Records validated and handed to the writer at a time by import_records."""
YIELD_EVERY = 25
"""Records validated (~6 us each) between voluntary GIL releases. A thread that keeps the
GIL makes the event loop wait at every SQLite call of a lookup: validating 200 records
between releases put lookup p99 at 3-7 ms while a snapshot loaded; 25 keeps it under 1 ms.
Whoever produces the chunks (the sync client) must be as polite."""

_TICKET_BY_CODE = (
    "SELECT id, code, channel, product_id, valid_from, valid_to, slot_start, slot_end, "
    "max_entries_per_day, max_entries_total, status, holder_hash, version "
    "FROM tickets WHERE code = ?"
)
_TICKET_BY_ID = _TICKET_BY_CODE.replace("WHERE code = ?", "WHERE id = ?")
_TICKETS_BY_HOLDER = _TICKET_BY_CODE.replace(
    "WHERE code = ?", "WHERE holder_hash = ? ORDER BY valid_from LIMIT 20"
)
_USAGE = (
    "SELECT zone, entries, entries_today, day, last_entry_at, last_exit_at, inside, last_lane "
    "FROM usage WHERE ticket_id = ?"
)
_BLOCKS = (
    "SELECT kind, value, reason, until FROM blocks "
    "WHERE ((kind = 'ticket' AND value = ?) OR (kind = 'holder' AND value = ?) "
    "OR (kind = 'face' AND value = ?)) AND (until IS NULL OR until > ?)"
)
_ZONE = "SELECT capacity, occupancy FROM zones WHERE zone = ?"
_PRODUCTS = (
    "SELECT id, name, zones, reentry, slot_grace_before_s, slot_grace_after_s, version "
    "FROM products"
)


def _append(event_id: str, ts: float, kind: str, lane: str | None, data: str) -> Any:
    def job(w: Writer) -> int:
        return w.insert_event(event_id, ts, kind, lane, data)[0]

    return job


def _commit_passage(hold: Hold, at: float, event_id: str, utc_offset_s: int) -> Any:
    """The passage transaction: usage, occupancy and the outbox row commit together."""
    r = hold.reservation

    def job(w: Writer) -> StoredEvent:
        db = w.db
        row = db.execute(
            "SELECT entries, entries_today, day FROM usage WHERE ticket_id = ? AND zone = ?",
            [r.ticket_id, r.zone],
        ).fetchone()
        entries, today, day = row if row else (0, 0, None)
        data: dict[str, Any] = {
            "ticket_id": r.ticket_id,
            "zone": r.zone,
            "direction": r.direction,
            "reservation": r.id,
        }
        if r.direction == "entry":
            now_day = local_day(at, utc_offset_s)
            today = today + 1 if day == now_day else 1
            db.execute(
                "INSERT INTO usage (ticket_id, zone, entries, entries_today, day, last_entry_at, "
                "inside, last_lane) VALUES (?, ?, ?, ?, ?, ?, 1, ?) ON CONFLICT(ticket_id, zone) "
                "DO UPDATE SET entries = excluded.entries, entries_today = excluded.entries_today, "
                "day = excluded.day, last_entry_at = excluded.last_entry_at, inside = 1, "
                "last_lane = excluded.last_lane",
                [r.ticket_id, r.zone, entries + 1, today, now_day, at, r.lane],
            )
            db.execute(
                "INSERT INTO zones (zone, occupancy) VALUES (?, 1) "
                "ON CONFLICT(zone) DO UPDATE SET occupancy = occupancy + 1",
                [r.zone],
            )
            data["entries"] = entries + 1
        else:
            db.execute(
                "INSERT INTO usage (ticket_id, zone, last_exit_at, inside, last_lane) "
                "VALUES (?, ?, ?, 0, ?) ON CONFLICT(ticket_id, zone) DO UPDATE SET "
                "last_exit_at = excluded.last_exit_at, inside = 0, last_lane = excluded.last_lane",
                [r.ticket_id, r.zone, at, r.lane],
            )
            db.execute(
                "UPDATE zones SET occupancy = max(occupancy - 1, 0) WHERE zone = ?", [r.zone]
            )
        payload = data_json(data)
        seq, prev, digest = w.insert_event(event_id, at, "passage", r.lane, payload)

        def durable() -> None:
            hold.done = True

        w.after_commit(durable)
        return StoredEvent(seq, event_id, at, "passage", r.lane, data, prev, digest)

    return job


def _mark_sent(up_to_seq: int) -> Any:
    def job(w: Writer) -> int:
        o = w.outbox
        if up_to_seq <= o.anchor_seq:
            return 0
        if up_to_seq > o.seq:
            raise ValueError(f"seq {up_to_seq} was never issued (last is {o.seq})")
        row = w.db.execute("SELECT hash FROM outbox WHERE seq = ?", [up_to_seq]).fetchone()
        if row is None:
            raise CacheError(f"outbox row {up_to_seq} is missing; cannot anchor the chain there")
        deleted: int = w.db.execute("DELETE FROM outbox WHERE seq <= ?", [up_to_seq]).rowcount
        w.set_state("outbox_anchor_seq", up_to_seq)
        w.set_state("outbox_anchor_hash", row[0])
        o.anchor_seq = up_to_seq
        w.rearm_quota()
        return deleted

    return job


def _set_state(key: str, value: Any) -> Any:
    def job(w: Writer) -> None:
        w.set_state(key, value)

    return job


def _remember_nonce(nonce: str, exp: float, now: float) -> Any:
    def job(w: Writer) -> bool:
        w.db.execute("DELETE FROM nonces WHERE exp < ?", [now])
        inserted: int = w.db.execute(
            "INSERT OR IGNORE INTO nonces (nonce, exp) VALUES (?, ?)", [nonce, exp]
        ).rowcount
        return inserted == 1

    return job


def _set_zone(zone: str, sql: str, value: int | None) -> Any:
    def job(w: Writer) -> None:
        w.db.execute(sql, [zone, value])

    return job


class Cache:
    """Tickets, usage, blocks, zones and the outbox of one gate, in one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        policy: Policy | None = None,
        site_key: bytes | None = None,
        max_events: int = 1_000_000,
        reservation_ttl_s: float = 120.0,
        max_rejected_fraction: float = 0.01,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.policy = policy or Policy()
        self.reservation_ttl_s = reservation_ttl_s
        self.max_rejected_fraction = max_rejected_fraction
        self._key = site_key
        db = connect(self.path, writer=True)
        try:
            migrate(db)
            checkpoint_db = connect(self.path)
        except BaseException:
            db.close()
            raise
        try:
            self._writer = Writer(db, max_events=max_events, checkpoint_db=checkpoint_db)
            cloud_time = self._writer.get_state("cloud_time")
        except BaseException:
            db.close()
            checkpoint_db.close()
            raise
        self._cloud_time: float | None = None if cloud_time is None else float(cloud_time)
        self._local = threading.local()
        self._readers: list[sqlite_utils.Database] = []
        self._readers_lock = threading.Lock()
        self._snapshot_lock = threading.Lock()
        self._holds: dict[str, Hold] = {}
        # Tickets known only from a signed token, between situation_for_ticket and reserve.
        self._external: dict[str, tuple[Ticket, Product]] = {}
        self._products: dict[str, Product] = {}
        self._products_seen = -1
        self._closed = False
        self._writer.submit_large("clean-up", sync.clean_up)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread."""
        self._writer.start()

    def close(self, timeout_s: float = 30.0) -> None:
        """Write everything queued, stop the writer, close every connection."""
        if self._closed:
            return
        self._closed = True
        self._writer.stop(timeout_s)
        with self._readers_lock:
            for db in self._readers:
                db.close()
            self._readers.clear()

    def __enter__(self) -> Cache:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _reader(self) -> sqlite_utils.Database:
        db: sqlite_utils.Database | None = getattr(self._local, "db", None)
        if db is None:
            if self._closed:
                raise CacheClosed("the cache is closed")
            db = connect(self.path)
            self._local.db = db
            with self._readers_lock:
                self._readers.append(db)
        return db

    def _require_running(self) -> None:
        if self._closed:
            raise CacheClosed("the cache is closed")
        if not self._writer.alive:
            raise CacheError("the cache's writer is not running: call start() first")

    # --- events ---------------------------------------------------------------------------

    def append(self, kind: str, lane: str | None = None, **data: Any) -> str:
        """Queue one event for the outbox; returns its id. Never blocks on the disk."""
        event_id = str(uuid_utils.uuid7())
        job = _append(event_id, time.time(), str(kind), lane, data_json(data))
        self._writer.submit(f"event {kind}", job, future=False)
        return event_id

    def mark_sent(self, up_to_seq: int) -> Future[int]:
        """Delete events the cloud acknowledged (seq <= up_to_seq), anchoring the chain there."""
        future = self._writer.submit("mark sent", _mark_sent(up_to_seq))
        assert future is not None
        return future

    def watch_outbox(self, fn: Callable[[int], None] | None) -> None:
        """Call ``fn(seq)`` on the writer thread after each commit that adds events."""
        self._writer.on_events = fn

    @property
    def outbox_range(self) -> tuple[int, int]:
        """(anchor seq, newest committed seq): events after the anchor are still unsent."""
        return self._writer.outbox.anchor_seq, self._writer.committed_seq

    def verify_chain(self) -> ChainReport:
        """Verify the outbox's sequence and hash chain (reads on its own connection)."""
        return verify_chain(self.path)

    # --- products ---------------------------------------------------------------------------

    def _product(self, product_id: str) -> Product | None:
        gen = self._writer.products_gen
        if gen != self._products_seen:
            products = {}
            for row in self._reader().execute(_PRODUCTS).fetchall():
                try:
                    products[row[0]] = product_from_row(row)
                except (ValueError, KeyError, TypeError):
                    log.error("cache: product %s is unreadable; its tickets are refused", row[0])
            self._products = products
            self._products_seen = gen
        return self._products.get(product_id)

    # --- deciding ---------------------------------------------------------------------------

    def _active_holds(self) -> list[Hold]:
        done = [rid for rid, h in self._holds.items() if h.done]
        for rid in done:
            del self._holds[rid]
        return list(self._holds.values())

    def holds(self, reservation_id: str) -> bool:
        """True while this reservation is held and not yet committed or given back."""
        hold = self._holds.get(reservation_id)
        return hold is not None and not hold.done

    @property
    def reservations(self) -> tuple[Reservation, ...]:
        """Reservations currently held (committed ones drop out once durable)."""
        return tuple(h.reservation for h in self._active_holds())

    def situation(
        self, code: str, point: Point, now: float, *, face_id: str | None = None
    ) -> Situation:
        """Everything the rules need about the ticket with this code, at this point.

        ``usage.entries_today`` and ``ticket_entries_today`` count the site's local day of
        ``now`` (0 after midnight); ``held`` and ``occupancy`` include other lanes'
        uncommitted entries. Raises CacheError only if the database itself fails.
        """
        if not isinstance(code, str) or not code or len(code) > MAX_CODE:
            return Situation(None, cloud_time=self._cloud_time)
        try:
            row = self._reader().execute(_TICKET_BY_CODE, [code]).fetchone()
        except UnicodeEncodeError:
            # A code with lone surrogates cannot be any stored ticket's code.
            return Situation(None, cloud_time=self._cloud_time)
        except sqlite3.Error as exc:
            raise CacheError(f"ticket lookup failed: {exc}") from exc
        if row is None:
            return Situation(None, cloud_time=self._cloud_time)
        return self._situation(Ticket(*row), point, now, face_id)

    def holder_tickets(self, holder_hash: str) -> list[Ticket]:
        """The real-name tickets bound to one holder (an ID card's keyed hash)."""
        if not holder_hash:
            return []
        try:
            rows = self._reader().execute(_TICKETS_BY_HOLDER, [holder_hash]).fetchall()
        except (sqlite3.Error, UnicodeEncodeError) as exc:
            raise CacheError(f"holder lookup failed: {exc}") from exc
        return [Ticket(*row) for row in rows]

    def situation_of(self, ticket: Ticket, point: Point, now: float) -> Situation:
        """The situation of a cached ticket already looked up (by holder, say)."""
        return self._situation(ticket, point, now, None)

    def situation_for_ticket(
        self, ticket: Ticket, product: Product, point: Point, now: float
    ) -> Situation:
        """The situation of a ticket the cache may never have seen (a signed token).

        Usage and blocks are found by the ticket id like any other; a cached ticket row with
        the same id that is revoked or refunded wins over the token, so a refund reaches
        tokens that were issued before it.
        """
        try:
            row = self._reader().execute(_TICKET_BY_ID, [ticket.id]).fetchone()
        except (sqlite3.Error, UnicodeEncodeError) as exc:
            raise CacheError(f"ticket lookup failed: {exc}") from exc
        if row is not None and row[10] != "valid":
            ticket = replace(ticket, status=row[10])
        self._external[ticket.id] = (ticket, product)
        while len(self._external) > 256:
            # Looked up but never reserved (a refusal, a gatectl lookup): forget the oldest.
            del self._external[next(iter(self._external))]
        return replace(self._situation(ticket, point, now, None), product=product)

    def _situation(
        self, ticket: Ticket, point: Point, now: float, face_id: str | None
    ) -> Situation:
        # Holds first, then usage: see the module docstring for why this order is safe.
        held, _, zone_pending = self._held(ticket.id, point.zone, "entry")
        db = self._reader()
        try:
            usage_rows = db.execute(_USAGE, [ticket.id]).fetchall()
            blocks: tuple[Block, ...] = ()
            if self._writer.counts["blocks"]:
                blocks = tuple(
                    Block(*b)
                    for b in db.execute(
                        _BLOCKS, [ticket.id, ticket.holder_hash, face_id, now]
                    ).fetchall()
                )
            zone = db.execute(_ZONE, [point.zone]).fetchone()
        except sqlite3.Error as exc:
            raise CacheError(f"usage lookup failed: {exc}") from exc
        today = local_day(now, self.policy.utc_offset_s)
        usage = Usage()
        entries = entries_today = 0
        for zone_name, n, n_today, day, last_in, last_out, inside, lane in usage_rows:
            # Day rollover at the site's midnight: yesterday's count is not today's. ``day``
            # stays the stored one (the day of the last entry), which the rules read too.
            n_today = n_today if day == today else 0
            entries += n
            entries_today += n_today
            if zone_name == point.zone:
                usage = Usage(n, n_today, day, last_in, last_out, bool(inside), lane)
        capacity, occupancy = zone if zone else (None, 0)
        return Situation(
            ticket=ticket,
            product=self._product(ticket.product_id),
            usage=usage,
            held=held,
            ticket_entries=entries,
            ticket_entries_today=entries_today,
            blocks=blocks,
            occupancy=occupancy + zone_pending,
            capacity=capacity,
            cloud_time=self._cloud_time,
        )

    def _held(self, ticket_id: str, zone: str, direction: str) -> tuple[int, int, int]:
        """Uncommitted holds: (this ticket+zone+direction, this ticket's entries, zone entries)."""
        same = ticket = pending = 0
        for h in self._active_holds():
            r = h.reservation
            if r.direction == "entry":
                if r.zone == zone:
                    pending += 1
                if r.ticket_id == ticket_id:
                    ticket += 1
            if r.ticket_id == ticket_id and r.zone == zone and r.direction == direction:
                same += 1
        return same, ticket, pending

    def reserve(self, decision: Decision, point: Point, now: float) -> Reservation | None:
        """Hold an allowed entry/exit for this lane; None if it would exceed a limit now."""
        self.release_stale(now)
        ticket_id = decision.ticket_id
        if not decision.allowed or ticket_id is None:
            return None
        if decision.zone is not None and decision.zone != point.zone:
            return None
        try:
            row = self._reader().execute(_TICKET_BY_ID, [ticket_id]).fetchone()
        except (sqlite3.Error, UnicodeEncodeError):
            return None
        external = self._external.pop(ticket_id, None)
        if row is not None and row[10] != "valid":
            return None
        if row is not None:
            ticket, product = Ticket(*row), self._product(row[3])
        elif external is not None:
            ticket, product = external
        else:
            return None
        same, _, _ = self._held(ticket.id, point.zone, point.direction)
        if same:
            # One person cannot pass two lanes into the same zone at once: the second lane
            # presenting this ticket right now is a shared or copied credential.
            log.info("cache: ticket already held on another lane; refused on %s", point.lane)
            return None
        if point.direction == "entry" and not self._room_for_entry(ticket, product, point, now):
            return None
        reservation = Reservation(
            str(uuid_utils.uuid7()), ticket.id, point.zone, point.lane, point.direction, now
        )
        self._holds[reservation.id] = Hold(reservation)
        return reservation

    def _room_for_entry(
        self, ticket: Ticket, product: Product | None, point: Point, now: float
    ) -> bool:
        """Limits re-checked with every other lane's uncommitted entries counted as used."""
        s = self._situation(ticket, point, now, None)
        _, ticket_held, _ = self._held(ticket.id, point.zone, "entry")
        if product is None or point.zone not in product.zones:
            return False
        zone_limit = product.zones[point.zone]
        checks = (
            (zone_limit, s.usage.entries + s.held),
            (ticket.max_entries_total, s.ticket_entries + ticket_held),
            (ticket.max_entries_per_day, s.ticket_entries_today + ticket_held),
            (s.capacity, s.occupancy),
        )
        return all(limit is None or used + 1 <= limit for limit, used in checks)

    def commit(self, reservation_id: str, at: float) -> Future[StoredEvent]:
        """Record the passage: usage, occupancy and the outbox event in one durable commit."""
        hold = self._holds.get(reservation_id)
        if hold is None or hold.done or hold.committing:
            failed: Future[StoredEvent] = Future()
            failed.set_exception(UnknownReservation(f"reservation {reservation_id} is not held"))
            return failed
        hold.committing = True
        job = _commit_passage(hold, float(at), str(uuid_utils.uuid7()), self.policy.utc_offset_s)
        future = self._writer.submit("passage", job)
        assert future is not None

        def settled(f: Future[StoredEvent]) -> None:
            if f.exception() is not None:
                # Still counted as used (the safe side) until the caller aborts it or it expires.
                hold.committing = False

        future.add_done_callback(settled)
        return future

    def abort(self, reservation_id: str, reason: str = "not_passed") -> bool:
        """Give the entry back (nobody passed); False if it is not held or is being committed."""
        hold = self._holds.get(reservation_id)
        if hold is None or hold.done or hold.committing:
            return False
        del self._holds[reservation_id]
        r = hold.reservation
        self.append(
            "not_passed",
            r.lane,
            ticket_id=r.ticket_id,
            zone=r.zone,
            direction=r.direction,
            reservation=r.id,
            reason=reason,
        )
        return True

    def release_stale(self, now: float) -> int:
        """Abort reservations older than the TTL (a lane that never reported back)."""
        stale = [
            rid
            for rid, h in self._holds.items()
            if not h.committing and not h.done and now - h.reservation.at > self.reservation_ttl_s
        ]
        for rid in stale:
            log.warning("cache: reservation on lane %s expired", self._holds[rid].reservation.lane)
            self.abort(rid, "expired")
        return len(stale)

    # --- settings ---------------------------------------------------------------------------

    @property
    def cloud_time(self) -> float | None:
        """The latest time the cloud told us, if any."""
        return self._cloud_time

    def set_cloud_time(self, t: float) -> Future[None]:
        """Remember the latest time the cloud told us (the device clock must not be before it)."""
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise ValueError("cloud time must be a finite number of epoch seconds")
        self._cloud_time = float(t)
        future = self._writer.submit("cloud time", _set_state("cloud_time", float(t)))
        assert future is not None
        return future

    def set_zone_capacity(self, zone: str, capacity: int | None) -> Future[None]:
        """Set (or with None, lift) the cap on people inside a zone."""
        zone, capacity = zone_row({"zone": zone, "capacity": capacity})
        future = self._writer.submit("zone capacity", _set_zone(zone, sync.ZONE_UPSERT, capacity))
        assert future is not None
        return future

    def set_occupancy(self, zone: str, occupancy: int) -> Future[None]:
        """Correct a zone's head count (e.g. reset at night after people left by other ways)."""
        if isinstance(occupancy, bool) or not isinstance(occupancy, int) or occupancy < 0:
            raise ValueError("occupancy must be a whole number >= 0")
        zone, _ = zone_row({"zone": zone})
        sql = (
            "INSERT INTO zones (zone, occupancy) VALUES (?, ?) "
            "ON CONFLICT(zone) DO UPDATE SET occupancy = excluded.occupancy"
        )
        future = self._writer.submit("occupancy", _set_zone(zone, sql, occupancy))
        assert future is not None
        return future

    def zones(self) -> dict[str, dict[str, int | None]]:
        """Capacity and head count of every zone the gate knows."""
        try:
            rows = self._reader().execute("SELECT zone, capacity, occupancy FROM zones").fetchall()
        except sqlite3.Error as exc:
            raise CacheError(f"zones lookup failed: {exc}") from exc
        return {z: {"capacity": cap, "occupancy": occ} for z, cap, occ in rows}

    # --- sync -------------------------------------------------------------------------------

    def remember_nonce(self, nonce: str, exp: float, now: float) -> Future[bool]:
        """Record a signed message's nonce until ``exp``; False if it was already recorded."""
        future = self._writer.submit("nonce", _remember_nonce(nonce, exp, now))
        assert future is not None
        return future

    def state(self, key: str, default: Any = None) -> Any:
        """A value kept in sync_state (e.g. the cloud's issuer keys), read on its own."""
        try:
            row = (
                self._reader()
                .execute("SELECT value FROM sync_state WHERE key = ?", [key])
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise CacheError(f"state lookup failed: {exc}") from exc
        return default if row is None else row[0]

    def save_state(self, key: str, value: Any) -> Future[None]:
        """Keep a value in sync_state, durably."""
        future = self._writer.submit(f"state {key}", _set_state(key, value))
        assert future is not None
        return future

    def versions(self) -> dict[str, int]:
        """Versions of tickets, products and blocks in force."""
        return dict(self._writer.versions)

    def apply_snapshot(
        self,
        version: int,
        chunks: Iterable[Sequence[Mapping[str, Any]] | ValidatedChunk],
        *,
        force: bool = False,
    ) -> SnapshotResult:
        """Replace all tickets with a streamed snapshot; blocks until swapped in.

        A chunk is a sequence of ticket records, or a ValidatedChunk of rows that
        ``validate_tickets`` made (in another process, say).

        Call it from a worker thread, not the event loop. Decisions keep using the old
        tickets until the swap. Apply the products of the same snapshot first.
        """
        self._require_running()
        started = time.monotonic()

        def seconds() -> float:
            return round(time.monotonic() - started, 3)

        with self._snapshot_lock:
            status = self._writer.submit_large("snapshot", sync.snapshot_begin(version, force))
            if (begun := status.result()) != "started":
                return SnapshotResult(begun, self._writer.versions["tickets"], seconds=seconds())
            problems: list[Problem] = []
            rejected = index = 0
            try:
                for chunk in chunks:
                    if isinstance(chunk, ValidatedChunk):
                        rows = chunk.rows
                        rejected += chunk.records - len(chunk.rows)
                        for problem in chunk.problems[: sync.MAX_PROBLEMS - len(problems)]:
                            problems.append(Problem(index + problem.line, problem.reason))
                        index += chunk.records
                        if rows:
                            self._writer.submit_large(
                                "snapshot rows", sync.snapshot_rows(rows)
                            ).result()
                        continue
                    rows = []
                    for rec in chunk:
                        index += 1
                        if not index % YIELD_EVERY:
                            time.sleep(0)
                        try:
                            rows.append(self._ticket(rec))
                        except RecordError as exc:
                            rejected += 1
                            if len(problems) < sync.MAX_PROBLEMS:
                                problems.append(Problem(index, str(exc)))
                    if rows:
                        self._writer.submit_large(
                            "snapshot rows", sync.snapshot_rows(rows)
                        ).result()
                finish = sync.snapshot_finish(
                    version, rejected, self.max_rejected_fraction, seconds
                )
                result: SnapshotResult = self._writer.submit_large("snapshot swap", finish).result()
            except BaseException:
                self._writer.submit_large("snapshot abandon", sync.snapshot_abandon)
                raise
        result = SnapshotResult(
            result.status,
            result.version,
            result.tickets,
            result.rejected,
            (*problems, *result.problems)[: sync.MAX_PROBLEMS],
            result.seconds,
        )
        level = logging.INFO if result.status == "applied" else logging.WARNING
        log.log(
            level,
            "cache: snapshot %d %s: %d tickets, %d rejected, %.1f s",
            version,
            result.status,
            result.tickets,
            result.rejected,
            result.seconds,
        )
        return result

    def validation_settings(self) -> tuple[bytes | None, int]:
        """The site key and UTC offset that validate_tickets needs to make this cache's rows."""
        return self._key, self.policy.utc_offset_s

    def _ticket(self, rec: object) -> Any:
        return ticket_row(rec, key=self._key, utc_offset_s=self.policy.utc_offset_s)

    def _row(self, kind: str, rec: object) -> tuple[Any, ...]:
        offset = self.policy.utc_offset_s
        if kind == "tickets":
            return ticket_row(rec, key=self._key, utc_offset_s=offset)
        if kind == "products":
            return product_row(rec)
        if kind == "blocks":
            return block_row(rec, key=self._key, utc_offset_s=offset)
        return zone_row(rec)

    def apply_delta(
        self,
        from_version: int,
        to_version: int,
        upserts: Sequence[Mapping[str, Any]],
        deletes: Sequence[str | Mapping[str, Any]] = (),
        *,
        kind: SyncKind = "tickets",
        replace_all: bool = False,
    ) -> Future[DeltaResult]:
        """Apply the changes from ``from_version`` to ``to_version`` of tickets, products or
        blocks in one transaction: ``applied``, ``duplicate`` (no-op) or ``gap`` (nothing
        applied: request a snapshot). ``replace_all`` (products, blocks) replaces the table."""
        if kind not in ("tickets", "products", "blocks"):
            raise ValueError(f"kind must be tickets, products or blocks, not {kind!r}")
        if replace_all and kind == "tickets":
            raise ValueError("replace all tickets with apply_snapshot, not a delta")
        for v in (from_version, to_version):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError("versions must be whole numbers >= 0")
        if to_version <= from_version:
            raise ValueError("to_version must be greater than from_version")
        rows: list[tuple[int, tuple[Any, ...]]] = []
        keys: list[tuple[str, ...]] = []
        problems: list[Problem] = []
        for index, rec in enumerate(upserts, 1):
            try:
                rows.append((index, self._row(kind, rec)))
            except RecordError as exc:
                problems.append(Problem(index, str(exc)))
        for index, gone in enumerate(deletes, len(rows) + len(problems) + 1):
            try:
                keys.append(delete_key(kind, gone, key=self._key))
            except RecordError as exc:
                problems.append(Problem(index, f"delete: {exc}"))
        job = sync.delta(kind, from_version, to_version, rows, keys, replace_all, problems)
        return self._writer.submit_large(f"{kind} delta", job)

    def import_records(self, records: Iterable[str | bytes | Mapping[str, Any]]) -> ImportResult:
        """Import JSON lines (or dicts) of tickets, products, blocks and zones; bad lines are
        reported by line number and skipped. Blocks until written; call from a worker."""
        self._require_running()
        done = {"tickets": 0, "products": 0, "blocks": 0, "zones": 0}
        problems: list[Problem] = []
        rejected = 0
        batch: list[sync.ImportRow] = []

        def flush() -> None:
            nonlocal rejected
            if batch:
                job = sync.import_rows(list(batch))
                counts, bad, found = self._writer.submit_large("import", job).result()
                for k, n in counts.items():
                    done[k] += n
                rejected += bad
                problems.extend(found[: sync.MAX_PROBLEMS - len(problems)])
                batch.clear()

        for line, rec in enumerate(records, 1):
            if not line % YIELD_EVERY:
                time.sleep(0)
            try:
                kind, row = self._import_row(rec)
            except RecordError as exc:
                rejected += 1
                if len(problems) < sync.MAX_PROBLEMS:
                    problems.append(Problem(line, str(exc)))
                continue
            if kind:
                batch.append((line, kind, row))
            if len(batch) >= SNAPSHOT_CHUNK:
                flush()
        flush()
        problems.sort()
        result = ImportResult(
            done["tickets"],
            done["products"],
            done["blocks"],
            done["zones"],
            rejected,
            tuple(problems),
        )
        log.info(
            "cache: imported %d tickets, %d products, %d blocks, %d zones; %d lines rejected",
            result.tickets,
            result.products,
            result.blocks,
            result.zones,
            result.rejected,
        )
        return result

    def _import_row(self, rec: str | bytes | Mapping[str, Any]) -> tuple[str, Any]:
        if isinstance(rec, bytes | bytearray):
            try:
                rec = rec.decode("utf-8")
            except UnicodeDecodeError:
                raise RecordError("line is not UTF-8") from None
        if isinstance(rec, str):
            if not rec.strip() or rec.lstrip().startswith("#"):
                return "", None
            try:
                rec = json.loads(rec)
            except ValueError as exc:
                # JSONDecodeError's message gives a position, never the text.
                raise RecordError(f"not valid JSON ({exc.args[0].split(':')[0]})") from None
        if not isinstance(rec, Mapping):
            raise RecordError("expected a JSON object")
        kinds = {"ticket": "tickets", "product": "products", "block": "blocks", "zone": "zones"}
        kind = kinds.get(str(rec.get("type")))
        if kind is None:
            raise RecordError("type: expected ticket, product, block or zone")
        return kind, self._row(kind, rec)

    # --- status -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counts, versions, outbox depth and age, file size, reservations (JSON-ready)."""
        w = self._writer
        o = w.outbox
        oldest_age = None
        try:
            row = self._reader().execute("SELECT ts FROM outbox ORDER BY seq LIMIT 1").fetchone()
            if row is not None:
                oldest_age = round(max(0.0, time.time() - row[0]), 1)
        except (sqlite3.Error, CacheClosed):
            pass
        size = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                size += Path(f"{self.path}{suffix}").stat().st_size
        return {
            "written": w.written,
            "failed": w.failed,
            "queued": w.queued,
            "write_errors": w.write_errors,
            "writer_alive": w.alive,
            "tickets": w.counts["tickets"],
            "products": w.counts["products"],
            "blocks": w.counts["blocks"],
            "versions": dict(w.versions),
            "cloud_time": self._cloud_time,
            "outbox": {
                "depth": o.depth,
                "last_seq": o.seq,
                "max_events": w.max_events,
                "alarm": ("none", "near_full", "full")[o.alarm],
                "oldest_age_s": oldest_age,
            },
            "db_bytes": size,
            "reservations": len(self._active_holds()),
        }


def validate_tickets(
    records: Sequence[object], key: bytes | None, utc_offset_s: int
) -> ValidatedChunk:
    """Validate ticket records into snapshot rows; pure, so another process can do it."""
    rows: list[tuple[Any, ...]] = []
    problems: list[Problem] = []
    for n, rec in enumerate(records, 1):
        try:
            rows.append(ticket_row(rec, key=key, utc_offset_s=utc_offset_s))
        except RecordError as exc:
            if len(problems) < sync.MAX_PROBLEMS:
                problems.append(Problem(n, str(exc)))
    return ValidatedChunk(rows, len(records), tuple(problems))
