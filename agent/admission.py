"""Admission at the lane: credential -> decision -> reservation -> unlock -> commit or abort.

The rules decide on what the offline cache knows (``verify.rules``); an allowed entry is
reserved before the lane unlocks, so a second lane presenting the same ticket at the same
moment is refused; the passage the gate core reports commits the reservation (usage and
the passage event in one transaction), a relock with nobody through gives it back.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import asdict
from typing import Any, Protocol

from agent.gate.core import Direction
from verify.model import Decision, Point, Policy, Reason
from verify.rules import PROMPTS, decide
from verify.token import KeyRing, looks_like_token, verify_token

log = logging.getLogger(__name__)

MAX_CODE_BYTES = 4096


class Lane(Protocol):
    id: str

    def unlock(self, direction: Direction, auth: str) -> tuple[bool, str | None]:
        """Unlock for one passage; returns (accepted, refusal reason)."""


def _log_failed_commit(future: Future[Any]) -> None:
    exc = future.exception()
    if exc is not None:
        # The reservation stays held (counted as used) so the ticket cannot be reused; the
        # writer's own log says why the disk refused.
        log.error("passage commit failed: %s", type(exc).__name__)


def decision_dict(d: Decision) -> dict[str, Any]:
    out = asdict(d)
    out["reason"] = d.reason.value
    out["steps"] = [asdict(s) for s in d.steps]
    return out


def refusal(reason: Reason, point: Point) -> Decision:
    """A refusal decided before the rules engine (unreadable code, bad signature)."""
    zh, en = PROMPTS[reason]
    return Decision(False, reason, zone=point.zone, prompt_zh=zh, prompt_en=en)


class Admission:
    """Decides credentials for the lanes and keeps the two-phase passage bookkeeping."""

    def __init__(
        self,
        cache: Any,
        zones: Mapping[str, str],
        policy: Policy,
        keys: KeyRing | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.zones = dict(zones)
        self.policy = policy
        self.keys = keys or KeyRing()
        """Trusted token issuers; replaced whole when the cloud pushes new keys."""
        self._now = wall_clock
        self.counts: Counter[tuple[str, str]] = Counter()
        """Decisions per (lane, reason code) since start, for telemetry."""

    def point(self, lane_id: str, direction: str) -> Point:
        return Point(lane_id, self.zones[lane_id], "exit" if direction == "exit" else "entry")

    def lookup(self, code: str, point: Point) -> Decision:
        """Decide without admitting anyone (gatectl cache lookup)."""
        if len(code.encode("utf-8", "surrogatepass")) > MAX_CODE_BYTES:
            return refusal(Reason.BAD_CODE, point)
        now = self._now()
        if looks_like_token(code):
            # A token is never looked up as a plain code: its signature is the credential.
            token = verify_token(code, self.keys, now)
            if not token.ok or token.ticket is None or token.product is None:
                return refusal(token.reason or Reason.BAD_SIGNATURE, point)
            situation = self.cache.situation_for_ticket(token.ticket, token.product, point, now)
        else:
            situation = self.cache.situation(code, point, now)
        return decide(situation, point, now, self.policy)

    def present(self, lane: Lane, code: str, direction: str) -> tuple[Decision, str]:
        """A code (plain or signed) at a lane; returns the decision and what the lane did."""
        point = self.point(lane.id, direction)
        return self._admit(lane, point, self.lookup(code, point))

    def present_holder(
        self, lane: Lane, holder_hash: str, direction: str, card_problem: str | None
    ) -> tuple[Decision, str]:
        """An ID card at a lane: the holder's first real-name ticket the rules allow."""
        point = self.point(lane.id, direction)
        if card_problem is not None or not holder_hash:
            return self._admit(lane, point, refusal(Reason.CARD_INVALID, point))
        now = self._now()
        decisions = [
            decide(self.cache.situation_of(t, point, now), point, now, self.policy)
            for t in self.cache.holder_tickets(holder_hash)
        ]
        allowed = [d for d in decisions if d.allowed]
        if allowed:
            decision = allowed[0]
        elif decisions:
            decision = decisions[0]
        else:
            decision = refusal(Reason.UNKNOWN, point)
        return self._admit(lane, point, decision)

    def _admit(self, lane: Lane, point: Point, decision: Decision) -> tuple[Decision, str]:
        """Reserve an allowed entry, unlock the lane, or record the refusal."""
        reservation = self.cache.reserve(decision, point, self._now()) if decision.allowed else None
        if decision.allowed and reservation is None:
            zh, en = PROMPTS[Reason.IN_USE]
            decision = Decision(
                False, Reason.IN_USE, decision.ticket_id, point.zone, prompt_zh=zh, prompt_en=en
            )
        self.counts[lane.id, decision.reason.value] += 1
        if reservation is None:
            self.cache.append(
                "denied",
                lane.id,
                reason=decision.reason.value,
                ticket_id=decision.ticket_id,
                direction=point.direction,
            )
            log.info("lane %s: refused %s", lane.id, decision.reason.value)
            return decision, "refused"
        ok, refusal_reason = lane.unlock(Direction(point.direction), reservation.id)
        if not ok:
            self.cache.abort(reservation.id, refusal_reason or "refused")
            return decision, refusal_reason or "refused"
        return decision, "unlocked"

    def passed(self, auth: str | None, at: float) -> bool:
        """The lane reports a passage; True if it was one of our reservations."""
        if auth is None or not self.cache.holds(auth):
            return False
        future = self.cache.commit(auth, at)
        future.add_done_callback(_log_failed_commit)
        return True

    def not_passed(self, auth: str | None, reason: str) -> bool:
        """The lane relocked with nobody through; True if it was one of our reservations."""
        if auth is None or not self.cache.holds(auth):
            return False
        self.cache.abort(auth, reason)
        return True
