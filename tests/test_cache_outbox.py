"""The outbox: gap-free sequence numbers, a hash chain that exposes any removal or edit,
acknowledged rows removed without breaking it, and a quota that warns and never drops."""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from offline_cache import Cache, read_events, verify_chain
from offline_cache.outbox import GENESIS


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    with Cache(tmp_path / "gate.db") as c:
        yield c


def fill(cache: Cache, n: int) -> None:
    for i in range(n):
        cache.append("audit", f"L{i % 2}", n=i, text="入口 ✓", nested={"b": [1, 2.5], "a": None})
    cache.mark_sent(0).result()  # a small job behind them: everything before it is durable


def tamper(path: Path, sql: str, *args: object) -> None:
    """What someone with a shell on the gate could do: bypass the append-only trigger."""
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER outbox_append_only")
    conn.execute(sql, args)
    conn.commit()
    conn.close()


def test_many_events_chain_and_verify(cache: Cache) -> None:
    fill(cache, 300)
    events = list(read_events(cache.path))
    assert [e.seq for e in events] == list(range(1, 301))
    assert events[0].prev_hash == GENESIS
    assert all(a.hash == b.prev_hash for a, b in itertools.pairwise(events))
    assert events[7].data == {"n": 7, "text": "入口 ✓", "nested": {"b": [1, 2.5], "a": None}}
    assert verify_chain(cache.path) == cache.verify_chain()
    assert cache.verify_chain().ok and cache.verify_chain().count == 300


