"""Two-phase passage: decide, reserve (the entry is held), then commit when the gate saw the
visitor through (usage and the passage event in one transaction) or abort when nobody came.
Decisions are made by the real rules engine on what the cache gathered."""

from __future__ import annotations

import itertools
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from offline_cache import Cache, UnknownReservation, read_events, verify_chain
from verify.model import Decision, Point, Policy, Reason
from verify.rules import decide

CST = timezone(timedelta(hours=8))
NOW = datetime(2026, 5, 1, 10, 0, tzinfo=CST).timestamp()
POLICY = Policy()
L1, L2 = Point("L1", "park"), Point("L2", "park")
L1_OUT = Point("L1", "park", "exit")


def ticket(tid: str, **extra: Any) -> dict[str, Any]:
    rec = {
        "type": "ticket",
        "id": tid,
        "code": f"code-{tid}",
        "channel": "ota",
        "product_id": "day",
        "valid_from": NOW - 86400,
        "valid_to": NOW + 30 * 86400,
    }
    rec.update(extra)
    return rec


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    with Cache(tmp_path / "gate.db", policy=POLICY) as c:
        result = c.import_records(
            [
                {"type": "product", "id": "day", "name": "Day", "zones": {"park": None}},
                {"type": "product", "id": "combo", "zones": {"park": 1, "cable": 1}},
                {"type": "zone", "zone": "park", "capacity": 1000},
                ticket("single", max_entries_total=1),
                ticket("daily", max_entries_per_day=1),
                ticket("combo", product_id="combo"),
                ticket("multi"),
            ]
        )
        assert result.rejected == 0
        yield c


def present(cache: Cache, code: str, point: Point, now: float = NOW) -> Decision:
    return decide(cache.situation(code, point, now), point, now, POLICY)


def admit(cache: Cache, code: str, point: Point, now: float = NOW) -> Decision:
    """Decide, reserve and commit one passage (what the daemon does for a visitor)."""
    decision = present(cache, code, point, now)
    if decision.allowed:
        reservation = cache.reserve(decision, point, now)
        assert reservation is not None
        cache.commit(reservation.id, now + 2).result(timeout=5)
    return decision


def passages(cache: Cache) -> list[dict[str, Any]]:
    return [e.data for e in read_events(cache.path, kind="passage")]


def test_commit_updates_usage_and_appends_one_passage(cache: Cache) -> None:
    decision = present(cache, "code-single", L1)
    assert decision.allowed and decision.remaining == 0
    reservation = cache.reserve(decision, L1, NOW)
    assert reservation is not None and cache.holds(reservation.id)
    event = cache.commit(reservation.id, NOW + 3).result(timeout=5)
    assert event.kind == "passage" and event.lane == "L1"
    assert event.data == {
        "ticket_id": "single",
        "zone": "park",
        "direction": "entry",
        "reservation": reservation.id,
        "entries": 1,
    }
    s = cache.situation("code-single", L1, NOW + 5)
    assert (s.usage.entries, s.usage.entries_today, s.usage.inside) == (1, 1, True)
    assert (s.usage.last_entry_at, s.usage.last_lane, s.held, s.occupancy) == (NOW + 3, "L1", 0, 1)
    assert passages(cache) == [event.data]
    assert cache.reservations == ()
    assert present(cache, "code-single", L2, NOW + 5).reason is Reason.TOTAL_LIMIT


def test_a_second_lane_at_the_same_moment_is_refused(cache: Cache) -> None:
    first = present(cache, "code-multi", L1)
    second = present(cache, "code-multi", L2)  # decided before L1 reserved: allowed too
    assert first.allowed and second.allowed
    held = cache.reserve(first, L1, NOW)
    assert held is not None
    assert cache.reserve(second, L2, NOW) is None
    # A fresh decision at L2 sees the hold.
    assert present(cache, "code-multi", L2).reason is Reason.IN_USE
    cache.commit(held.id, NOW + 2).result(timeout=5)
    assert len(passages(cache)) == 1


def test_limits_count_other_lanes_holds_across_zones(cache: Cache) -> None:
    cable = Point("C1", "cable")
    park_decision = present(cache, "code-combo", L1)
    cable_decision = present(cache, "code-combo", cable)
    assert park_decision.allowed and cable_decision.allowed
    assert cache.reserve(park_decision, L1, NOW) is not None
    assert cache.reserve(cable_decision, cable, NOW) is not None  # its own zone, own limit
    single_park = present(cache, "code-single", L1)
    assert cache.reserve(single_park, L1, NOW) is not None
    # Total limit 1: another lane into another zone must not get a second entry.
    assert cache.reserve(Decision(True, Reason.OK, "single", "cable"), cable, NOW) is None


