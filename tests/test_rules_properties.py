"""Properties of the admission rules over random situations.

Hypothesis builds whatever the cache could hand the engine, sensible or not: present or
absent tickets and products, a product of another ticket, any status string, codes of any
content and length, blocks that may or may not name the ticket, usage counts from negative to
huge, times from the far past to the far future (huge, negative and infinite floats; never
NaN), random zones, lanes and directions. The engine must always answer with a Decision, and
an allowed decision must be one the rules permit.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar, cast

from hypothesis import given, settings
from hypothesis import strategies as st

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

NOW = datetime(2024, 5, 1, 10, 0, tzinfo=timezone(timedelta(hours=8))).timestamp()
DAY = 86400.0
ZONES = ("park", "cable", "lake")
TICKET_IDS = ("t1", "t2")
HOLDERS = ("h1", "h2")
PRODUCT_IDS = ("p1", "p2")
DAYS = ("2024-04-30", "2024-05-01", "2024-05-02")
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
ALLOWED = {Reason.OK, Reason.OK_EXIT}

PROPERTY = settings(max_examples=300, deadline=None)

T = TypeVar("T")
U = TypeVar("U")


def mostly(usual: st.SearchStrategy[T], rare: st.SearchStrategy[U]) -> st.SearchStrategy[T | U]:
    """`usual` about seven times in eight, else `rare`: enough sensible cases to reach the
    late rules. (3 is no boundary, which Hypothesis would favour.)"""
    return st.integers(0, 7).flatmap(lambda i: rare if i == 3 else usual)


wild_times = st.floats(allow_nan=False)
# Times cluster around NOW (so that rules pass as often as they fail, and NOW itself makes
# the exact edges) and spread to the wild ones: huge, negative, infinite.
times = st.one_of(
    st.just(NOW), st.floats(min_value=NOW - 2 * DAY, max_value=NOW + 2 * DAY), wild_times
)
nows = mostly(st.floats(min_value=NOW - 2 * DAY, max_value=NOW + 2 * DAY), times)
valid_froms = mostly(st.floats(min_value=NOW - 9 * DAY, max_value=NOW - 2 * DAY), times)
valid_tos = mostly(st.floats(min_value=NOW + 2 * DAY, max_value=NOW + 9 * DAY), times)
durations = st.one_of(
    st.floats(min_value=0, max_value=2 * DAY),
    st.sampled_from([0.0, 300.0, 600.0]),
    st.floats(allow_nan=False, allow_infinity=False),
)
counts = st.one_of(
    st.integers(min_value=-2, max_value=5),
    st.integers(min_value=-(2**63), max_value=2**63),
)
limits = mostly(st.none(), counts)
zones = mostly(st.sampled_from(ZONES), st.text(max_size=4))
codes = st.one_of(
    st.text(),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["' OR '1'='1", "1; DROP TABLE tickets; --", "\x00", "票🎫\u202e", "%s%n"]),
    st.just("A" * 10240),
)
statuses = mostly(st.sampled_from(["valid"] * 6 + ["revoked", "refunded"]), st.text(max_size=8))
modes = st.sampled_from(["never", "after_exit", "after_minutes", "always"])
reentry_policies = st.builds(ReentryPolicy, mode=modes, minutes=durations)
policies = st.builds(
    Policy,
    slot_grace_before_s=durations,
    slot_grace_after_s=durations,
    reentry=reentry_policies,
    anti_passback=st.booleans(),
    clock_tolerance_s=durations,
    utc_offset_s=mostly(st.integers(-12 * 3600, 14 * 3600), st.integers(-(2**40), 2**40)),
)
tickets = st.builds(
    Ticket,
    id=st.sampled_from(TICKET_IDS),
    code=codes,
    channel=st.sampled_from(["ota", "window", "wechat"]),
    product_id=st.sampled_from(PRODUCT_IDS),
    valid_from=valid_froms,
    valid_to=valid_tos,
    slot_start=mostly(st.none(), times),
    slot_end=mostly(st.none(), times),
    max_entries_per_day=limits,
    max_entries_total=limits,
    status=statuses,
    holder_hash=st.none() | st.sampled_from(HOLDERS),
)
products = st.builds(
    Product,
    id=st.sampled_from(PRODUCT_IDS),
    name=st.just("Park"),
    zones=st.dictionaries(zones, limits, max_size=3),
    reentry=st.none() | reentry_policies,
    slot_grace_before_s=st.none() | durations,
    slot_grace_after_s=st.none() | durations,
)
usages = st.builds(
    Usage,
    entries=counts,
    entries_today=counts,
    day=st.none() | st.sampled_from(DAYS) | st.text(max_size=10),
    last_entry_at=st.none() | times,
    last_exit_at=st.none() | times,
    inside=st.booleans(),
    last_lane=st.none() | st.sampled_from(["L1", "L2"]),
)
blocks = st.builds(
    Block,
    kind=st.sampled_from(["ticket", "holder", "face"]),
    value=st.sampled_from(TICKET_IDS + HOLDERS) | st.text(max_size=4),
    reason=st.sampled_from(["", "fraud"]),
    until=st.none() | times,
)


# The ticket and product are drawn in cases(), to match them most of the time.
situations = st.builds(
    Situation,
    ticket=st.none(),
    usage=usages,
    held=mostly(st.just(0), counts),
    ticket_entries=counts,
    ticket_entries_today=counts,
    blocks=mostly(st.lists(blocks, max_size=2), st.lists(blocks, max_size=4)).map(tuple),
    occupancy=counts,
    capacity=mostly(st.none(), limits),
    cloud_time=mostly(st.none(), times),
)
points = st.builds(
    Point,
    lane=st.sampled_from(["L1", "L2", ""]),
    zone=zones,
    direction=mostly(st.just("entry"), st.just("exit")),
)
usually = mostly(st.just(True), st.booleans())
Case = tuple[Situation, Point, float, Policy]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A situation at a point, a time and a site policy."""
    point = draw(points)
    ticket = draw(mostly(tickets, st.none()))
    product = draw(mostly(products, st.none()))
    if ticket is not None and product is not None and draw(usually):
        product = replace(product, id=ticket.product_id)
    if product is not None and draw(usually):
        product = replace(product, zones={point.zone: draw(limits), **product.zones})
    situation = replace(draw(situations), ticket=ticket, product=product)
    return situation, point, draw(nows), draw(policies)


