"""The admission rules: ``decide(situation, point, now, policy) -> Decision``. Pure, fail-closed.

Rules run in a fixed order (docs/reasons.md); the first that fails decides, and every rule
seen is recorded as a step so ``gatectl cache lookup`` can explain the decision:

  1. unknown        the code matches no ticket (or its product is missing)
  2. exit           an exit is always let out once the ticket is known (bookkeeping only)
  3. status         revoked / refunded
  4. blocklist      the ticket or its holder is blocked (until a time, or for good)
  5. clock          device clock earlier than the last time the cloud told us
  6. validity       not yet valid / expired
  7. time slot      outside the booked slot, with grace before and after
  8. zone           the lane's zone is not in the product
  9. entries        used up in this zone, today, or in total
 10. in use         another lane holds this ticket right now (two-phase passage)
 11. re-entry       never / only after an exit / only after N minutes
 12. anti-passback  already inside this zone
 13. capacity       the zone is full

The clock rule comes before every rule that reads the time: a clock that went backwards
would otherwise make expired tickets valid again.
"""

from __future__ import annotations

from verify.model import Decision, Point, Policy, Reason, Situation, Step, local_day

PROMPTS: dict[Reason, tuple[str, str]] = {
    Reason.OK: ("欢迎入园", "Welcome"),
    Reason.OK_EXIT: ("欢迎再次光临", "Goodbye, see you again"),
    Reason.BAD_CODE: ("无法识别, 请重新扫码", "Code not readable, please scan again"),
    Reason.BAD_SIGNATURE: ("电子票验证失败", "This e-ticket could not be verified"),
    Reason.CARD_INVALID: ("身份证无效或已过期", "ID card not valid or expired"),
    Reason.UNKNOWN: (
        "无效票, 请到售票处咨询",
        "Ticket not recognised, please ask at the ticket office",
    ),
    Reason.REVOKED: ("此票已作废", "This ticket has been cancelled"),
    Reason.REFUNDED: ("此票已退款", "This ticket has been refunded"),
    Reason.BLOCKED: (
        "此票不能使用, 请到服务台",
        "This ticket cannot be used, please go to the service desk",
    ),
    Reason.CLOCK_ERROR: ("设备时间异常, 请联系工作人员", "Gate clock error, please ask staff"),
    Reason.NOT_YET_VALID: ("此票尚未生效", "This ticket is not valid yet"),
    Reason.EXPIRED: ("此票已过期", "This ticket has expired"),
    Reason.TOO_EARLY: ("请在预约时段入园", "Please enter during your booked time slot"),
    Reason.TOO_LATE: ("预约时段已过", "Your booked time slot has passed"),
    Reason.WRONG_ZONE: ("此票不含本区域", "This ticket is not valid for this area"),
    Reason.ZONE_USED_UP: ("此票在本区域的次数已用完", "No entries left for this area"),
    Reason.DAILY_LIMIT: ("今日入园次数已用完", "No entries left for today"),
    Reason.TOTAL_LIMIT: ("此票次数已用完", "This ticket has been used up"),
    Reason.NO_REENTRY: ("此票不可再次入园", "Re-entry is not allowed with this ticket"),
    Reason.REENTRY_TOO_SOON: ("请稍后再入园", "Please wait before entering again"),
    Reason.ALREADY_INSIDE: ("此票已入园", "This ticket is already inside"),
    Reason.ZONE_FULL: ("区域已满, 请稍候", "This area is full, please wait"),
    Reason.IN_USE: ("此票正在使用中", "This ticket is being used at another lane"),
    Reason.ERROR: ("系统错误, 请联系工作人员", "System error, please ask staff"),
}


def _decision(
    allowed: bool,
    reason: Reason,
    situation: Situation,
    point: Point,
    steps: list[Step],
    remaining: int | None = None,
) -> Decision:
    zh, en = PROMPTS[reason]
    ticket = situation.ticket
    return Decision(
        allowed=allowed,
        reason=reason,
        ticket_id=ticket.id if ticket else None,
        zone=point.zone,
        remaining=remaining,
        prompt_zh=zh,
        prompt_en=en,
        steps=tuple(steps),
    )


def decide(situation: Situation, point: Point, now: float, policy: Policy) -> Decision:
    """Decide one credential at one point; any unexpected error refuses (fail closed)."""
    steps: list[Step] = []
    try:
        return _decide(situation, point, now, policy, steps)
    except Exception as exc:  # boundary: a rule that cannot be evaluated refuses
        steps.append(Step("error", False, type(exc).__name__))
        return _decision(False, Reason.ERROR, situation, point, steps)