def test_abort_gives_the_entry_back(cache: Cache) -> None:
    decision = present(cache, "code-single", L1)
    reservation = cache.reserve(decision, L1, NOW)
    assert reservation is not None
    assert cache.abort(reservation.id, "timeout")
    assert not cache.abort(reservation.id, "timeout")
    assert not cache.holds(reservation.id)
    cache.mark_sent(0).result(timeout=5)
    [given_back] = list(read_events(cache.path, kind="not_passed"))
    assert given_back.data["reason"] == "timeout" and given_back.data["ticket_id"] == "single"
    assert cache.situation("code-single", L1, NOW).usage.entries == 0
    assert admit(cache, "code-single", L2).allowed


def test_a_failed_event_insert_rolls_the_usage_back(cache: Cache) -> None:
    """No state where usage changed without its passage event (or the other way round)."""
    conn = sqlite3.connect(cache.path)
    conn.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON outbox WHEN NEW.kind = 'passage' "
        "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
    )
    conn.commit()
    decision = present(cache, "code-single", L1)
    reservation = cache.reserve(decision, L1, NOW)
    assert reservation is not None
    cache.append("audit", None, n=1)  # in the same group commit as the passage
    with pytest.raises(sqlite3.IntegrityError, match="disk says no"):
        cache.commit(reservation.id, NOW + 2).result(timeout=5)
    s = cache.situation("code-single", L1, NOW + 3)
    assert (s.usage.entries, s.usage.inside, s.occupancy) == (0, False, 1)  # 1: still held
    assert s.held == 1 and cache.holds(reservation.id)
    cache.mark_sent(0).result(timeout=5)  # the audit event's batch is durable too
    assert passages(cache) == []
    assert [e.kind for e in read_events(cache.path)] == ["audit"]
    assert verify_chain(cache.path).ok
    # Once the disk works again the same reservation commits.
    conn.execute("DROP TRIGGER boom")
    conn.commit()
    conn.close()
    cache.commit(reservation.id, NOW + 4).result(timeout=5)
    assert cache.situation("code-single", L1, NOW + 5).usage.entries == 1
    assert verify_chain(cache.path).ok


def test_a_whole_second_passage_time_chains_like_any_other(cache: Cache) -> None:
    reservation = cache.reserve(present(cache, "code-multi", L1), L1, NOW)
    assert reservation is not None
    event = cache.commit(reservation.id, int(NOW)).result(timeout=5)  # type: ignore[arg-type]
    assert event.ts == float(int(NOW))
    assert verify_chain(cache.path).ok


def test_unknown_or_repeated_commits_are_refused(cache: Cache) -> None:
    with pytest.raises(UnknownReservation):
        cache.commit("no-such-reservation", NOW).result(timeout=5)
    reservation = cache.reserve(present(cache, "code-multi", L1), L1, NOW)
    assert reservation is not None
    first = cache.commit(reservation.id, NOW)
    with pytest.raises(UnknownReservation):
        cache.commit(reservation.id, NOW).result(timeout=5)
    first.result(timeout=5)
    assert not cache.abort(reservation.id)
    assert len(passages(cache)) == 1


def test_daily_entries_roll_over_at_local_midnight(cache: Cache) -> None:
    late = datetime(2026, 5, 1, 23, 58, tzinfo=CST).timestamp()
    assert admit(cache, "code-daily", L1, late).allowed
    assert admit(cache, "code-daily", L1_OUT, late + 10).allowed
    assert present(cache, "code-daily", L1, late + 60).reason is Reason.DAILY_LIMIT
    after_midnight = late + 180  # 00:01 local, 16:01 UTC: same UTC day
    s = cache.situation("code-daily", L1, after_midnight)
    assert (s.ticket_entries_today, s.usage.entries_today, s.ticket_entries) == (0, 0, 1)
    assert admit(cache, "code-daily", L1, after_midnight).allowed
    s = cache.situation("code-daily", L1, after_midnight + 5)
    assert (s.usage.entries, s.usage.entries_today, s.usage.day) == (2, 1, "2026-05-02")


def test_occupancy_follows_entries_and_exits_and_caps_the_zone(cache: Cache) -> None:
    cache.set_zone_capacity("park", 2).result(timeout=5)
    for tid in ("a", "b", "c"):
        cache.import_records([ticket(tid)])
    assert admit(cache, "code-a", L1).allowed
    b = present(cache, "code-b", L2)
    held_b = cache.reserve(b, L2, NOW)
    assert held_b is not None
    # One committed and one held: the zone is full for a third visitor.
    assert present(cache, "code-c", L1).reason is Reason.ZONE_FULL
    assert cache.reserve(Decision(True, Reason.OK, "c", "park"), L1, NOW) is None
    cache.commit(held_b.id, NOW + 1).result(timeout=5)
    assert admit(cache, "code-a", L1_OUT, NOW + 60).reason is Reason.OK_EXIT
    s = cache.situation("code-a", L1, NOW + 61)
    assert (s.occupancy, s.usage.inside, s.usage.last_exit_at) == (1, False, NOW + 62)
    assert admit(cache, "code-c", L1, NOW + 70).allowed
    # Exits never push the count below zero (people also leave through emergency exits).
    cache.set_occupancy("park", 0).result(timeout=5)
    assert admit(cache, "code-c", L1_OUT, NOW + 80).allowed
    assert cache.situation("code-c", L1, NOW + 90).occupancy == 0