def test_the_hash_is_reproducible_from_the_documented_canonical_form(cache: Cache) -> None:
    fill(cache, 2)
    first, second = read_events(cache.path)
    canonical = json.dumps(
        {
            "id": second.id,
            "seq": second.seq,
            "ts": second.ts,
            "kind": second.kind,
            "lane": second.lane,
            "data": second.data,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    expected = hashlib.sha256(bytes.fromhex(first.hash) + canonical.encode()).hexdigest()
    assert second.hash == expected


def test_an_altered_row_is_found(cache: Cache) -> None:
    fill(cache, 50)
    tamper(cache.path, "UPDATE outbox SET data = ? WHERE seq = 17", '{"n":999}')
    report = verify_chain(cache.path)
    assert (report.ok, report.first_bad_seq, report.count) == (False, 17, 16)
    assert "altered" in report.reason


def test_a_deleted_middle_row_is_found(cache: Cache) -> None:
    fill(cache, 50)
    tamper(cache.path, "DELETE FROM outbox WHERE seq = 23")
    report = verify_chain(cache.path)
    assert (report.ok, report.first_bad_seq) == (False, 23)
    assert "missing" in report.reason


def test_deleted_last_rows_are_found(cache: Cache) -> None:
    fill(cache, 50)
    tamper(cache.path, "DELETE FROM outbox WHERE seq > 45")
    report = verify_chain(cache.path)
    assert (report.ok, report.first_bad_seq) == (False, 46)


def test_reordered_rows_are_found(cache: Cache) -> None:
    fill(cache, 50)
    # Swap the contents of rows 30 and 31 but keep their seqs (and even their hashes).
    tamper(cache.path, "UPDATE outbox SET seq = -30 WHERE seq = 30")
    conn = sqlite3.connect(cache.path)
    conn.execute("UPDATE outbox SET seq = 30 WHERE seq = 31")
    conn.execute("UPDATE outbox SET seq = 31 WHERE seq = -30")
    conn.commit()
    conn.close()
    report = verify_chain(cache.path)
    assert (report.ok, report.first_bad_seq) == (False, 30)


def test_an_edit_is_refused_by_the_database(cache: Cache) -> None:
    fill(cache, 3)
    conn = sqlite3.connect(cache.path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE outbox SET kind = 'x' WHERE seq = 2")
    conn.close()


def test_mark_sent_removes_rows_and_keeps_the_chain_verifiable(cache: Cache) -> None:
    fill(cache, 40)
    assert cache.mark_sent(25).result() == 25
    assert cache.mark_sent(25).result() == 0  # a repeated acknowledgement is a no-op
    fill(cache, 10)
    report = verify_chain(cache.path)
    assert report.ok and report.count == 25
    assert [e.seq for e in read_events(cache.path)][:2] == [26, 27]
    tamper(cache.path, "DELETE FROM outbox WHERE seq = 26")
    assert verify_chain(cache.path).first_bad_seq == 26


def test_seq_numbers_are_never_reused_after_everything_was_sent(tmp_path: Path) -> None:
    path = tmp_path / "gate.db"
    with Cache(path) as cache:
        fill(cache, 5)
        assert cache.mark_sent(5).result() == 5
        assert cache.stats()["outbox"]["depth"] == 0
    with Cache(path) as cache:
        fill(cache, 2)
    assert [e.seq for e in read_events(path)] == [6, 7]
    assert verify_chain(path).ok


def test_mark_sent_beyond_the_last_event_is_an_error(cache: Cache) -> None:
    fill(cache, 3)
    with pytest.raises(ValueError, match="never issued"):
        cache.mark_sent(4).result()


def test_quota_alarms_once_and_never_drops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Cache(tmp_path / "gate.db", max_events=20) as cache:
        fill(cache, 30)
        kinds = [e.kind for e in read_events(cache.path)]
        assert kinds.count("audit") == 30  # nothing dropped past the limit
        assert kinds.count("outbox_near_full") == 1 and kinds.count("outbox_full") == 1
        assert kinds.index("outbox_near_full") == 16  # raised at 80 %: the 16th row
        stats = cache.stats()["outbox"]
        assert stats["alarm"] == "full" and stats["depth"] == 32
        assert "outbox_full" in caplog.text
        # Acknowledged down to 70 % or less re-arms; passing 80 % again alarms again.
        cache.mark_sent(20).result()
        assert cache.stats()["outbox"]["alarm"] == "none"
        fill(cache, 5)
        kinds = [e.kind for e in read_events(cache.path)]
        assert kinds.count("outbox_near_full") == 1  # 12 + 5 = 17 >= 16: raised again
        assert verify_chain(cache.path).ok


def test_alarm_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "gate.db"
    with Cache(path, max_events=10) as cache:
        fill(cache, 9)
    with Cache(path, max_events=10) as cache:
        fill(cache, 1)
    kinds = [e.kind for e in read_events(path)]
    assert kinds.count("outbox_near_full") == 1


def test_append_never_waits_for_the_disk(cache: Cache) -> None:
    # Hold the database's write lock from outside: appends must still return at once.
    blocker = sqlite3.connect(cache.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    started = time.perf_counter()
    for i in range(200):
        cache.append("audit", None, n=i)
    assert time.perf_counter() - started < 0.1
    blocker.execute("ROLLBACK")
    blocker.close()
    cache.mark_sent(0).result(timeout=20)
    assert len(list(read_events(cache.path))) == 200


def test_a_failing_disk_holds_events_and_writes_them_later(cache: Cache) -> None:
    """SQLITE_BUSY for longer than the busy timeout: retried with back-off, nothing lost."""
    fill(cache, 1)
    # The writer waits 5 s for a lock before giving up; 0.1 s keeps this test short.
    cache._writer.db.execute("PRAGMA busy_timeout = 100")
    blocker = sqlite3.connect(cache.path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    for i in range(20):
        cache.append("audit", None, n=i)
    timer = threading.Timer(1.0, lambda: (blocker.execute("ROLLBACK"), blocker.close()))
    timer.start()
    try:
        cache.mark_sent(0).result(timeout=30)
    finally:
        timer.join()
    assert len(list(read_events(cache.path))) == 21
    assert cache.stats()["write_errors"] >= 1
    assert verify_chain(cache.path).ok


def test_appends_after_close_are_counted_not_silent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = Cache(tmp_path / "gate.db")
    cache.start()
    cache.close()
    cache.append("late", None)
    assert cache.stats()["failed"] == 1
    assert "not written" in caplog.text


def test_events_queued_before_start_are_written_at_close(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "gate.db")
    cache.append("early", None)
    cache.close()
    assert [e.kind for e in read_events(tmp_path / "gate.db")] == ["early"]


def test_odd_event_data_is_stored_as_text_not_refused(cache: Cache) -> None:
    cache.append("audit", None, nan=float("nan"), path=Path("/x"), key={(1, 2): "t"})
    fill(cache, 0)
    [event] = read_events(cache.path)
    assert event.data == {"nan": "nan", "path": "/x", "key": {"(1, 2)": "t"}}
    assert verify_chain(cache.path).ok


def test_odd_lane_and_time_types_still_verify(cache: Cache) -> None:
    cache.append("audit", 7)  # type: ignore[arg-type]
    fill(cache, 0)
    [event] = read_events(cache.path)
    assert event.lane == "7"
    assert verify_chain(cache.path).ok
