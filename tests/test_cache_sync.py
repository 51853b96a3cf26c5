"""Applying what the cloud (or an installer) sends: streamed snapshots swapped in whole,
contiguous deltas (a gap is reported, never papered over), and imports that report bad lines."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from offline_cache import Cache
from offline_cache.schema import STAGING
from verify.model import Point, Policy, Reason
from verify.rules import decide

NOW = 1_777_600_000.0
PARK = Point("L1", "park")


def ticket(tid: str, **extra: Any) -> dict[str, Any]:
    rec = {
        "id": tid,
        "code": f"code-{tid}",
        "channel": "mini",
        "product_id": "day",
        "valid_from": NOW - 3600,
        "valid_to": NOW + 86400,
    }
    rec.update(extra)
    return rec


def chunks(n: int, size: int = 2500, prefix: str = "s") -> Iterator[list[dict[str, Any]]]:
    for start in range(0, n, size):
        yield [ticket(f"{prefix}{i}") for i in range(start, min(n, start + size))]


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    with Cache(tmp_path / "gate.db") as c:
        c.apply_delta(
            0, 1, [{"id": "day", "name": "Day", "zones": {"park": None}}], kind="products"
        )
        yield c


def code_of(cache: Cache, code: str) -> str | None:
    t = cache.situation(code, PARK, NOW).ticket
    return t.id if t else None


def test_snapshot_streams_in_chunks_and_swaps_in_whole(cache: Cache) -> None:
    cache.import_records([{"type": "ticket", **ticket("old")}])
    seen_in_staging: list[int] = []
    spy = sqlite3.connect(cache.path)

    def streamed() -> Iterator[list[dict[str, Any]]]:
        for chunk in chunks(10_000):
            # Each chunk is pulled only after the previous one was written to staging.
            seen_in_staging.append(spy.execute(f"SELECT count(*) FROM {STAGING}").fetchone()[0])
            assert code_of(cache, "code-old") == "old"  # still the old tickets meanwhile
            yield chunk

    result = cache.apply_snapshot(7, streamed())
    spy.close()
    assert (result.status, result.version, result.tickets, result.rejected) == (
        "applied",
        7,
        10_000,
        0,
    )
    assert seen_in_staging == [0, 2500, 5000, 7500]
    assert code_of(cache, "code-s9999") == "s9999"
    assert code_of(cache, "code-old") is None
    assert cache.versions()["tickets"] == 7
    assert cache.stats()["tickets"] == 10_000


def test_a_snapshot_keeps_usage(cache: Cache) -> None:
    cache.apply_snapshot(1, chunks(10))
    s = cache.situation("code-s3", PARK, NOW)
    d = decide(s, PARK, NOW, Policy())
    reservation = cache.reserve(d, PARK, NOW)
    assert reservation is not None
    cache.commit(reservation.id, NOW).result(timeout=5)
    # The next snapshot reissues s3 with a new code: its usage follows the ticket id.
    renewed = [[ticket(f"s{i}") for i in range(10) if i != 3] + [ticket("s3", code="new")]]
    assert cache.apply_snapshot(2, renewed).status == "applied"
    assert cache.situation("new", PARK, NOW).usage.entries == 1


def test_decisions_keep_running_while_a_snapshot_applies(cache: Cache) -> None:
    cache.apply_snapshot(1, chunks(10_000, prefix="a"))
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(cache.apply_snapshot(2, chunks(10_000))))
    worker.start()
    lookups, slowest, swapped = 0, 0.0, False
    while worker.is_alive():
        started = time.perf_counter()
        old, new = code_of(cache, "code-a77"), code_of(cache, "code-s77")
        slowest = max(slowest, time.perf_counter() - started)
        # Never a moment without tickets, and never back to the old set once swapped.
        assert (old, new) != (None, None)
        assert not (swapped and old)
        swapped = swapped or new is not None
        lookups += 1
    worker.join()
    assert result[0].status == "applied"
    assert lookups > 20
    # Never held up by the snapshot as a whole (a 10k-row apply takes ~0.5 s); typical
    # lookups stay well under a millisecond (tests/bench_cache.py measures them).
    assert slowest < 0.25


def test_snapshot_versions_are_idempotent_and_never_go_back(cache: Cache) -> None:
    assert cache.apply_snapshot(5, chunks(10)).status == "applied"
    assert cache.apply_snapshot(5, chunks(3)).status == "duplicate"
    stale = cache.apply_snapshot(4, chunks(3))
    assert (stale.status, stale.version) == ("stale", 5)
    assert cache.stats()["tickets"] == 10
    assert cache.apply_snapshot(4, chunks(3), force=True).status == "applied"
    assert cache.versions()["tickets"] == 4


def test_a_snapshot_with_too_many_bad_records_is_not_swapped_in(cache: Cache) -> None:
    cache.apply_snapshot(1, chunks(100))
    bad = [ticket(f"b{i}") for i in range(50)] + [{"id": "x", "code": "y"}] * 5
    result = cache.apply_snapshot(2, [bad])
    assert (result.status, result.version, result.rejected) == ("rejected", 1, 5)
    assert result.problems[0].line == 51 and "valid_from" in result.problems[0].reason
    assert code_of(cache, "code-s42") == "s42"


def test_duplicates_in_a_snapshot_keep_the_first_and_name_the_ticket_only(cache: Cache) -> None:
    rows = [ticket(f"d{i}") for i in range(300)]
    rows += [ticket("d7", code="other"), ticket("dx", code="code-d8")]
    result = cache.apply_snapshot(1, [rows])
    assert (result.status, result.tickets, result.rejected) == ("applied", 300, 2)
    reasons = " ".join(p.reason for p in result.problems)
    assert "duplicate id" in reasons and "duplicate code" in reasons and "dx" in reasons
    assert "code-d8" not in reasons  # a code is a credential: never in a report
    assert code_of(cache, "code-d8") == "d8" and code_of(cache, "other") is None


def test_a_snapshot_that_breaks_off_leaves_the_old_tickets(cache: Cache) -> None:
    cache.apply_snapshot(1, chunks(10))

    def broken() -> Iterator[Sequence[dict[str, Any]]]:
        yield [ticket("n1")]
        raise ConnectionError("link lost")

    with pytest.raises(ConnectionError):
        cache.apply_snapshot(2, broken())
    assert code_of(cache, "code-s1") == "s1" and code_of(cache, "code-n1") is None
    assert cache.apply_snapshot(2, chunks(5, prefix="n")).status == "applied"
    assert code_of(cache, "code-n1") == "n1"


def test_a_crash_mid_snapshot_is_cleaned_up_at_start(tmp_path: Path) -> None:
    path = tmp_path / "gate.db"
    with Cache(path):
        pass
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE {STAGING} (id TEXT)")
    conn.commit()
    conn.close()
    with Cache(path) as cache:
        cache.apply_snapshot(1, chunks(5))
        tables = sqlite3.connect(path).execute("SELECT name FROM sqlite_master").fetchall()
    assert (STAGING,) not in tables


def test_deltas_apply_in_order_and_report_duplicates_and_gaps(cache: Cache) -> None:
    cache.apply_snapshot(10, chunks(5))
    applied = cache.apply_delta(10, 11, [ticket("s9"), ticket("s1", status="revoked")], ["s0"])
    r = applied.result(timeout=5)
    assert (r.status, r.version, r.upserted, r.deleted) == ("applied", 11, 2, 1)
    assert code_of(cache, "code-s0") is None
    assert cache.situation("code-s1", PARK, NOW).ticket.status == "revoked"  # type: ignore[union-attr]
    assert cache.stats()["tickets"] == 5
    again = cache.apply_delta(10, 11, [ticket("s1")]).result(timeout=5)
    assert (again.status, again.version) == ("duplicate", 11)
    assert cache.situation("code-s1", PARK, NOW).ticket.status == "revoked"  # type: ignore[union-attr]
    gap = cache.apply_delta(12, 13, [ticket("s20")], ["s2"]).result(timeout=5)
    assert (gap.status, gap.version) == ("gap", 11)
    assert code_of(cache, "code-s20") is None and code_of(cache, "code-s2") == "s2"
    assert cache.apply_delta(11, 12, [ticket("s20")]).result(timeout=5).status == "applied"


def test_a_delta_reports_bad_rows_and_applies_the_rest(cache: Cache) -> None:
    cache.apply_snapshot(1, chunks(3))
    r = cache.apply_delta(
        1,
        2,
        [ticket("n1"), {"id": "bad"}, ticket("n2", code="code-s0"), ticket("s1", version=-1)],
    ).result(timeout=5)
    assert (r.status, r.upserted, r.rejected) == ("applied", 1, 3)
    assert [p.line for p in r.problems] == [2, 4, 3]
    assert "another ticket" in r.problems[2].reason
    assert code_of(cache, "code-s0") == "s0"


def test_an_older_ticket_version_never_overwrites_a_newer_one(cache: Cache) -> None:
    cache.apply_snapshot(1, [[ticket("v", version=5, status="revoked")]])
    cache.apply_delta(1, 2, [ticket("v", version=4)]).result(timeout=5)
    assert cache.situation("code-v", PARK, NOW).ticket.status == "revoked"  # type: ignore[union-attr]


def test_product_changes_reach_decisions(cache: Cache) -> None:
    cache.apply_snapshot(1, chunks(3))
    cable = Point("C1", "cable")
    assert decide(cache.situation("code-s1", cable, NOW), cable, NOW, Policy()).reason is (
        Reason.WRONG_ZONE
    )
    combo = {"id": "day", "zones": {"park": None, "cable": 2}, "version": 2}
    r = cache.apply_delta(1, 2, [combo], kind="products").result(timeout=5)
    assert r.status == "applied"
    assert decide(cache.situation("code-s1", cable, NOW), cable, NOW, Policy()).allowed
    replaced = cache.apply_delta(2, 3, [{"id": "other", "zones": ["x"]}], kind="products")
    assert replaced.result(timeout=5).status == "applied"
    assert cache.situation("code-s1", PARK, NOW).product is not None
    whole = cache.apply_delta(
        0, 4, [{"id": "other", "zones": ["x"]}], kind="products", replace_all=True
    )
    assert (whole.result(timeout=5).deleted, cache.stats()["products"]) == (2, 1)
    assert cache.situation("code-s1", PARK, NOW).product is None


def test_blocks_by_ticket_and_holder_respect_until(cache: Cache) -> None:
    holder = "ab" * 32
    cache.apply_snapshot(1, [[ticket("t1"), ticket("t2", holder_hash=holder)]])
    blocks = [
        {"kind": "ticket", "value": "t1", "reason": "fraud", "until": NOW + 60},
        {"kind": "holder", "value": holder, "reason": "banned"},
        {"kind": "face", "value": "f-9"},
    ]
    assert cache.apply_delta(0, 1, blocks, kind="blocks").result(timeout=5).upserted == 3
    s1 = cache.situation("code-t1", PARK, NOW)
    assert [b.reason for b in s1.blocks] == ["fraud"]
    assert decide(s1, PARK, NOW, Policy()).reason is Reason.BLOCKED
    assert cache.situation("code-t1", PARK, NOW + 61).blocks == ()
    assert decide(cache.situation("code-t2", PARK, NOW), PARK, NOW, Policy()).reason is (
        Reason.BLOCKED
    )
    assert [b.kind for b in cache.situation("code-t1", PARK, NOW + 61, face_id="f-9").blocks] == [
        "face"
    ]
    gone = cache.apply_delta(1, 2, [], [{"kind": "holder", "value": holder}], kind="blocks")
    assert gone.result(timeout=5).deleted == 1
    assert cache.situation("code-t2", PARK, NOW).blocks == ()
    assert cache.stats()["blocks"] == 2


def test_delta_arguments_are_checked(cache: Cache) -> None:
    with pytest.raises(ValueError):
        cache.apply_delta(3, 3, [])
    with pytest.raises(ValueError):
        cache.apply_delta(0, 1, [], replace_all=True)
    with pytest.raises(ValueError):
        cache.apply_delta(0, 1, [], kind="faces")  # type: ignore[arg-type]


def test_import_reports_bad_lines_and_imports_the_rest(cache: Cache) -> None:
    lines = [
        '{"type": "product", "id": "combo", "zones": {"park": 1, "cable": 1}}',
        "",
        "# installer's note",
        '{"type": "ticket", "id": "i1", "code": "I-1", "product_id": "combo",'
        ' "valid_from": "2026-05-01T08:00", "valid_to": "2026-05-01T18:00+08:00"}',
        "{not json",
        "[1, 2]",
        '{"type": "coupon", "id": "x"}',
        '{"type": "ticket", "id": "i2", "code": "I-2", "product_id": "combo", "valid_from": 0}',
        '{"type": "ticket", "id": "i3", "code": "I-3", "product_id": "combo",'
        ' "valid_from": 10, "valid_to": 5}',
        '{"type": "ticket", "id": "i4", "code": "I-1", "product_id": "combo",'
        ' "valid_from": 0, "valid_to": 1}',
        b'{"type": "zone", "zone": "park", "capacity": 500}',
        b"\xff\xfe",
        '{"type": "block", "kind": "ticket", "value": "i1", "until": "tomorrow"}',
        '{"type": "ticket", "id": "i5", "code": "I-5", "product_id": "combo",'
        ' "valid_from": true, "valid_to": 1e999}',
    ]
    result = cache.import_records(lines)
    assert (result.tickets, result.products, result.zones, result.blocks) == (1, 1, 1, 0)
    assert result.rejected == 9
    by_line = {p.line: p.reason for p in result.problems}
    assert sorted(by_line) == [5, 6, 7, 8, 9, 10, 12, 13, 14]
    assert "JSON" in by_line[5] and "object" in by_line[6] and "type" in by_line[7]
    assert "valid_to" in by_line[8] and "earlier" in by_line[9] and "another" in by_line[10]
    assert "UTF-8" in by_line[12] and "until" in by_line[13] and "valid_from" in by_line[14]
    t = cache.situation("I-1", PARK, NOW).ticket
    assert t is not None and (t.valid_from, t.valid_to) == (1777593600.0, 1777629600.0)
    assert cache.situation("I-1", PARK, NOW).capacity == 500


def test_import_of_the_same_file_twice_is_idempotent(cache: Cache) -> None:
    lines = [{"type": "ticket", **ticket(f"x{i}")} for i in range(50)]
    assert cache.import_records(lines).tickets == 50
    assert cache.import_records(lines).tickets == 50
    assert cache.stats()["tickets"] == 50


def test_cloud_time_is_kept_and_checked_by_the_rules(tmp_path: Path) -> None:
    path = tmp_path / "gate.db"
    with Cache(path) as cache:
        cache.apply_delta(0, 1, [{"id": "day", "zones": ["park"]}], kind="products")
        cache.import_records([{"type": "ticket", **ticket("t")}])
        cache.set_cloud_time(NOW + 3600).result(timeout=5)
        with pytest.raises(ValueError):
            cache.set_cloud_time(float("nan"))
    with Cache(path) as cache:
        s = cache.situation("code-t", PARK, NOW)
        assert s.cloud_time == NOW + 3600
        assert decide(s, PARK, NOW, Policy()).reason is Reason.CLOCK_ERROR


def test_stats_show_counts_versions_and_the_outbox(cache: Cache) -> None:
    cache.apply_snapshot(3, chunks(20))
    cache.append("audit", None)
    cache.mark_sent(0).result(timeout=5)
    stats = cache.stats()
    assert (stats["tickets"], stats["products"], stats["blocks"]) == (20, 1, 0)
    assert stats["versions"] == {"tickets": 3, "products": 1, "blocks": 0}
    assert stats["outbox"]["depth"] == 1 and stats["outbox"]["oldest_age_s"] is not None
    assert stats["db_bytes"] > 0 and stats["reservations"] == 0 and stats["writer_alive"]
