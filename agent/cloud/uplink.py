"""Uplink: the outbox to the broker, in order, batched, deleted only after PUBACK.

Runs on a thread of its own: reading rows and building messages at 50,000 events/s would
otherwise take the event loop away from the lanes. Rules that keep every event:
- a batch is one MQTT message of consecutive seqs; at most ``inflight`` batches await PUBACK;
- only the contiguous prefix of acknowledged batches is deleted from the outbox;
- a lost connection forgets everything in flight and starts again after the last deleted row
  (redelivered events keep their ids: the cloud de-duplicates by id);
- a PUBACK with a failure code is not an acknowledgement.

Locking: paho calls ``acked`` holding its own message lock, and ``publish`` takes that lock,
so the uplink never calls paho holding its lock, and ``acked`` takes no lock at all: it
queues the PUBACK for the uplink thread, which handles it only after it has recorded the
batch it published (so an early PUBACK is never mistaken for another message's).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

Row = tuple[int, str, float, str, "str | None", str, str, str]

IDLE_WAIT_S = 0.5
REJECTED_RETRY_S = 2.0


@dataclass
class _Batch:
    first: int
    last: int
    count: int
    acked: bool = False


class Uplink:
    """Sends outbox rows as ``events`` messages; the link calls connected/disconnected/acked."""

    def __init__(
        self,
        db_path: Path,
        topic: str,
        header: Mapping[str, object],
        publish: Callable[[str, bytes], int],
        mark_sent: Callable[[int], Future[int]],
        outbox_range: Callable[[], tuple[int, int]],
        *,
        batch_events: int = 200,
        batch_bytes: int = 256 * 1024,
        inflight: int = 20,
    ) -> None:
        self.db_path = db_path
        self.topic = topic
        # The message starts with the same header every time: build it once.
        head = json.dumps({"v": 1, **header}, separators=(",", ":"))
        self._head = head[:-1] + ',"events":['
        self.publish = publish
        self.mark_sent = mark_sent
        self.outbox_range = outbox_range
        self.batch_events = batch_events
        self.batch_bytes = batch_bytes
        self.inflight = inflight
        self.sent_events = 0
        self.sent_messages = 0
        self.acked_events = 0
        self.redelivered = 0
        self.rejected_acks = 0
        self.last_ack_at: float | None = None
        self._lock = threading.Lock()
        self._signal = threading.Event()
        self._acks: deque[tuple[int, int, bool]] = deque()
        self._conn_id = 0
        self._online = False
        self._rewound = False
        self._batches: OrderedDict[int, _Batch] = OrderedDict()
        self._acked_upto = 0
        self._cursor = 0
        self._highest_sent = 0
        self._pause_until = 0.0
        self._marking: Future[int] | None = None
        self._marked = 0
        self._marking_upto = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None

    # --- called from other threads --------------------------------------------------------

    def start(self) -> None:
        anchor, _ = self.outbox_range()
        self._acked_upto = self._cursor = self._marked = self._highest_sent = anchor
        self._thread = threading.Thread(target=self._run, name="uplink", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._signal.set()
        if self._thread is not None:
            self._thread.join(5)

    def connected(self, conn: int) -> None:
        with self._lock:
            self._conn_id = conn
            self._online = True
            self._rewound = True
        self._signal.set()

    def disconnected(self, conn: int) -> None:
        with self._lock:
            if conn == self._conn_id:
                self._online = False
                self._rewound = True
        self._signal.set()

    def acked(self, conn: int, mid: int, ok: bool) -> None:
        self._acks.append((conn, mid, ok))
        self._signal.set()

    def wake(self, _seq: int = 0) -> None:
        """New events are on disk (the cache's writer calls this)."""
        self._signal.set()

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "inflight_messages": len(self._batches),
                "acked_upto": self._acked_upto,
                "sent_events": self.sent_events,
                "sent_messages": self.sent_messages,
                "acked_events": self.acked_events,
                "redelivered_events": self.redelivered,
                "rejected_acks": self.rejected_acks,
                "last_ack_at": self.last_ack_at,
            }

    # --- the uplink thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                # Clear before looking: a signal that arrives while we work is not lost.
                self._signal.clear()
                with self._lock:
                    if self._rewound:
                        # Whatever was in flight may or may not have arrived: send it again
                        # from the first unacknowledged row.
                        self._rewound = False
                        self._batches.clear()
                        self._acks.clear()
                        self._cursor = self._acked_upto
                    self._take_acks()
                    self._settle_marks()
                    _, committed = self.outbox_range()
                    conn, start = self._conn_id, self._cursor
                    ready = (
                        self._online
                        and len(self._batches) < self.inflight
                        and committed > start
                        and time.monotonic() >= self._pause_until
                    )
                if not ready:
                    self._signal.wait(IDLE_WAIT_S)
                    continue
                rows = self._read(start, committed)
                if not rows:
                    continue
                payload, last, count = self._message(rows)
                mid = self.publish(self.topic, payload)
                if mid < 0:
                    self._signal.wait(0.05)
                    continue
                with self._lock:
                    if conn == self._conn_id and not self._rewound:
                        self._record(mid, _Batch(rows[0][0], last, count))
        except Exception:
            log.exception("uplink: stopped")
        finally:
            if self._db is not None:
                self._db.close()

    def _record(self, mid: int, batch: _Batch) -> None:
        """A batch is on the wire (caller holds the lock)."""
        self._batches[mid] = batch
        self._cursor = batch.last
        self.sent_messages += 1
        self.sent_events += batch.count
        if batch.first <= self._highest_sent:
            self.redelivered += min(batch.last, self._highest_sent) - batch.first + 1
        self._highest_sent = max(self._highest_sent, batch.last)

    def _take_acks(self) -> None:
        """Apply queued PUBACKs (caller holds the lock); unknown mids are other messages."""
        while self._acks:
            conn, mid, ok = self._acks.popleft()
            if conn != self._conn_id or mid not in self._batches:
                continue
            if not ok:
                # The broker refused the message (quota, ACL): not sent. Start again from
                # the last acknowledged row after a pause, rather than spin against it.
                self.rejected_acks += 1
                log.error("uplink: the broker refused an events message; retrying")
                self._rewound = True
                self._pause_until = time.monotonic() + REJECTED_RETRY_S
                self._signal.set()
                return
            self._batches[mid].acked = True
            while self._batches:
                first_mid, batch = next(iter(self._batches.items()))
                if not batch.acked:
                    break
                del self._batches[first_mid]
                self._acked_upto = batch.last
                self.acked_events += batch.count
            self.last_ack_at = time.time()

    def _settle_marks(self) -> None:
        """Delete acknowledged rows, one writer job at a time (caller holds the lock)."""
        if self._marking is not None:
            if not self._marking.done():
                return
            exc = self._marking.exception()
            if exc is not None:
                log.error("uplink: could not delete acknowledged events: %s", exc)
            else:
                self._marked = self._marking_upto
            self._marking = None
        if self._acked_upto > self._marked:
            self._marking_upto = self._acked_upto
            self._marking = self.mark_sent(self._acked_upto)
            self._marking.add_done_callback(lambda _f: self.wake())

    def _read(self, after: int, upto: int) -> list[Row]:
        if self._db is None:
            self._db = sqlite3.connect(str(self.db_path), timeout=5.0)
        rows = self._db.execute(
            "SELECT seq, id, ts, kind, lane, data, prev_hash, hash FROM outbox "
            "WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            [after, upto, self.batch_events],
        ).fetchall()
        return rows

    def _message(self, rows: list[Row]) -> tuple[bytes, int, int]:
        """One events message from consecutive rows, cut at batch_bytes."""
        parts: list[str] = []
        size = len(self._head) + 2
        last = rows[0][0]
        dumps = json.dumps
        for seq, eid, ts, kind, lane, data, prev, digest in rows:
            # The stored data is already canonical JSON: embed it as it is, unparsed.
            part = (
                f'{{"seq":{seq},"id":{dumps(eid)},"ts":{dumps(ts)},"kind":{dumps(kind)},'
                f'"lane":{dumps(lane)},"data":{data},"prev_hash":"{prev}","hash":"{digest}"}}'
            )
            # Bytes, not characters: ticket ids and reasons may be Chinese.
            length = len(part.encode()) + 1
            if parts and size + length > self.batch_bytes:
                break
            parts.append(part)
            size += length
            last = seq
        body = self._head + ",".join(parts) + "]}"
        return body.encode(), last, len(parts)
