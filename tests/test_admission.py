"""Admission end to end: tickets imported with gatectl, presented at lanes of the real daemon,
decided by the rules against the offline cache, committed on the passage the gate reports.
Plus the two-lane race, 1000 times, and arbitrary codes that must never open a lane.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.admission import Admission
from agent.gate.core import Direction
from agent.testbed import Testbed, wait_for
from offline_cache import Cache, read_events, verify_chain
from verify.model import Policy, Reason
from verify.token import KeyRing, TokenClaims, TrustedKey, kid_for, mint_token, public_key_for

NOW = time.time()
DAY = 86400.0

PRODUCTS = [
    {"type": "product", "id": "day", "name": "Day pass", "zones": {"park": 1}},
    {
        "type": "product",
        "id": "combo",
        "name": "Park + cable car",
        "zones": {"park": 1, "cable": 1},
    },
    {
        "type": "product",
        "id": "multi",
        "name": "Season",
        "zones": {"park": None},
        "reentry": {"mode": "always"},
    },
]


def ticket(tid: str, product: str = "day", **extra: object) -> dict[str, object]:
    return {
        "type": "ticket",
        "id": tid,
        "code": f"CODE-{tid}",
        "channel": "ota",
        "product_id": product,
        "valid_from": NOW - DAY,
        "valid_to": NOW + DAY,
        **extra,
    }


def write_jsonl(path: Path, records: list[dict[str, object]], bad: list[str] = ()) -> Path:
    path.write_text("\n".join([*(json.dumps(r) for r in records), *bad]) + "\n")
    return path


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Testbed]:
    with Testbed(tmp_path, lane={"zone": "park"}) as tb:
        tb.start_sim()
        tb.start_daemon()
        yield tb


def present(tb: Testbed, lane: str, code: str, direction: str = "entry") -> dict[str, object]:
    reply = tb.ctl({"cmd": "present", "lane": lane, "code": code, "direction": direction})
    assert reply["ok"], reply
    return reply


def test_import_present_pass_and_refuse_with_reasons(gate: Testbed, tmp_path: Path) -> None:
    tb = gate
    records = [
        *PRODUCTS,
        ticket("t1"),
        ticket("t2"),
        ticket("old", valid_to=NOW - 3600),
        ticket("gone", status="revoked"),
        ticket("combo1", "combo"),
    ]
    path = write_jsonl(
        tmp_path / "import.jsonl",
        records,
        bad=["{not json", json.dumps({"type": "ticket", "id": "x"})],
    )
    r = tb.gatectl("cache", "import", str(path))
    assert "imported 8 record(s), skipped 2" in r.stdout, (r.stdout, r.stderr)
    assert "line 9: not JSON" in r.stderr and "line 10: valid_from" in r.stderr
    stats = json.loads(tb.gatectl("cache", "stats", "--json").stdout)
    assert stats["tickets"] == 5

    reply = present(tb, "L1", "CODE-t1")
    assert reply["outcome"] == "unlocked" and reply["decision"]["reason"] == "ok"
    assert tb.sim.walk(1, "entry")
    [passage] = tb.wait_event("passage")
    assert passage.data["ticket_id"] == "t1" and passage.lane == "L1"
    tb.wait_modes("locked")
    again = present(tb, "L2", "CODE-t1")
    assert again["outcome"] == "refused" and again["decision"]["reason"] == "zone_used_up"

    for code, reason in (
        ("CODE-old", "expired"),
        ("CODE-gone", "revoked"),
        ("nope", "unknown"),
        ("' OR 1=1 --", "unknown"),
    ):
        reply = present(tb, "L1", code)
        assert reply["decision"]["reason"] == reason and reply["outcome"] == "refused"
    denied = tb.wait_event("denied", count=5)
    assert {e.data["reason"] for e in denied} >= {"expired", "revoked", "unknown"}
    assert all("code" not in e.data for e in tb.events())

    lookup = tb.gatectl("cache", "lookup", "CODE-t1")
    assert lookup.returncode == 1 and "zone_used_up" in lookup.stdout and "FAIL" in lookup.stdout


def test_nobody_passes_the_entry_is_given_back(gate: Testbed, tmp_path: Path) -> None:
    tb = gate
    tb.gatectl("cache", "import", str(write_jsonl(tmp_path / "t.jsonl", [*PRODUCTS, ticket("t")])))
    assert present(tb, "L2", "CODE-t")["outcome"] == "unlocked"
    [np] = tb.wait_event("not_passed", timeout_s=8)
    assert np.data.get("reason") == "timeout"
    tb.wait_modes("locked")
    assert present(tb, "L1", "CODE-t")["outcome"] == "unlocked"
    assert tb.sim.walk(1, "entry")
    tb.wait_event("passage")


def test_a_lane_that_refuses_gives_the_reservation_back(gate: Testbed, tmp_path: Path) -> None:
    tb = gate
    tb.gatectl("cache", "import", str(write_jsonl(tmp_path / "t.jsonl", [*PRODUCTS, ticket("t")])))
    assert tb.gatectl("lockout", "L1", "on").returncode == 0
    reply = present(tb, "L1", "CODE-t")
    assert reply["outcome"] == "lane_locked_out"
    assert present(tb, "L2", "CODE-t")["outcome"] == "unlocked"


class FakeLane:
    """A lane that always unlocks and remembers its authorisation."""

    def __init__(self, lane_id: str) -> None:
        self.id = lane_id
        self.auth: str | None = None

    def unlock(self, direction: Direction, auth: str) -> tuple[bool, str | None]:
        self.auth = auth
        return True, None


def test_two_lanes_one_single_entry_ticket_1000_times(tmp_path: Path) -> None:
    """Both lanes present the same ticket before either has passed: exactly one gets in."""
    with Cache(tmp_path / "gate.db", policy=Policy()) as cache:
        result = cache.import_records([PRODUCTS[0], *(ticket(f"r{i}") for i in range(1000))])
        assert result.tickets == 1000
        adm = Admission(cache, {"A": "park", "B": "park"}, Policy())
        a, b = FakeLane("A"), FakeLane("B")
        for i in range(1000):
            first, second = (a, b) if i % 2 else (b, a)
            d1, out1 = adm.present(first, f"CODE-r{i}", "entry")
            d2, out2 = adm.present(second, f"CODE-r{i}", "entry")
            assert (out1, out2) == ("unlocked", "refused"), (i, d1.reason, d2.reason)
            assert d2.reason is Reason.IN_USE
            assert adm.passed(first.auth, time.time())
            if i % 3 == 0:
                # While the commit is still on its way to the disk, still refused.
                _, out3 = adm.present(second, f"CODE-r{i}", "entry")
                assert out3 == "refused"
    passages = list(read_events(tmp_path / "gate.db", kind="passage"))
    assert len(passages) == 1000
    assert len({e.data["ticket_id"] for e in passages}) == 1000
    assert verify_chain(tmp_path / "gate.db").ok


CODES = st.one_of(
    st.binary(max_size=64).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.text(max_size=200),
    st.sampled_from(
        [
            "' OR '1'='1",
            "x'; DROP TABLE tickets; --",
            "%",
            "_",
            "\x00",
            "CODE-%",
            "CODE-t_",
            "code-t1",
            " CODE-t1",
            "CODE-t1 ",
            "CODE-t1\n",
        ]
    ),
    st.binary(min_size=10_000, max_size=10_240).map(lambda b: b.decode("latin-1")),
)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cache]:
    path = tmp_path_factory.mktemp("codes") / "gate.db"
    with Cache(path, policy=Policy()) as cache:
        cache.import_records([*PRODUCTS, ticket("t1"), ticket("t2", "multi")])
        yield cache


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(code=CODES, direction=st.sampled_from(["entry", "exit"]))
def test_any_code_gives_a_decision_and_opens_only_for_a_ticket(
    small_cache: Cache, code: str, direction: str
) -> None:
    adm = Admission(small_cache, {"A": "park"}, Policy())
    decision = adm.lookup(code, adm.point("A", direction))
    assert decision.reason in Reason
    if decision.allowed:
        assert code in ("CODE-t1", "CODE-t2")


SEED = bytes(range(32))  # a test key, not a secret


def token(ticket_id: str, zones: dict[str, int | None], seed: bytes = SEED) -> str:
    now = int(time.time())
    claims = TokenClaims(
        issuer="test-park",
        ticket_id=ticket_id,
        product="day",
        zones=zones,
        not_before=now - 60,
        expires=now + 3600,
        issued_at=now - 60,
        channel="ota",
    )
    return mint_token(claims, seed)


def test_a_signed_token_never_synced_is_admitted_once_and_honours_refunds(
    tmp_path: Path,
) -> None:
    public = public_key_for(SEED)
    keys = KeyRing([TrustedKey(kid_for(public), public, "test-park")])
    with Cache(tmp_path / "gate.db", policy=Policy()) as cache:
        adm = Admission(cache, {"A": "park", "B": "park"}, Policy(), keys)
        a, b = FakeLane("A"), FakeLane("B")
        code = token("tok-1", {"park": 1})
        decision, outcome = adm.present(a, code, "entry")
        assert (outcome, decision.reason) == ("unlocked", Reason.OK)
        assert adm.present(b, code, "entry")[1] == "refused"  # in use at lane A
        assert adm.passed(a.auth, time.time())
        auth = a.auth
        wait_for(lambda: not cache.holds(auth), 5, "the commit on the writer thread")
        again, _ = adm.present(b, code, "entry")
        assert again.reason is Reason.ZONE_USED_UP
        assert adm.present(a, token("tok-1", {"cable": 1}), "entry")[0].reason is Reason.WRONG_ZONE
        stranger = token("tok-2", {"park": 1}, seed=bytes(32))
        assert adm.present(a, stranger, "entry")[0].reason is Reason.BAD_SIGNATURE
        tampered = code[:-3] + ("A" if code[-3] != "A" else "B") + code[-2:]
        assert adm.present(a, tampered, "entry")[0].reason in (
            Reason.BAD_SIGNATURE,
            Reason.BAD_CODE,
        )
        cache.import_records([PRODUCTS[0], {**ticket("tok-3"), "status": "refunded"}])
        refunded, _ = adm.present(a, token("tok-3", {"park": 1}), "entry")
        assert refunded.reason is Reason.REFUNDED
    [passage] = read_events(tmp_path / "gate.db", kind="passage")
    assert passage.data["ticket_id"] == "tok-1"
