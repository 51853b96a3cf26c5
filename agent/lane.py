"""Lane runner: one per lane. Owns the lane's core state and carries out its actions.

Drive actions become coil writes on the lane's board (non-blocking: the bus owner writes
them at once); reports go to the event store and the log. The runner's own task only
ticks the lane's timers; sensors and safety events arrive from the safety monitor and
requests from the control socket, all on the same event loop, so steps never interleave.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from agent.config import LaneIO
from agent.gate.core import (
    ALARM_KINDS,
    Direction,
    Drive,
    Event,
    Kind,
    LaneState,
    Outputs,
    Report,
    Sensors,
    Tick,
    Timing,
    Unlock,
    step,
)
from drivers.base import BoardOutputs

log = logging.getLogger(__name__)

EventSink = Callable[..., Any]
"""``sink(kind, lane, **data)``: the event store's append (never blocks)."""

TICK_S = 0.02


class LaneRunner:
    def __init__(
        self,
        lane_id: str,
        io: LaneIO,
        timing: Timing,
        outputs: BoardOutputs,
        sink: EventSink,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.id = lane_id
        self.board = io.board
        self.io = io
        self.timing = timing
        self.state = LaneState()
        self.counts: Counter[str] = Counter()
        self.settle: Callable[[Report], bool] | None = None
        """Settles the two-phase passage of a ticket: returns True if it recorded the report."""
        self._outputs = outputs
        self._sink = sink
        self._clock = clock

    def sensors_from(self, levels: Mapping[int, bool]) -> Sensors:
        io = self.io
        return Sensors(
            entry_side=io.entry_side.is_active(levels),
            exit_side=io.exit_side.is_active(levels),
            obstruction=io.obstruction.is_active(levels) if io.obstruction else False,
        )

    def handle(self, event: Event) -> list[Report]:
        """Step the core with one event; drive outputs and record reports."""
        self.state, actions = step(self.state, event, self._clock(), self.timing)
        reports = []
        for action in actions:
            if isinstance(action, Drive):
                self.drive(action.outputs)
            else:
                reports.append(action)
                self._report(action)
        return reports

    def drive(self, o: Outputs) -> None:
        """Write a set of lane outputs to the lane's coils."""
        io = self.io
        coils = {io.unlock_entry: o.unlock_entry}
        if io.unlock_exit is not None:
            coils[io.unlock_exit] = o.unlock_exit
        if io.alarm is not None:
            coils[io.alarm] = o.alarm
        self._outputs.set_coils(coils)

    def _report(self, r: Report) -> None:
        self.counts[r.kind.value] += 1
        data: dict[str, Any] = {}
        if r.direction is not None:
            data["direction"] = r.direction.value
        if r.auth is not None:
            data["auth"] = r.auth
        if r.reason is not None:
            data["reason"] = r.reason
        # A passage or give-back of a ticket reservation is written by the cache, in the
        # same transaction as the ticket's usage; everything else goes to the event store.
        handled = self.settle is not None and self.settle(r)
        if not handled:
            self._sink(r.kind.value, self.id, **data)
        level = logging.WARNING if r.kind in ALARM_KINDS else logging.INFO
        log.log(
            level,
            "lane %s: %s %s",
            self.id,
            r.kind.value,
            " ".join(f"{k}={v}" for k, v in data.items() if k != "auth"),
        )

    def unlock(self, direction: Direction, auth: str) -> tuple[bool, str | None]:
        """Authorised unlock; returns (accepted, refusal reason)."""
        if direction is Direction.EXIT and self.io.unlock_exit is None:
            self._sink(
                Kind.UNLOCK_REFUSED.value,
                self.id,
                direction=direction.value,
                auth=auth,
                reason="direction_not_wired",
            )
            return False, "direction_not_wired"
        for r in self.handle(Unlock(direction, auth)):
            if r.kind is Kind.UNLOCKED:
                return True, None
            if r.kind is Kind.UNLOCK_REFUSED:
                return False, r.reason
        return False, "not_unlocked"

    def status(self) -> dict[str, Any]:
        s, now = self.state, self._clock()
        return {
            "lane": self.id,
            "board": self.board,
            "mode": s.mode.value,
            "direction": s.direction.value if s.direction else None,
            "emergency": s.emergency,
            "maintenance": s.maintenance.value,
            "deadline_in_s": round(s.deadline - now, 2) if s.deadline is not None else None,
            "outputs": {
                "unlock_entry": s.outputs.unlock_entry,
                "unlock_exit": s.outputs.unlock_exit,
                "alarm": s.outputs.alarm,
            },
            "sensors": {
                "entry_side": s.sensors.entry_side,
                "exit_side": s.sensors.exit_side,
                "obstruction": s.sensors.obstruction,
            },
            "fail_state": self.timing.fail_state,
            "counts": dict(self.counts),
        }

    async def run(self) -> None:
        """Tick the lane's timers until cancelled."""
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.handle(Tick())
            except Exception:
                log.exception("lane %s: tick failed", self.id)
