"""The one thread that writes to the cache's database, and the outbox chain it extends.

Two queues feed it. Small jobs (events, passage commits, settings) are drained together into
one transaction, each inside its own savepoint: a job that fails is rolled back alone and the
others still commit, with one fsync for the lot (group commit). Large jobs (snapshot chunks,
deltas, imports) are generators that do one transaction per step; between steps the writer
runs whatever small jobs are waiting, so a passage never waits behind a whole snapshot.
A job's future resolves only after its transaction committed (synchronous=FULL: on disk).

When the disk itself fails (``sqlite3.OperationalError``: full, I/O error, locked) the batch
is put back at the head of the queue and retried with back-off: events wait in memory,
they are never dropped.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import sqlite_utils
import uuid_utils

from offline_cache.errors import CacheClosed
from offline_cache.outbox import anchor, chain_hash, data_json, event_canonical, issued_seq

log = logging.getLogger(__name__)

MAX_BATCH = 500
"""Small jobs per group-commit transaction (a burst of 500 events is one fsync)."""
CHECKPOINT_EVERY_S = 0.5
# After each step of a bulk job (a chunk of snapshot rows, say) the writer sleeps this long,
# so the event loop gets the GIL: measured, 1 M-row snapshot decisions p99 9.5 ms with it vs
# 12.7 ms without, for ~4 s more on the whole snapshot.
LARGE_STEP_PAUSE_S = 0.004
"""At most one WAL checkpoint per interval, on its own thread (see ``_checkpoints``)."""
NEAR_FULL = 0.8
REARM = 0.7
BACKOFF_MAX_S = 5.0

_TRANSIENT = {5, 6, 7, 10, 13, 14, 15}
"""SQLite primary result codes that say the disk or a lock failed, not the job: BUSY, LOCKED,
NOMEM, IOERR, FULL, CANTOPEN, PROTOCOL. A job failing so is retried; any other error fails it."""

SmallFn = Callable[["Writer"], Any]
LargeFn = Callable[["Writer"], Generator[None, None, Any]]


@dataclass
class OutboxState:
    """The chain's head as the writer extends it (restored when a transaction rolls back)."""

    seq: int
    hash: str
    anchor_seq: int
    alarm: int
    """0 none; 1 near full raised; 2 full raised (re-armed when the depth falls again)."""

    @property
    def depth(self) -> int:
        """Events stored and not yet acknowledged."""
        return self.seq - self.anchor_seq


@dataclass(slots=True)
class _Job:
    what: str
    small: SmallFn | None
    large: LargeFn | None
    future: Future[Any] | None
    steps: Generator[None, None, Any] | None = None


def _transient(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.OperationalError) and code is not None and code & 0xFF in _TRANSIENT
    )


def _fail(job: _Job, exc: BaseException) -> None:
    if job.future is not None:
        if not job.future.done():
            job.future.set_exception(exc)
    else:
        log.error("cache writer: %s failed and was not written: %r", job.what, exc)


