"""The admission rules as a table: one row per rule and edge, read top to bottom in rule order.

Each row builds a Situation (what the cache would gather for one scanned code), a Point (lane,
zone, direction) and a time, and states the decision: allowed, reason, entries remaining.
The site is in China Standard Time; NOW is 10:00 local on 1 May 2024.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, cast

import pytest

from agent.gate.core import _REFUSAL
from verify import rules
from verify.model import (
    Block,
    Decision,
    Point,
    Policy,
    Product,
    Reason,
    ReentryPolicy,
    Situation,
    Ticket,
    Usage,
    local_day,
)
from verify.rules import PROMPTS, decide

CST = timezone(timedelta(hours=8))
NOW = datetime(2024, 5, 1, 10, 0, tzinfo=CST).timestamp()
MIN = 60.0
HOUR = 3600.0
DAY = 86400.0
TODAY = "2024-05-01"
YESTERDAY = "2024-04-30"

SITE = Policy()  # grace 600 s each side, re-entry after an exit, anti-passback on, 300 s clock
PARK = Product(id="p-park", name="Park day ticket", zones={"park": None})
COMBO = Product(id="p-combo", name="Park + cable car", zones={"park": 1, "cable": 2})
SLOT_START = NOW + 2 * HOUR
SLOT_END = NOW + 4 * HOUR

ENTRY = Point(lane="L1", zone="park")
EXIT = Point(lane="X1", zone="park", direction="exit")
CABLE = Point(lane="C1", zone="cable")

# The documented rule order (verify/rules.py, docs/reasons.md); exits stop after "exit".
ENTRY_RULES = (
    "unknown",
    "status",
    "blocklist",
    "clock",
    "validity",
    "slot",
    "zone",
    "entries",
    "in_use",
    "reentry",
    "anti_passback",
    "capacity",
)
EXIT_RULES = ("unknown", "exit")
ReentryMode = Literal["never", "after_exit", "after_minutes", "always"]


def ticket(**changes: Any) -> Ticket:
    """A valid park ticket, bought yesterday, valid until tomorrow, with no entry limits."""
    base = Ticket(
        id="t-1",
        code="QR-0001",
        channel="ota",
        product_id=PARK.id,
        valid_from=NOW - DAY,
        valid_to=NOW + DAY,
        holder_hash="h-alice",
    )
    return replace(base, **changes)


def slotted(**changes: Any) -> Ticket:
    """A ticket booked for the 12:00-14:00 slot."""
    return ticket(slot_start=SLOT_START, slot_end=SLOT_END, **changes)


def combo(**changes: Any) -> Ticket:
    return ticket(product_id=COMBO.id, **changes)


def sit(t: Ticket | None = None, product: Product | None = PARK, **changes: Any) -> Situation:
    """What the cache gathers for a code; the plain ticket unless told otherwise."""
    return Situation(ticket=t if t is not None else ticket(), product=product, **changes)


def used(**changes: Any) -> Usage:
    """This zone, entered once an hour ago at lane L1, still inside."""
    base = Usage(
        entries=1,
        entries_today=1,
        day=TODAY,
        last_entry_at=NOW - HOUR,
        inside=True,
        last_lane="L1",
    )
    return replace(base, **changes)


def left(**changes: Any) -> Usage:
    """This zone, entered an hour ago and left ten minutes later."""
    return used(last_exit_at=NOW - HOUR + 10 * MIN, inside=False, **changes)


def reentry(mode: ReentryMode, minutes: float = 0.0) -> Product:
    """The park product with its own re-entry policy (overriding the site's)."""
    return replace(PARK, reentry=ReentryPolicy(mode=mode, minutes=minutes))


def site(**changes: Any) -> Policy:
    return replace(SITE, **changes)


@dataclass(frozen=True)
class Row:
    """One line of the table: a situation at a point and a time, and the decision expected."""

    name: str
    situation: Situation
    allowed: bool
    reason: Reason
    remaining: int | None = None
    point: Point = ENTRY
    now: float = NOW
    policy: Policy = SITE


OK, DENY = True, False
ALWAYS = reentry("always")

ROWS = [
    # 1. unknown
    Row("plain ticket enters", sit(), OK, Reason.OK),
    Row("no ticket with this code", Situation(ticket=None), DENY, Reason.UNKNOWN),
    Row("product not in the cache", sit(product=None), DENY, Reason.UNKNOWN),
    Row("product of another ticket", sit(product=COMBO), DENY, Reason.UNKNOWN),
    Row("exit with no ticket", Situation(ticket=None), DENY, Reason.UNKNOWN, point=EXIT),
    Row("exit with no product", sit(product=None), DENY, Reason.UNKNOWN, point=EXIT),
    # 2. exit: nobody is kept inside
    Row("exit", sit(usage=used()), OK, Reason.OK_EXIT, point=EXIT),
    Row("exit revoked", sit(ticket(status="revoked")), OK, Reason.OK_EXIT, point=EXIT),
    Row("exit refunded", sit(ticket(status="refunded")), OK, Reason.OK_EXIT, point=EXIT),
    Row(
        "exit blocked",
        sit(blocks=(Block("ticket", "t-1"),)),
        OK,
        Reason.OK_EXIT,
        point=EXIT,
    ),
    Row("exit expired", sit(ticket(valid_to=NOW - DAY)), OK, Reason.OK_EXIT, point=EXIT),
    Row("exit slot long over", sit(slotted()), OK, Reason.OK_EXIT, point=EXIT, now=NOW + DAY / 2),
    Row("exit clock behind", sit(cloud_time=NOW + DAY), OK, Reason.OK_EXIT, point=EXIT),
    Row(
        "exit zone not in product",
        sit(),
        OK,
        Reason.OK_EXIT,
        point=Point("X9", "lake", "exit"),
    ),
    Row(
        "exit used up, held, full",
        sit(combo(), COMBO, usage=used(entries=1), held=1, occupancy=5, capacity=5),
        OK,
        Reason.OK_EXIT,
        point=EXIT,
    ),
    # 3. status
    Row("revoked", sit(ticket(status="revoked")), DENY, Reason.REVOKED),
    Row("refunded", sit(ticket(status="refunded")), DENY, Reason.REFUNDED),
    Row("status this version does not know", sit(ticket(status="unpaid")), DENY, Reason.ERROR),
    Row(
        "revoked before blocked",
        sit(ticket(status="revoked"), blocks=(Block("ticket", "t-1"),)),
        DENY,
        Reason.REVOKED,
    ),
    # 4. blocklist
    Row("ticket blocked", sit(blocks=(Block("ticket", "t-1", "fraud"),)), DENY, Reason.BLOCKED),
    Row("holder blocked", sit(blocks=(Block("holder", "h-alice"),)), DENY, Reason.BLOCKED),
    Row(
        "holder block, ticket without holder",
        sit(ticket(holder_hash=None), blocks=(Block("holder", "h-alice"),)),
        OK,
        Reason.OK,
    ),
    Row(
        "other ticket and holder blocked",
        sit(blocks=(Block("ticket", "t-2"), Block("holder", "h-bob"))),
        OK,
        Reason.OK,
    ),
    Row(
        "holder hash is not a ticket id",
        sit(blocks=(Block("ticket", "h-alice"), Block("holder", "t-1"))),
        OK,
        Reason.OK,
    ),
    Row(
        "face block is not the rules' business", sit(blocks=(Block("face", "t-1"),)), OK, Reason.OK
    ),
    Row(
        "block until now has ended", sit(blocks=(Block("ticket", "t-1", until=NOW),)), OK, Reason.OK
    ),
    Row(
        "block until a second from now",
        sit(blocks=(Block("ticket", "t-1", until=NOW + 1),)),
        DENY,
        Reason.BLOCKED,
    ),
    Row(
        "ended block and a live one",
        sit(blocks=(Block("ticket", "t-1", until=NOW - 1), Block("holder", "h-alice"))),
        DENY,
        Reason.BLOCKED,
    ),
    Row(
        "blocked before clock",
        sit(blocks=(Block("ticket", "t-1"),), cloud_time=NOW + DAY),
        DENY,
        Reason.BLOCKED,
    ),
    # 5. clock
    Row("clock behind the cloud", sit(cloud_time=NOW + 301), DENY, Reason.CLOCK_ERROR),
    Row("clock behind by exactly the tolerance", sit(cloud_time=NOW + 300), OK, Reason.OK),
    Row("clock a minute behind", sit(cloud_time=NOW + MIN), OK, Reason.OK),
    Row("clock ahead of the cloud", sit(cloud_time=NOW - DAY), OK, Reason.OK),
    Row(
        "clock with no tolerance",
        sit(cloud_time=NOW + 1),
        DENY,
        Reason.CLOCK_ERROR,
        policy=site(clock_tolerance_s=0.0),
    ),
    Row(
        "clock before validity: expired looks valid to a clock gone back",
        sit(ticket(valid_to=NOW + MIN), cloud_time=NOW + DAY),
        DENY,
        Reason.CLOCK_ERROR,
    ),
    # 6. validity
    Row("a second before valid_from", sit(ticket(valid_from=NOW + 1)), DENY, Reason.NOT_YET_VALID),
    Row("exactly valid_from", sit(ticket(valid_from=NOW)), OK, Reason.OK),
    Row("exactly valid_to", sit(ticket(valid_to=NOW)), OK, Reason.OK),
    Row("a second after valid_to", sit(ticket(valid_to=NOW - 1)), DENY, Reason.EXPIRED),
    Row("expired before slot", sit(slotted(valid_to=NOW - 1)), DENY, Reason.EXPIRED),
    # 7. time slot, site grace 600 s
    Row("slot: before the grace", sit(slotted()), DENY, Reason.TOO_EARLY, now=SLOT_START - 601),
    Row("slot: grace opens", sit(slotted()), OK, Reason.OK, now=SLOT_START - 600),
    Row("slot: inside", sit(slotted()), OK, Reason.OK, now=SLOT_START + HOUR),
    Row("slot: grace closes", sit(slotted()), OK, Reason.OK, now=SLOT_END + 600),
    Row("slot: after the grace", sit(slotted()), DENY, Reason.TOO_LATE, now=SLOT_END + 601),
    Row(
        "slot: site without grace, a second early",
        sit(slotted()),
        DENY,
        Reason.TOO_EARLY,
        now=SLOT_START - 1,
        policy=site(slot_grace_before_s=0.0, slot_grace_after_s=0.0),
    ),
    Row(
        "slot: site without grace, a second late",
        sit(slotted()),
        DENY,
        Reason.TOO_LATE,
        now=SLOT_END + 1,
        policy=site(slot_grace_before_s=0.0, slot_grace_after_s=0.0),
    ),
    Row(
        "slot: product grace 0 overrides site 600",
        sit(slotted(), replace(PARK, slot_grace_before_s=0.0, slot_grace_after_s=0.0)),
        DENY,
        Reason.TOO_EARLY,
        now=SLOT_START - 1,
    ),
    Row(
        "slot: product grace 0, exactly the start",
        sit(slotted(), replace(PARK, slot_grace_before_s=0.0)),
        OK,
        Reason.OK,
        now=SLOT_START,
    ),
    Row(
        "slot: product grace 30 min after, at its edge",
        sit(slotted(), replace(PARK, slot_grace_after_s=30 * MIN)),
        OK,
        Reason.OK,
        now=SLOT_END + 30 * MIN,
    ),
    Row(
        "slot: product grace 30 min after, a second past",
        sit(slotted(), replace(PARK, slot_grace_after_s=30 * MIN)),
        DENY,
        Reason.TOO_LATE,
        now=SLOT_END + 30 * MIN + 1,
    ),
    Row(
        "slot: product overrides one side, site grace the other",
        sit(slotted(), replace(PARK, slot_grace_after_s=0.0)),
        OK,
        Reason.OK,
        now=SLOT_START - 600,
    ),
    Row("slot: open end", sit(ticket(slot_start=NOW - DAY / 2)), OK, Reason.OK),
    Row("slot: open start", sit(ticket(slot_end=NOW + 1)), OK, Reason.OK),
    Row("too early before wrong zone", sit(slotted()), DENY, Reason.TOO_EARLY, point=CABLE),
    # 8. zone
    Row("zone not in product", sit(), DENY, Reason.WRONG_ZONE, point=CABLE),
    Row("combo: park", sit(combo(), COMBO), OK, Reason.OK, 0),
    Row("combo: cable car", sit(combo(), COMBO), OK, Reason.OK, 1, point=CABLE),
    Row(
        "combo: lake not in it",
        sit(combo(), COMBO),
        DENY,
        Reason.WRONG_ZONE,
        point=Point("K", "lake"),
    ),
    Row(
        "wrong zone before used up",
        sit(combo(max_entries_total=1), COMBO, usage=left(), ticket_entries=1),
        DENY,
        Reason.WRONG_ZONE,
        point=Point("K", "lake"),
    ),
    # 9. entries: zone, day, total
    Row("combo: park used up", sit(combo(), COMBO, usage=left()), DENY, Reason.ZONE_USED_UP),
    Row(
        "combo: park used, cable car still has 2",
        sit(combo(), COMBO, ticket_entries=1, ticket_entries_today=1),
        OK,
        Reason.OK,
        1,
        point=CABLE,
    ),
    Row(
        "combo: cable car used once, then again after exit",
        sit(combo(), COMBO, usage=left(), ticket_entries=2),
        OK,
        Reason.OK,
        0,
        point=CABLE,
    ),
    Row(
        "combo: cable car used up",
        sit(combo(), COMBO, usage=left(entries=2), ticket_entries=2),
        DENY,
        Reason.ZONE_USED_UP,
        point=CABLE,
    ),
    Row(
        "combo: cable car used up, park still open",
        sit(combo(), COMBO, ticket_entries=2, ticket_entries_today=2),
        OK,
        Reason.OK,
        0,
    ),
    Row(
        "zone limit 0",
        sit(product=replace(PARK, zones={"park": 0})),
        DENY,
        Reason.ZONE_USED_UP,
    ),
    Row(
        "daily limit reached",
        sit(ticket(max_entries_per_day=2), ticket_entries_today=2, ticket_entries=2),
        DENY,
        Reason.DAILY_LIMIT,
    ),
    Row(
        "daily limit, one left",
        sit(ticket(max_entries_per_day=2), ticket_entries_today=1, ticket_entries=5),
        OK,
        Reason.OK,
        0,
    ),
    Row(
        "total limit reached",
        sit(ticket(max_entries_total=3), ticket_entries=3),
        DENY,
        Reason.TOTAL_LIMIT,
    ),
    Row(
        "total limit, three left",
        sit(ticket(max_entries_total=10), ticket_entries=7),
        OK,
        Reason.OK,
        2,
    ),
    Row(
        "remaining is the smallest limit minus this entry",
        sit(
            ticket(max_entries_per_day=3, max_entries_total=10),
            replace(PARK, zones={"park": 5}),
            usage=left(),
            ticket_entries=1,
            ticket_entries_today=1,
        ),
        OK,
        Reason.OK,
        1,
    ),
    Row(
        "zone used up before daily limit",
        sit(combo(max_entries_per_day=1), COMBO, usage=left(), ticket_entries_today=1),
        DENY,
        Reason.ZONE_USED_UP,
    ),
    Row(
        "daily limit before total limit",
        sit(
            ticket(max_entries_per_day=1, max_entries_total=1),
            ticket_entries=1,
            ticket_entries_today=1,
        ),
        DENY,
        Reason.DAILY_LIMIT,
    ),
    # 10. in use: another lane holds the ticket (reserved, not yet committed)
    Row("held at another lane", sit(held=1), DENY, Reason.IN_USE),
    Row(
        "used up before held", sit(combo(), COMBO, usage=left(), held=1), DENY, Reason.ZONE_USED_UP
    ),
    Row("held before re-entry", sit(usage=used(), held=1), DENY, Reason.IN_USE),
    # 11. re-entry (site: after an exit)
    Row("re-entry without an exit", sit(usage=used()), DENY, Reason.NO_REENTRY),
    Row("re-entry after an exit", sit(usage=left()), OK, Reason.OK),
    Row(
        "exit at the second of the entry counts",
        sit(usage=used(last_exit_at=NOW - HOUR, inside=False)),
        OK,
        Reason.OK,
    ),
    Row(
        "exit older than the last entry",
        sit(usage=used(last_exit_at=NOW - 2 * HOUR, inside=False)),
        DENY,
        Reason.NO_REENTRY,
    ),
    Row(
        "used, last entry time unknown",
        sit(usage=Usage(entries=1, last_exit_at=NOW - MIN)),
        DENY,
        Reason.NO_REENTRY,
    ),
    Row("never: first entry", sit(product=reentry("never")), OK, Reason.OK),
    Row(
        "never: even after an exit",
        sit(product=reentry("never"), usage=left()),
        DENY,
        Reason.NO_REENTRY,
    ),
    Row(
        "never: used, last entry time unknown",
        sit(product=reentry("never"), usage=Usage(entries=1)),
        DENY,
        Reason.NO_REENTRY,
    ),
    Row(
        "never from the site",
        sit(usage=left()),
        DENY,
        Reason.NO_REENTRY,
        policy=site(reentry=ReentryPolicy("never")),
    ),
    Row(
        "product always overrides site never",
        sit(product=ALWAYS, usage=left()),
        OK,
        Reason.OK,
        policy=site(reentry=ReentryPolicy("never")),
    ),
    Row(
        "after 30 min: a second too soon",
        sit(product=reentry("after_minutes", 30), usage=left(last_entry_at=NOW - 30 * MIN + 1)),
        DENY,
        Reason.REENTRY_TOO_SOON,
    ),
    Row(
        "after 30 min: exactly 30 min",
        sit(product=reentry("after_minutes", 30), usage=left(last_entry_at=NOW - 30 * MIN)),
        OK,
        Reason.OK,
    ),
    Row(
        "after 30 min: no exit needed, anti-passback off",
        sit(product=reentry("after_minutes", 30), usage=used()),
        OK,
        Reason.OK,
        policy=site(anti_passback=False),
    ),
    Row(
        "after 30 min: last entry time unknown",
        sit(product=reentry("after_minutes", 30), usage=Usage(entries=1)),
        DENY,
        Reason.REENTRY_TOO_SOON,
    ),
    Row("always: after an exit", sit(product=ALWAYS, usage=left()), OK, Reason.OK),
    # 12. anti-passback
    Row(
        "inside, scanned again at the same lane",
        sit(product=ALWAYS, usage=used()),
        DENY,
        Reason.ALREADY_INSIDE,
    ),
    Row(
        "inside via L1, passed back to L2",
        sit(product=ALWAYS, usage=used(last_lane="L1")),
        DENY,
        Reason.ALREADY_INSIDE,
        point=Point("L2", "park"),
    ),
    Row(
        "anti-passback off",
        sit(product=ALWAYS, usage=used()),
        OK,
        Reason.OK,
        point=Point("L2", "park"),
        policy=site(anti_passback=False),
    ),
    Row(
        "inside since yesterday: a new day",
        sit(product=ALWAYS, usage=used(day=YESTERDAY, last_entry_at=NOW - DAY)),
        OK,
        Reason.OK,
    ),
    Row(
        "left the zone", sit(product=ALWAYS, usage=left()), OK, Reason.OK, point=Point("L2", "park")
    ),
    Row(
        "inside before full",
        sit(product=ALWAYS, usage=used(), occupancy=10, capacity=10),
        DENY,
        Reason.ALREADY_INSIDE,
    ),
    # 13. capacity
    Row("zone full", sit(occupancy=500, capacity=500), DENY, Reason.ZONE_FULL),
    Row("zone over full", sit(occupancy=501, capacity=500), DENY, Reason.ZONE_FULL),
    Row("zone one place left", sit(occupancy=499, capacity=500), OK, Reason.OK),
    Row("zone without a cap", sit(occupancy=10**6), OK, Reason.OK),
    Row("zone capacity 0", sit(capacity=0), DENY, Reason.ZONE_FULL),
    # fail closed
    Row(
        "broken usage row",
        sit(combo(), COMBO, usage=Usage(entries=cast(int, None))),
        DENY,
        Reason.ERROR,
    ),
    Row(
        "broken limit",
        sit(ticket(max_entries_total=cast(int, "3")), ticket_entries=1),
        DENY,
        Reason.ERROR,
    ),
    Row(
        "a time past the calendar",
        sit(ticket(valid_to=float("inf"))),
        DENY,
        Reason.ERROR,
        now=1e300,
    ),
]


@pytest.mark.parametrize("r", ROWS, ids=[r.name for r in ROWS])
def test_rule_table(r: Row) -> None:
    d = decide(r.situation, r.point, r.now, r.policy)
    assert (d.allowed, d.reason, d.remaining) == (r.allowed, r.reason, r.remaining)
    t = r.situation.ticket
    assert d.ticket_id == (t.id if t else None)
    assert d.zone == r.point.zone
    assert (d.prompt_zh, d.prompt_en) == PROMPTS[r.reason]


@pytest.mark.parametrize("r", ROWS, ids=[r.name for r in ROWS])
def test_steps_follow_the_documented_order(r: Row) -> None:
    d = decide(r.situation, r.point, r.now, r.policy)
    names = [s.rule for s in d.steps]
    if names[-1] == "error":
        assert r.reason is Reason.ERROR
        names = names[:-1]
    order = (
        EXIT_RULES
        if r.point.direction == "exit" and d.reason is not Reason.UNKNOWN
        else ENTRY_RULES
    )
    assert tuple(names) == order[: len(names)]
    assert all(s.passed for s in d.steps[:-1])
    assert d.steps[-1].passed is d.allowed
    if d.reason is Reason.OK:
        assert tuple(names) == ENTRY_RULES
    if d.reason is Reason.OK_EXIT:
        assert tuple(names) == EXIT_RULES


def test_the_engine_docstring_lists_the_same_order() -> None:
    listed = re.findall(r"^\s*\d+\.\s+(\S+(?: \S+)?)\s{2,}", rules.__doc__ or "", re.M)
    names = [n.replace("-", "").replace(" ", "_") for n in listed]
    aliases = {"time_slot": "slot", "antipassback": "anti_passback"}
    names = [aliases.get(n, n) for n in names]
    assert names[:2] == list(EXIT_RULES)
    assert [names[0], *names[2:]] == list(ENTRY_RULES)


def test_every_engine_reason_has_a_row() -> None:
    # These are decided before the engine: the code parser, the token check, the card check.
    before = {Reason.BAD_CODE, Reason.BAD_SIGNATURE, Reason.CARD_INVALID}
    assert {r.reason for r in ROWS} == set(Reason) - before


def test_the_deciding_rule_of_each_reason() -> None:
    rule_of = {
        Reason.OK: "capacity",
        Reason.OK_EXIT: "exit",
        Reason.UNKNOWN: "unknown",
        Reason.REVOKED: "status",
        Reason.REFUNDED: "status",
        Reason.BLOCKED: "blocklist",
        Reason.CLOCK_ERROR: "clock",
        Reason.NOT_YET_VALID: "validity",
        Reason.EXPIRED: "validity",
        Reason.TOO_EARLY: "slot",
        Reason.TOO_LATE: "slot",
        Reason.WRONG_ZONE: "zone",
        Reason.ZONE_USED_UP: "entries",
        Reason.DAILY_LIMIT: "entries",
        Reason.TOTAL_LIMIT: "entries",
        Reason.IN_USE: "in_use",
        Reason.NO_REENTRY: "reentry",
        Reason.REENTRY_TOO_SOON: "reentry",
        Reason.ALREADY_INSIDE: "anti_passback",
        Reason.ZONE_FULL: "capacity",
    }
    for r in ROWS:
        d = decide(r.situation, r.point, r.now, r.policy)
        last = d.steps[-1].rule
        if d.reason is Reason.ERROR:
            assert last in ("error", "status"), r.name
        else:
            assert last == rule_of[d.reason], r.name


def test_a_step_explains_a_refusal() -> None:
    d = decide(sit(blocks=(Block("holder", "h-alice", "fraud"),)), ENTRY, NOW, SITE)
    assert d.steps[-1].detail == "holder blocked: fraud"
    d = decide(
        sit(usage=Usage(entries=cast(int, None)), product=COMBO, t=combo()), ENTRY, NOW, SITE
    )
    assert d.steps[-1].rule == "error"
    assert d.steps[-1].detail == "TypeError"


def test_anti_passback_across_two_lanes() -> None:
    """One ticket enters at L1; the same code handed back over the fence is refused at L2."""
    product = ALWAYS
    first = decide(sit(product=product), ENTRY, NOW, SITE)
    assert first.allowed
    inside = used(last_entry_at=NOW, last_lane="L1")
    second = decide(sit(product=product, usage=inside), Point("L2", "park"), NOW + 5, SITE)
    assert (second.allowed, second.reason) == (False, Reason.ALREADY_INSIDE)
    assert second.steps[-1].detail == "entered at lane L1"
    # While L1 still holds the reservation, L2 is refused before anything is committed.
    racing = decide(sit(product=product, held=1), Point("L2", "park"), NOW, SITE)
    assert (racing.allowed, racing.reason) == (False, Reason.IN_USE)


def test_decide_is_pure() -> None:
    s = sit(combo(max_entries_total=5), COMBO, usage=left(), ticket_entries=1)
    assert decide(s, CABLE, NOW, SITE) == decide(s, CABLE, NOW, SITE)
    assert s == sit(combo(max_entries_total=5), COMBO, usage=left(), ticket_entries=1)


@pytest.mark.parametrize(
    ("t", "offset_s", "day"),
    [
        (datetime(2024, 5, 1, 0, 0, tzinfo=CST).timestamp(), 8 * 3600, TODAY),
        (datetime(2024, 5, 1, 0, 0, tzinfo=CST).timestamp() - 1, 8 * 3600, YESTERDAY),
        (datetime(2024, 5, 1, 23, 59, 59, tzinfo=CST).timestamp(), 8 * 3600, TODAY),
        (datetime(2024, 4, 30, 16, 0, tzinfo=UTC).timestamp(), 0, YESTERDAY),
        (datetime(2024, 4, 30, 16, 0, tzinfo=UTC).timestamp(), 8 * 3600, TODAY),
    ],
)
def test_local_day_turns_at_the_sites_midnight(t: float, offset_s: int, day: str) -> None:
    assert local_day(t, site(utc_offset_s=offset_s).utc_offset_s) == day


def test_anti_passback_ends_at_the_sites_midnight() -> None:
    midnight = datetime(2024, 5, 1, 0, 0, tzinfo=CST).timestamp()
    inside = used(day=YESTERDAY, last_entry_at=midnight - HOUR)
    late = decide(sit(product=ALWAYS, usage=inside), ENTRY, midnight - 1, SITE)
    assert late.reason is Reason.ALREADY_INSIDE
    after = decide(sit(product=ALWAYS, usage=inside), ENTRY, midnight, SITE)
    assert after.reason is Reason.OK


# --- the reason list in docs/reasons.md -----------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "reasons.md"
# The order a reader meets the codes: the parser's, then the engine's rules, then the outcome.
DOC_ORDER = (
    Reason.BAD_CODE,
    Reason.BAD_SIGNATURE,
    Reason.CARD_INVALID,
    Reason.UNKNOWN,
    Reason.OK_EXIT,
    Reason.REVOKED,
    Reason.REFUNDED,
    Reason.BLOCKED,
    Reason.CLOCK_ERROR,
    Reason.NOT_YET_VALID,
    Reason.EXPIRED,
    Reason.TOO_EARLY,
    Reason.TOO_LATE,
    Reason.WRONG_ZONE,
    Reason.ZONE_USED_UP,
    Reason.DAILY_LIMIT,
    Reason.TOTAL_LIMIT,
    Reason.IN_USE,
    Reason.NO_REENTRY,
    Reason.REENTRY_TOO_SOON,
    Reason.ALREADY_INSIDE,
    Reason.ZONE_FULL,
    Reason.OK,
    Reason.ERROR,
)


def _doc_rows() -> dict[str, list[str]]:
    """Table rows of docs/reasons.md keyed by their first cell (a `code`)."""
    found: dict[str, list[str]] = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*`([a-z_]+)`\s*\|(.*)\|\s*$", line)
        if m:
            found[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return found


def test_every_reason_has_prompts() -> None:
    assert set(PROMPTS) == set(Reason)
    for zh, en in PROMPTS.values():
        assert zh.strip()
        assert en.strip()


def test_every_reason_is_documented_with_its_prompts() -> None:
    rows = _doc_rows()
    for reason in Reason:
        assert reason.value in rows, f"{reason.value} missing from docs/reasons.md"
        zh, en = PROMPTS[reason]
        assert zh in rows[reason.value], f"{reason.value}: Chinese prompt differs from PROMPTS"
        assert en in rows[reason.value], f"{reason.value}: English prompt differs from PROMPTS"


def test_reasons_are_documented_in_rule_order() -> None:
    order = [code for code in _doc_rows() if code in set(Reason)]
    assert order == [r.value for r in DOC_ORDER]


def test_lane_refusals_are_documented() -> None:
    rows = _doc_rows()
    for code in {*_REFUSAL.values(), "direction_not_wired"}:
        assert code in rows, f"lane refusal {code} missing from docs/reasons.md"


def test_decision_is_a_value() -> None:
    d = decide(sit(), ENTRY, NOW, SITE)
    assert isinstance(d, Decision)
    assert d == replace(d, steps=())