def test_reentry_after_exit_and_anti_passback(cache: Cache) -> None:
    assert admit(cache, "code-multi", L1).allowed
    assert present(cache, "code-multi", L2, NOW + 30).reason in (
        Reason.NO_REENTRY,
        Reason.ALREADY_INSIDE,
    )
    assert admit(cache, "code-multi", L1_OUT, NOW + 60).allowed
    assert admit(cache, "code-multi", L2, NOW + 120).allowed
    assert cache.situation("code-multi", L1, NOW + 130).usage.entries == 2


def test_reservations_do_not_survive_a_restart(tmp_path: Path) -> None:
    """A crash between reserve and commit: on start-up nothing is held, nothing was used."""
    path = tmp_path / "gate.db"
    with Cache(path) as cache:
        cache.import_records(
            [
                {"type": "product", "id": "day", "zones": ["park"]},
                ticket("single", max_entries_total=1),
            ]
        )
        assert cache.reserve(present(cache, "code-single", L1), L1, NOW) is not None
        assert present(cache, "code-single", L2).reason is Reason.IN_USE
    with Cache(path) as cache:
        assert cache.reservations == ()
        assert admit(cache, "code-single", L2).allowed


def test_a_reservation_nobody_settles_expires(cache: Cache) -> None:
    reservation = cache.reserve(present(cache, "code-single", L1), L1, NOW)
    assert reservation is not None
    assert cache.release_stale(NOW + 60) == 0
    assert cache.release_stale(NOW + cache.reservation_ttl_s + 1) == 1
    assert not cache.holds(reservation.id)
    assert admit(cache, "code-single", L2, NOW + 200).allowed


def test_two_lanes_race_for_single_entry_tickets(cache: Cache) -> None:
    """Both lanes on one event loop, steps interleaved in every order: one passage each."""
    rng = random.Random(7)
    rounds = 150
    cache.import_records([ticket(f"r{i}", max_entries_total=1) for i in range(rounds)])
    # Every interleaving of (decide, reserve) on L1 with (decide, reserve) on L2.
    orders = sorted(set(itertools.permutations("1122")))
    for i in range(rounds):
        code = f"code-r{i}"
        decisions: dict[str, Decision] = {}
        holds: dict[str, str] = {}
        for lane in rng.choice(orders):
            p = L1 if lane == "1" else L2
            if p.lane not in decisions:
                decisions[p.lane] = present(cache, code, p)
            elif decisions[p.lane].allowed:
                r = cache.reserve(decisions[p.lane], p, NOW)
                if r is not None:
                    holds[p.lane] = r.id
        assert len(holds) == 1
        for rid in holds.values():
            cache.commit(rid, NOW + 1)
        cache.mark_sent(0).result(timeout=5)
        assert not present(cache, code, L1, NOW + 2).allowed
    per_ticket = Counter(d["ticket_id"] for d in passages(cache))
    assert len(per_ticket) == rounds and set(per_ticket.values()) == {1}


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from offline_cache import Cache
    from verify.model import Decision, Point, Reason
    path, start = Path(sys.argv[1]), int(sys.argv[2])
    cache = Cache(path)
    cache.start()
    i = start
    while True:
        tid = f"k{i % 40}"
        p = Point("L1", "park", "entry" if i % 3 else "exit")
        r = cache.reserve(Decision(True, Reason.OK, tid, "park"), p, time.time())
        if r is not None:
            f = cache.commit(r.id, time.time())
            if i % 2:
                f.result()
        cache.append("audit", "L1", n=i)
        if i == start:
            print("running", flush=True)
        i += 1
    """
)


def test_killed_mid_passage_usage_and_outbox_agree(tmp_path: Path) -> None:
    path = tmp_path / "gate.db"
    with Cache(path) as cache:
        cache.import_records(
            [{"type": "product", "id": "day", "zones": ["park"]}]
            + [ticket(f"k{i}") for i in range(40)]
        )
    rng = random.Random(3)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for kill in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(kill * 100_000)],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"running"
        time.sleep(rng.uniform(0.05, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        report = verify_chain(path)
        assert report.ok, report
        with Cache(path) as cache:
            assert cache.reservations == ()
            entries = Counter(
                e.data["ticket_id"]
                for e in read_events(path, kind="passage")
                if e.data["direction"] == "entry"
            )
            for i in range(40):
                s = cache.situation(f"code-k{i}", L1, time.time())
                assert s.usage.entries == entries[f"k{i}"]
    seqs = [e.seq for e in read_events(path)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(list(read_events(path, kind="passage"))) > 5