def check_decision(case: Case, d: Decision) -> None:
    """What holds for every decision, allowed or not."""
    s, point, _, _ = case
    assert isinstance(d, Decision)
    assert isinstance(d.reason, Reason)
    assert d.allowed is (d.reason in ALLOWED)
    assert d.reason is not Reason.BAD_CODE
    assert (d.prompt_zh, d.prompt_en) == PROMPTS[d.reason]
    assert d.prompt_zh.strip() and d.prompt_en.strip()
    assert d.remaining is None or d.remaining >= 0
    assert d.ticket_id == (s.ticket.id if s.ticket else None)
    assert d.zone == point.zone
    names = tuple(step.rule for step in d.steps)
    if names and names[-1] == "error":
        assert d.reason is Reason.ERROR
        names = names[:-1]
    assert names in {EXIT_RULES[: len(names)], ENTRY_RULES[: len(names)]}
    assert all(step.passed for step in d.steps[:-1])
    assert d.steps[-1].passed is d.allowed


def check_allowed(case: Case, d: Decision) -> None:
    """An allowed decision is one the rules permit; an entry satisfies every rule."""
    s, point, now, policy = case
    t, product, u = s.ticket, s.product, s.usage
    assert t is not None and product is not None and product.id == t.product_id
    if point.direction == "exit":
        assert d.reason is Reason.OK_EXIT
        return
    assert d.reason is Reason.OK
    assert t.status == "valid"
    for b in s.blocks:
        live = b.until is None or b.until > now
        names_it = (b.kind == "ticket" and b.value == t.id) or (
            b.kind == "holder" and t.holder_hash is not None and b.value == t.holder_hash
        )
        assert not (live and names_it)
    assert s.cloud_time is None or now >= s.cloud_time - policy.clock_tolerance_s
    assert t.valid_from <= now <= t.valid_to
    before = product.slot_grace_before_s
    after = product.slot_grace_after_s
    if t.slot_start is not None:
        assert now >= t.slot_start - (policy.slot_grace_before_s if before is None else before)
    if t.slot_end is not None:
        assert now <= t.slot_end + (policy.slot_grace_after_s if after is None else after)
    assert point.zone in product.zones
    left = []
    zone_limit = product.zones[point.zone]
    if zone_limit is not None:
        assert u.entries < zone_limit
        left.append(zone_limit - u.entries)
    if t.max_entries_per_day is not None:
        assert s.ticket_entries_today < t.max_entries_per_day
        left.append(t.max_entries_per_day - s.ticket_entries_today)
    if t.max_entries_total is not None:
        assert s.ticket_entries < t.max_entries_total
        left.append(t.max_entries_total - s.ticket_entries)
    assert d.remaining == (min(left) - 1 if left else None)
    assert s.held <= 0
    reentry = product.reentry or policy.reentry
    if u.entries > 0:
        assert reentry.mode != "never"
        if reentry.mode == "after_exit":
            assert u.last_entry_at is not None and u.last_exit_at is not None
            assert u.last_exit_at >= u.last_entry_at
        if reentry.mode == "after_minutes":
            assert u.last_entry_at is not None
            assert now - u.last_entry_at >= reentry.minutes * 60
    if policy.anti_passback and u.inside:
        assert u.day != local_day(now, policy.utc_offset_s)
    assert s.capacity is None or s.occupancy < s.capacity