def _decide(s: Situation, point: Point, now: float, policy: Policy, steps: list[Step]) -> Decision:
    def deny(rule: str, reason: Reason, detail: str = "") -> Decision:
        steps.append(Step(rule, False, detail or reason.value))
        return _decision(False, reason, s, point, steps)

    def ok(rule: str, detail: str = "") -> None:
        steps.append(Step(rule, True, detail))

    t, product = s.ticket, s.product
    if t is None:
        return deny("unknown", Reason.UNKNOWN, "no ticket with this code")
    if product is None or product.id != t.product_id:
        return deny("unknown", Reason.UNKNOWN, f"product {t.product_id!r} not in the cache")
    ok("unknown", f"ticket {t.id}, product {product.id}, channel {t.channel}")

    if point.direction == "exit":
        # Nobody is kept inside: a known ticket always gets out; the exit is bookkeeping
        # for re-entry and occupancy.
        ok("exit", "exits are always let out")
        return _decision(True, Reason.OK_EXIT, s, point, steps)

    if t.status == "revoked":
        return deny("status", Reason.REVOKED)
    if t.status == "refunded":
        return deny("status", Reason.REFUNDED)
    if t.status != "valid":
        # A status this version does not know (a sales channel's "unpaid", a broken import
        # row) must not admit: fail closed.
        return deny("status", Reason.ERROR, f"unknown status {t.status!r}")
    ok("status", t.status)

    for block in s.blocks:
        if block.until is not None and block.until <= now:
            continue
        hit = (block.kind == "ticket" and block.value == t.id) or (
            block.kind == "holder" and t.holder_hash is not None and block.value == t.holder_hash
        )
        if hit:
            return deny("blocklist", Reason.BLOCKED, f"{block.kind} blocked: {block.reason}")
    ok("blocklist")

    if s.cloud_time is not None and now < s.cloud_time - policy.clock_tolerance_s:
        return deny("clock", Reason.CLOCK_ERROR, f"device clock {s.cloud_time - now:.0f} s behind")
    ok("clock")

    if now < t.valid_from:
        return deny("validity", Reason.NOT_YET_VALID)
    if now > t.valid_to:
        return deny("validity", Reason.EXPIRED)
    ok("validity")

    before = (
        product.slot_grace_before_s
        if product.slot_grace_before_s is not None
        else policy.slot_grace_before_s
    )
    after = (
        product.slot_grace_after_s
        if product.slot_grace_after_s is not None
        else policy.slot_grace_after_s
    )
    if t.slot_start is not None and now < t.slot_start - before:
        return deny("slot", Reason.TOO_EARLY, f"slot opens in {t.slot_start - before - now:.0f} s")
    if t.slot_end is not None and now > t.slot_end + after:
        return deny("slot", Reason.TOO_LATE, f"slot closed {now - t.slot_end - after:.0f} s ago")
    ok("slot")

    if point.zone not in product.zones:
        return deny(
            "zone", Reason.WRONG_ZONE, f"zone {point.zone!r} not in {sorted(product.zones)}"
        )
    ok("zone", point.zone)

    u = s.usage
    today = local_day(now, policy.utc_offset_s)
    zone_limit = product.zones[point.zone]
    left: list[int] = []
    if zone_limit is not None:
        if u.entries >= zone_limit:
            return deny("entries", Reason.ZONE_USED_UP, f"{u.entries}/{zone_limit} in zone")
        left.append(zone_limit - u.entries)
    if t.max_entries_per_day is not None:
        if s.ticket_entries_today >= t.max_entries_per_day:
            return deny(
                "entries",
                Reason.DAILY_LIMIT,
                f"{s.ticket_entries_today}/{t.max_entries_per_day} today",
            )
        left.append(t.max_entries_per_day - s.ticket_entries_today)
    if t.max_entries_total is not None:
        if s.ticket_entries >= t.max_entries_total:
            return deny(
                "entries", Reason.TOTAL_LIMIT, f"{s.ticket_entries}/{t.max_entries_total} in total"
            )
        left.append(t.max_entries_total - s.ticket_entries)
    ok("entries", f"{u.entries} used in zone, {s.ticket_entries} in total")

    if s.held > 0:
        # Two lanes with one ticket at the same moment: one person is being let in already.
        return deny("in_use", Reason.IN_USE, f"{s.held} entry held at another lane")
    ok("in_use")

    reentry = product.reentry or policy.reentry
    if u.entries > 0:
        # A used zone whose last entry time is unknown (usage synced as counts only) can
        # prove neither an exit nor a wait: it refuses rather than skipping the rule.
        last = u.last_entry_at
        exited = last is not None and u.last_exit_at is not None and u.last_exit_at >= last
        if reentry.mode == "never":
            return deny("reentry", Reason.NO_REENTRY)
        if reentry.mode == "after_exit" and not exited:
            return deny("reentry", Reason.NO_REENTRY, "no exit since the last entry")
        if reentry.mode == "after_minutes":
            if last is None:
                return deny("reentry", Reason.REENTRY_TOO_SOON, "last entry time unknown")
            if now - last < reentry.minutes * 60:
                wait = reentry.minutes * 60 - (now - last)
                return deny("reentry", Reason.REENTRY_TOO_SOON, f"again in {wait:.0f} s")
    ok("reentry", reentry.mode)

    if policy.anti_passback and u.inside and u.day == today:
        return deny("anti_passback", Reason.ALREADY_INSIDE, f"entered at lane {u.last_lane}")
    ok("anti_passback")

    if s.capacity is not None and s.occupancy >= s.capacity:
        return deny("capacity", Reason.ZONE_FULL, f"{s.occupancy}/{s.capacity}")
    ok("capacity")

    remaining = min(left) - 1 if left else None
    return _decision(True, Reason.OK, s, point, steps, remaining)