class Writer:
    """Owns the write connection and everything that changes the file."""

    def __init__(
        self,
        db: sqlite_utils.Database,
        *,
        max_events: int,
        checkpoint_db: sqlite_utils.Database | None = None,
    ) -> None:
        self.db = db
        self.max_events = max_events
        self._checkpoint_db = checkpoint_db
        self._checkpoint_due = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if checkpoint_db is not None:
            # Checkpoints move to their own thread: run by the committing connection they
            # copy ~4 MB and fsync the db file inside a passage commit (measured: commit
            # p99 66 ms while a snapshot loads). PASSIVE runs alongside the writer.
            db.execute("PRAGMA wal_autocheckpoint=0")
        self._cv = threading.Condition()
        self._small: deque[_Job] = deque()
        self._large: deque[_Job] = deque()
        self._current: _Job | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wake = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._backoff = 0.0
        self.written = 0
        self.failed = 0
        self.write_errors = 0
        self.outbox = self._load_outbox()
        self.committed_seq = self.outbox.seq
        """The newest outbox seq that is on disk (readers on other connections can see it)."""
        self.on_events: Callable[[int], None] | None = None
        """Called on the writer thread with committed_seq after a commit that added events."""
        self.counts = {
            "tickets": self._count("tickets"),
            "products": self._count("products"),
            "blocks": self._count("blocks"),
        }
        self.versions = {k: int(self.get_state(f"{k}_version", 0)) for k in self.counts}
        self.products_gen = 0
        """Bumped after every committed product change; readers reload their product dict."""

    # --- set-up ---------------------------------------------------------------------------

    def _count(self, table: str) -> int:
        count: int = self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        return count

    def _load_outbox(self) -> OutboxState:
        anchor_seq, anchor_hash = anchor(self.db)
        seq = max(issued_seq(self.db), anchor_seq)
        head = anchor_hash
        if seq > anchor_seq:
            row = self.db.execute(
                "SELECT seq, hash FROM outbox WHERE seq <= ? ORDER BY seq DESC LIMIT 1", [seq]
            ).fetchone()
            if row is None or row[0] != seq:
                # The chain is broken; verify_chain will say where. Carry on from what is
                # there so events keep being recorded, never refused.
                log.error("outbox: the newest row (seq %d) is missing; chain broken", seq)
            if row is not None:
                head = row[1]
        alarm = int(self.get_state("outbox_alarm", 0))
        return OutboxState(seq, head, anchor_seq, alarm)

    def start(self) -> None:
        """Start the writer thread (jobs submitted before this wait in the queue)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
            self._thread.start()
        if self._checkpointer is None and self._checkpoint_db is not None:
            self._checkpointer = threading.Thread(
                target=self._checkpoints, name="cache-checkpoint", daemon=True
            )
            self._checkpointer.start()

    def _checkpoints(self) -> None:
        """Copy committed WAL frames into the db file, at most every CHECKPOINT_EVERY_S."""
        db = self._checkpoint_db
        assert db is not None
        try:
            while True:
                self._checkpoint_due.wait()
                self._checkpoint_due.clear()
                if self._stopping and self._thread is not None and not self._thread.is_alive():
                    return
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    log.debug("cache checkpoint: %s", exc)
                self._wake.wait(CHECKPOINT_EVERY_S)
        finally:
            db.close()

    @property
    def alive(self) -> bool:
        """True while the writer thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Jobs waiting for the writer (including a large job in progress)."""
        return len(self._small) + len(self._large) + (self._current is not None)

    def stop(self, timeout_s: float) -> bool:
        """Finish every queued job, then stop; False if the timeout passed first."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._wake.set()
        if self._thread is None:
            # Never started: start now so that what was queued still gets written.
            self.start()
        thread = self._thread
        assert thread is not None
        thread.join(timeout_s)
        if thread.is_alive():
            log.error("cache writer: %d jobs still unwritten at shutdown", self.queued)
            return False
        if self._checkpointer is not None:
            self._checkpoint_due.set()
            self._checkpointer.join(timeout_s)
        return True

    # --- submitting (any thread) ----------------------------------------------------------

    def submit(self, what: str, fn: SmallFn, *, future: bool = True) -> Future[Any] | None:
        """Queue a small job; its future (if asked for) resolves once it is durable."""
        job = _Job(what, fn, None, Future() if future else None)
        with self._cv:
            if self._stopping:
                self.failed += 1
                _fail(job, CacheClosed(f"{what}: the cache is closed"))
                return job.future
            self._small.append(job)
            self._cv.notify()
        return job.future

    def submit_large(self, what: str, fn: LargeFn) -> Future[Any]:
        """Queue a large job: a generator doing one transaction per step."""
        future: Future[Any] = Future()
        job = _Job(what, None, fn, future)
        with self._cv:
            if self._stopping:
                future.set_exception(CacheClosed(f"{what}: the cache is closed"))
                return future
            self._large.append(job)
            self._cv.notify()
        return future

    # --- helpers for jobs (writer thread, inside a transaction) ---------------------------

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the writer thread once the current transaction is durable."""
        self._callbacks.append(fn)

    def get_state(self, key: str, default: Any = None) -> Any:
        """A value from sync_state (versions, anchor, cloud time, alarm level)."""
        row = self.db.execute("SELECT value FROM sync_state WHERE key = ?", [key]).fetchone()
        return default if row is None else row[0]

    def set_state(self, key: str, value: Any) -> None:
        """Set a sync_state value in the current transaction."""
        self.db.execute(
            "INSERT INTO sync_state (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, value],
        )

    def insert_event(
        self, event_id: str, ts: float, kind: str, lane: str | None, data: str
    ) -> tuple[int, str, str]:
        """Append one event to the chain; returns (seq, prev_hash, hash)."""
        # The column types decide what verify_chain reads back (REAL, TEXT): hash exactly that.
        ts, kind = float(ts), str(kind)
        lane = None if lane is None else str(lane)
        o = self.outbox
        seq, prev = o.seq + 1, o.hash
        digest = chain_hash(prev, event_canonical(event_id, seq, ts, kind, lane, data))
        self.db.execute(
            "INSERT INTO outbox (seq, id, ts, kind, lane, data, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [seq, event_id, ts, kind, lane, data, prev, digest],
        )
        o.seq, o.hash = seq, digest
        self._check_quota()
        return seq, prev, digest

    def _check_quota(self) -> None:
        o, limit = self.outbox, self.max_events
        if o.depth >= NEAR_FULL * limit and o.alarm < 1:
            self._alarm(1, "outbox_near_full")
        if o.depth >= limit and o.alarm < 2:
            self._alarm(2, "outbox_full")

    def _alarm(self, level: int, kind: str) -> None:
        o, limit = self.outbox, self.max_events
        o.alarm = level
        depth = o.depth
        self.set_state("outbox_alarm", level)
        data = data_json({"depth": depth, "max_events": limit})
        self.insert_event(str(uuid_utils.uuid7()), time.time(), kind, None, data)
        logger = log.error if level == 2 else log.warning
        self.after_commit(lambda: logger("outbox: %s (%d of %d events unsent)", kind, depth, limit))

    def rearm_quota(self) -> None:
        """After rows were removed: let the alarms fire again once the depth has fallen."""
        o, limit = self.outbox, self.max_events
        level = o.alarm
        if o.depth < REARM * limit:
            level = 0
        elif o.depth < limit:
            level = min(level, 1)
        if level != o.alarm:
            o.alarm = level
            self.set_state("outbox_alarm", level)

    # --- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._small or self._large or self._current):
                        if self._stopping:
                            return
                        self._cv.wait()
                    jobs = [self._small.popleft() for _ in range(min(MAX_BATCH, len(self._small)))]
                    if not jobs and self._current is None:
                        self._current = self._large.popleft()
                try:
                    if jobs:
                        self._run_small(jobs)
                    else:
                        self._step_large()
                except Exception:
                    # Nothing may stop the writer: log, and the next loop carries on.
                    log.exception("cache writer: unexpected failure")
        finally:
            self.db.close()

    def _exec(self, sql: str) -> None:
        self.db.conn.execute(sql)

    def _rollback(self) -> None:
        if self.db.conn.in_transaction:
            self._exec("ROLLBACK")

    def _retry_later(self, jobs: list[_Job], exc: BaseException) -> None:
        """The disk refused a batch: put it back in front and wait before trying again."""
        self.write_errors += 1
        with self._cv:
            self._small.extendleft(reversed(jobs))
        if self._backoff == 0.0:
            log.error("cache writer: write failed (%s); retrying, events held in memory", exc)
        else:
            log.debug("cache writer: write still failing (%s)", exc)
        self._backoff = min(max(0.05, self._backoff * 2), BACKOFF_MAX_S)
        if self._wake.is_set():
            # Stopping: keep trying until close() gives up, but without spinning.
            time.sleep(0.05)
        else:
            self._wake.wait(self._backoff)

    def _recovered(self) -> None:
        if self._backoff:
            log.warning("cache writer: writes succeed again")
            self._backoff = 0.0

    def _run_small(self, jobs: list[_Job]) -> None:
        saved = replace(self.outbox)
        self._callbacks = []
        try:
            self._exec("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._retry_later(jobs, exc)
            return
        ran: list[tuple[_Job, Any]] = []
        for index, job in enumerate(jobs):
            state, marks = replace(self.outbox), len(self._callbacks)
            self._exec("SAVEPOINT job")
            try:
                assert job.small is not None
                result = job.small(self)
            except Exception as exc:
                if _transient(exc):
                    self._rollback()
                    self.outbox = saved
                    self._retry_later([j for j, _ in ran] + jobs[index:], exc)
                    return
                self.failed += 1
                self.outbox = state
                del self._callbacks[marks:]
                if self.db.conn.in_transaction:
                    self._exec("ROLLBACK TO job")
                    self._exec("RELEASE job")
                    _fail(job, exc)
                    continue
                # The error ended the whole transaction (a RAISE(ROLLBACK) trigger):
                # fail this job, put the others back.
                _fail(job, exc)
                self.outbox = saved
                with self._cv:
                    self._small.extendleft(reversed([j for j, _ in ran] + jobs[index + 1 :]))
                return
            self._exec("RELEASE job")
            ran.append((job, result))
        try:
            self._exec("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self.outbox = saved
            self._retry_later([j for j, _ in ran], exc)
            return
        self._recovered()
        self._checkpoint_due.set()
        self._after(ran)

    def _after(self, ran: list[tuple[_Job, Any]]) -> None:
        callbacks, self._callbacks = self._callbacks, []
        if self.outbox.seq != self.committed_seq:
            self.committed_seq = self.outbox.seq
            if self.on_events is not None:
                callbacks.append(functools.partial(self.on_events, self.committed_seq))
        for fn in callbacks:
            try:
                fn()
            except Exception:
                log.exception("cache writer: after-commit step failed")
        for job, result in ran:
            self.written += 1
            if job.future is not None and not job.future.done():
                job.future.set_result(result)

    def _step_large(self) -> None:
        job = self._current
        assert job is not None and job.large is not None
        saved = replace(self.outbox)
        self._callbacks = []
        finished, result = False, None
        try:
            if job.steps is None:
                job.steps = job.large(self)
            self._exec("BEGIN IMMEDIATE")
            try:
                next(job.steps)
            except StopIteration as stop:
                finished, result = True, stop.value
            self._exec("COMMIT")
        except Exception as exc:
            self._rollback()
            self.outbox = saved
            self._callbacks = []
            if job.steps is not None:
                job.steps.close()
            self._current = None
            self.failed += 1
            log.warning("cache writer: %s failed: %r", job.what, exc)
            _fail(job, exc)
            return
        self._checkpoint_due.set()
        self._after([])
        if finished:
            self._current = None
            self.written += 1
            if job.future is not None and not job.future.done():
                job.future.set_result(result)
        time.sleep(LARGE_STEP_PAUSE_S)