@PROPERTY
@given(cases())
def test_any_situation_gets_a_decision(case: Case) -> None:
    d = decide(*case)
    check_decision(case, d)
    if d.allowed:
        check_allowed(case, d)
    assert decide(*case) == d


def _known(case: Case) -> Case:
    """The same case with a ticket and its own product."""
    s, point, now, policy = case
    t = s.ticket or Ticket("t1", "QR", "ota", "p1", NOW - DAY, NOW + DAY)
    product = replace(s.product or Product("p1", "Park", {"park": None}), id=t.product_id)
    return replace(s, ticket=t, product=product), point, now, policy


def unknown_variants(case: Case) -> list[Case]:
    """The case without its ticket, without its product, and with another ticket's product."""
    s, point, now, policy = _known(case)
    t, product = cast(Ticket, s.ticket), cast(Product, s.product)
    return [
        (replace(s, ticket=None), point, now, policy),
        (replace(s, product=None), point, now, policy),
        (replace(s, product=replace(product, id=t.product_id + "-other")), point, now, policy),
    ]


def _day_or_none(now: float, policy: Policy) -> str | None:
    try:
        return local_day(now, policy.utc_offset_s)
    except (OverflowError, ValueError, OSError):
        return None  # a time past the calendar: the engine refuses it with error anyway


def poisoned_entries(case: Case) -> list[Case]:
    """The known case at an entry, each with one fact that must refuse it whatever else holds."""
    s, point, now, policy = _known(case)
    point = replace(point, direction="entry")
    t, product, u = cast(Ticket, s.ticket), cast(Product, s.product), s.usage
    used = replace(u, entries=max(1, u.entries))
    inside = replace(u, inside=True, day=_day_or_none(now, policy))
    other_zones = {z: n for z, n in product.zones.items() if z != point.zone}
    changed: list[dict[str, Any]] = [
        {"ticket": replace(t, status="revoked")},
        {"ticket": replace(t, status="refunded")},
        {"blocks": (*s.blocks, Block("ticket", t.id))},
        {"ticket": replace(t, holder_hash="h1"), "blocks": (Block("holder", "h1"), *s.blocks)},
        {"cloud_time": math.inf},
        {"ticket": replace(t, valid_from=math.inf)},
        {"ticket": replace(t, valid_to=-math.inf)},
        {"product": replace(product, zones=other_zones)},
        {"product": replace(product, zones={**product.zones, point.zone: u.entries})},
        {"ticket": replace(t, max_entries_per_day=s.ticket_entries_today)},
        {"ticket": replace(t, max_entries_total=s.ticket_entries)},
        {"held": max(1, s.held)},
        {"product": replace(product, reentry=ReentryPolicy("never")), "usage": used},
        {"capacity": min(s.capacity or 0, s.occupancy)},
    ]
    out = [(replace(s, **changes), point, now, policy) for changes in changed]
    out.append((replace(s, usage=inside), point, now, replace(policy, anti_passback=True)))
    return out


@PROPERTY
@given(cases())
def test_an_unknown_ticket_is_never_let_through(case: Case) -> None:
    for unknown in unknown_variants(case):
        d = decide(*unknown)
        check_decision(unknown, d)
        assert (d.allowed, d.reason) == (False, Reason.UNKNOWN)


@PROPERTY
@given(cases())
def test_a_known_ticket_always_gets_out(case: Case) -> None:
    s, point, now, policy = _known(case)
    leaving = (s, replace(point, direction="exit"), now, policy)
    d = decide(*leaving)
    check_decision(leaving, d)
    assert (d.allowed, d.reason, d.remaining) == (True, Reason.OK_EXIT, None)


@PROPERTY
@given(cases())
def test_nothing_outweighs_a_refusal(case: Case) -> None:
    for poisoned in poisoned_entries(case):
        d = decide(*poisoned)
        check_decision(poisoned, d)
        assert not d.allowed, poisoned
