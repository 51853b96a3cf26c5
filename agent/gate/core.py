"""The gate safety core: one lane's state machine, pure and small.

``step(state, event, now, timing) -> (state, actions)``. No I/O, no clock, no vendor
imports: the lane runner feeds it sensor snapshots, ticks, requests and link changes and
carries out the actions it returns (drive the outputs, report an event).

Safety rules that hold in every transition:
- no close command (unlock outputs going from open to closed) while anyone is in the lane
  (either passage beam or the obstruction sensor active): the lane stays open and alarms
  until it is clear;
- anyone entering while the barrier is still closing (close_time_s after a close command,
  whatever the mode, an alarm included) reopens it;
- an emergency opens the lane whatever else is going on and stays latched until reset;
- a lost link puts the lane in fault; on its return the configured fail state is commanded
  first, then normal service resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Literal


class Direction(StrEnum):
    ENTRY = "entry"
    EXIT = "exit"


class Mode(StrEnum):
    LOCKED = "locked"
    UNLOCKED = "unlocked"
    PASSING = "passing"
    CLOSING = "closing"
    OBSTRUCTED = "obstructed"
    ALARM = "alarm"
    EMERGENCY = "emergency_open"
    FAULT = "fault"
    HELD_OPEN = "held_open"
    LOCKED_OUT = "locked_out"


class Maintenance(StrEnum):
    NONE = "none"
    HELD_OPEN = "held_open"
    LOCKED_OUT = "locked_out"


class Kind(StrEnum):
    """Stable event kinds, shared by logs, the event store and (later) the cloud."""

    UNLOCKED = "unlocked"
    UNLOCK_REFUSED = "unlock_refused"
    PASSAGE = "passage"
    NOT_PASSED = "not_passed"
    FREE_PASSAGE = "free_passage"
    TAILGATING = "tailgating"
    FORCED_PASSAGE = "forced_passage"
    OBSTRUCTION = "obstruction"
    OBSTRUCTION_CLEARED = "obstruction_cleared"
    LOITERING = "loitering"
    EMERGENCY_OPEN = "emergency_open"
    EMERGENCY_RESET = "emergency_reset"
    LINK_LOST = "link_lost"
    LINK_RESTORED = "link_restored"
    HELD_OPEN = "held_open"
    HOLD_RELEASED = "hold_released"
    LOCKED_OUT = "locked_out"
    LOCKOUT_RELEASED = "lockout_released"


ALARM_KINDS = frozenset(
    {Kind.TAILGATING, Kind.FORCED_PASSAGE, Kind.OBSTRUCTION, Kind.LOITERING, Kind.LINK_LOST}
)


@dataclass(frozen=True)
class Sensors:
    """Active/inactive of the lane's inputs (polarity already applied)."""

    entry_side: bool = False
    exit_side: bool = False
    obstruction: bool = False

    @property
    def beams(self) -> bool:
        return self.entry_side or self.exit_side

    @property
    def occupied(self) -> bool:
        """Someone (or something) is in the lane: closing now could hit them."""
        return self.entry_side or self.exit_side or self.obstruction

    def near(self, direction: Direction) -> bool:
        return self.entry_side if direction is Direction.ENTRY else self.exit_side

    def far(self, direction: Direction) -> bool:
        return self.exit_side if direction is Direction.ENTRY else self.entry_side


@dataclass(frozen=True)
class Outputs:
    unlock_entry: bool = False
    unlock_exit: bool = False
    alarm: bool = False

    @property
    def is_open(self) -> bool:
        return self.unlock_entry or self.unlock_exit


CLOSED = Outputs()
OPEN = Outputs(unlock_entry=True, unlock_exit=True)
OPEN_ALARM = Outputs(unlock_entry=True, unlock_exit=True, alarm=True)
CLOSED_ALARM = Outputs(alarm=True)


def unlock_outputs(direction: Direction) -> Outputs:
    return Outputs(
        unlock_entry=direction is Direction.ENTRY, unlock_exit=direction is Direction.EXIT
    )


@dataclass(frozen=True)
class Timing:
    """Per-lane timings and the site's decision for link loss."""

    unlock_timeout_s: float = 8.0
    passage_timeout_s: float = 10.0
    close_time_s: float = 1.0
    alarm_s: float = 3.0
    fail_state: Literal["open", "locked"] = "locked"

    @property
    def fail_outputs(self) -> Outputs:
        return OPEN if self.fail_state == "open" else CLOSED


@dataclass(frozen=True)
class Track:
    """Progress of bodies through the two passage beams, from clear to clear."""

    started: bool = False
    first: Direction | None = None
    far_seen: bool = False
    """The far beam was reached by the body now passing."""
    returned: bool = False
    """Only the near beam is broken again after the far beam was reached: either a second
    person is at the entrance as the first one left, or the first one walked back."""
    bodies: int = 1
    """People in this run of broken beams (tight tailgating never lets them clear)."""


@dataclass(frozen=True)
class LaneState:
    mode: Mode = Mode.FAULT
    outputs: Outputs = CLOSED
    sensors: Sensors = Sensors()
    track: Track = Track()
    direction: Direction | None = None
    """Unlocked direction (unlocked/passing) or the direction of the last passage (closing)."""
    auth: str | None = None
    """The authorisation the lane is open for; given back as not_passed if nobody goes."""
    deadline: float | None = None
    unlock_deadline: float | None = None
    closing_until: float | None = None
    """The barrier may still be moving closed until then, whatever the mode (an alarm raised
    as the lane closes does not stop the motion): anyone entering before then reopens it."""
    emergency: bool = False
    maintenance: Maintenance = Maintenance.NONE


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SensorsChanged:
    sensors: Sensors


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class Unlock:
    direction: Direction
    auth: str


@dataclass(frozen=True)
class EmergencyOn:
    source: str


@dataclass(frozen=True)
class EmergencyReset:
    pass


@dataclass(frozen=True)
class LinkLost:
    pass


@dataclass(frozen=True)
class LinkRestored:
    sensors: Sensors


@dataclass(frozen=True)
class HoldOpen:
    on: bool


@dataclass(frozen=True)
class Lockout:
    on: bool


Event = (
    SensorsChanged
    | Tick
    | Unlock
    | EmergencyOn
    | EmergencyReset
    | LinkLost
    | LinkRestored
    | HoldOpen
    | Lockout
)

# --- actions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Drive:
    outputs: Outputs


@dataclass(frozen=True)
class Report:
    kind: Kind
    direction: Direction | None = None
    auth: str | None = None
    reason: str | None = None


Action = Drive | Report
Result = tuple[LaneState, list[Action]]


# --- transitions ------------------------------------------------------------------------


def _drive(
    state: LaneState, outputs: Outputs, actions: list[Action], force: bool = False
) -> LaneState:
    if force or outputs != state.outputs:
        actions.append(Drive(outputs))
    return replace(state, outputs=outputs)


def _rest_mode(state: LaneState) -> Mode:
    if state.maintenance is Maintenance.LOCKED_OUT:
        return Mode.LOCKED_OUT
    return Mode.LOCKED


def _give_back(state: LaneState, actions: list[Action], reason: str) -> LaneState:
    """Report an authorisation nobody used, so the entry can be given back."""
    if state.auth is not None and state.mode in (Mode.UNLOCKED, Mode.PASSING, Mode.OBSTRUCTED):
        actions.append(
            Report(Kind.NOT_PASSED, direction=state.direction, auth=state.auth, reason=reason)
        )
    return replace(state, auth=None, unlock_deadline=None)


def _close(state: LaneState, now: float, t: Timing, actions: list[Action]) -> LaneState:
    """Close the lane, unless someone is in it: then hold it open and alarm until clear."""
    if state.sensors.occupied:
        if state.mode is not Mode.OBSTRUCTED:
            actions.append(Report(Kind.OBSTRUCTION, direction=state.direction))
        state = _drive(state, OPEN_ALARM, actions)
        return replace(state, mode=Mode.OBSTRUCTED, deadline=None)
    state = _drive(state, CLOSED, actions)
    done = now + t.close_time_s
    return replace(state, mode=Mode.CLOSING, deadline=done, closing_until=done)


def _still_closing(state: LaneState, now: float) -> bool:
    """Whether the barrier may still be moving closed, so that a body entering must reopen it."""
    if state.mode is Mode.CLOSING:
        return True
    return (
        not state.outputs.is_open and state.closing_until is not None and now < state.closing_until
    )


def _alarm(
    state: LaneState,
    kind: Kind,
    direction: Direction | None,
    now: float,
    t: Timing,
    actions: list[Action],
) -> LaneState:
    actions.append(Report(kind, direction=direction))
    state = _give_back(state, actions, reason=kind.value)
    if state.outputs.is_open:
        # An alarm never closes on a body: a lane that is open goes through the close guard.
        state = replace(state, direction=direction)
        state = _close(state, now, t, actions)
        if state.mode is Mode.OBSTRUCTED:
            return state
    state = _drive(state, CLOSED_ALARM, actions)
    return replace(state, mode=Mode.ALARM, deadline=now + t.alarm_s, direction=direction)


def _resume(state: LaneState, now: float, t: Timing, actions: list[Action]) -> LaneState:
    """Normal service after emergency, fault or maintenance: held open, or closed."""
    if state.maintenance is Maintenance.HELD_OPEN:
        state = _drive(state, OPEN, actions)
        return replace(state, mode=Mode.HELD_OPEN, deadline=None, direction=None)
    if state.outputs.is_open:
        return _close(replace(state, direction=None), now, t, actions)
    state = _drive(state, CLOSED, actions)
    return replace(state, mode=_rest_mode(state), deadline=None, direction=None)


def _advance_track(
    track: Track, old: Sensors, new: Sensors
) -> tuple[Track, Direction | None, int, bool]:
    """Follow the beams; return (track, completed direction, bodies, backed out)."""
    if not track.started:
        if not new.beams:
            return track, None, 0, False
        if new.entry_side and not new.exit_side:
            return Track(True, Direction.ENTRY), None, 0, False
        if new.exit_side and not new.entry_side:
            return Track(True, Direction.EXIT), None, 0, False
        return Track(True, None), None, 0, False
    first = track.first
    if new.beams:
        if first is None:
            return track, None, 0, False
        bodies, far_seen, returned = track.bodies, track.far_seen, track.returned
        if far_seen and new.near(first) and not new.far(first):
            far_seen, returned = False, True
        if new.far(first):
            if returned:
                # Someone reached the far beam again after the near beam was alone: two
                # people, the first of whom left as the second came in. A visitor who only
                # steps back from the far beam never leaves the near beam alone.
                bodies, returned = bodies + 1, False
            far_seen = True
        track = replace(track, far_seen=far_seen, returned=returned, bodies=bodies)
        return track, None, 0, False
    # All beams clear: complete only if the far beam was the last one seen.
    if first is not None and old.far(first):
        return Track(), first, track.bodies, False
    return Track(), None, 0, first is not None


def _on_passage(
    state: LaneState, d: Direction, now: float, t: Timing, actions: list[Action]
) -> LaneState:
    mode = state.mode
    if mode in (Mode.HELD_OPEN, Mode.EMERGENCY):
        actions.append(Report(Kind.FREE_PASSAGE, direction=d, reason=mode.value))
        return state
    if mode is Mode.OBSTRUCTED and state.direction is None and state.auth is None:
        # Held open while closing after an emergency or a hold: people clearing the lane
        # are no intruders.
        actions.append(Report(Kind.FREE_PASSAGE, direction=d, reason="clearing"))
        return state
    authorised = (
        mode in (Mode.UNLOCKED, Mode.PASSING, Mode.OBSTRUCTED)
        and state.auth is not None
        and state.direction is d
    )
    if authorised:
        actions.append(Report(Kind.PASSAGE, direction=d, auth=state.auth))
        state = replace(state, auth=None, unlock_deadline=None, direction=d)
        return _close(state, now, t, actions)
    if mode in (Mode.CLOSING, Mode.OBSTRUCTED) and state.direction is d:
        return _alarm(state, Kind.TAILGATING, d, now, t, actions)
    return _alarm(state, Kind.FORCED_PASSAGE, d, now, t, actions)


def _on_sensors(
    state: LaneState, sensors: Sensors, now: float, t: Timing, actions: list[Action]
) -> LaneState:
    if state.mode is Mode.FAULT:
        return state
    old = state.sensors
    was_started = state.track.started
    track, completed, bodies, backed_out = _advance_track(state.track, old, sensors)
    state = replace(state, sensors=sensors, track=track)
    if completed is not None:
        for _ in range(bodies):
            state = _on_passage(state, completed, now, t, actions)
    elif backed_out and state.mode is Mode.PASSING:
        state = replace(state, mode=Mode.UNLOCKED, deadline=state.unlock_deadline)
    elif (
        state.mode is Mode.UNLOCKED
        and track.started
        and not was_started
        and track.first is state.direction
    ):
        state = replace(state, mode=Mode.PASSING, deadline=now + t.passage_timeout_s)
    if sensors.occupied and _still_closing(state, now):
        return _close(state, now, t, actions)
    if state.mode is Mode.OBSTRUCTED and not sensors.occupied:
        if state.auth is not None:
            # The authorised visitor backed out while held open: give the entry back.
            state = _give_back(state, actions, reason="backed_out")
        actions.append(Report(Kind.OBSTRUCTION_CLEARED, direction=state.direction))
        return _close(state, now, t, actions)
    return state


def _on_tick(state: LaneState, now: float, t: Timing, actions: list[Action]) -> LaneState:
    if state.deadline is None or now < state.deadline:
        return state
    mode = state.mode
    if mode is Mode.UNLOCKED:
        state = _give_back(state, actions, reason="timeout")
        return _close(state, now, t, actions)
    if mode is Mode.PASSING:
        # Someone is still in the lane after the passage time: never close on them; keep
        # the authorisation so a slow visitor still counts when they come out the far side.
        actions.append(Report(Kind.LOITERING, direction=state.direction, auth=state.auth))
        return _close(replace(state, deadline=None), now, t, actions)
    if mode is Mode.CLOSING:
        return replace(state, mode=_rest_mode(state), deadline=None, direction=None)
    if mode is Mode.ALARM:
        state = _drive(state, CLOSED, actions)
        return replace(state, mode=_rest_mode(state), deadline=None, direction=None)
    return replace(state, deadline=None)


_REFUSAL = {
    Mode.UNLOCKED: "lane_busy",
    Mode.PASSING: "lane_busy",
    Mode.OBSTRUCTED: "lane_obstructed",
    Mode.ALARM: "lane_alarm",
    Mode.EMERGENCY: "emergency_open",
    Mode.FAULT: "lane_fault",
    Mode.HELD_OPEN: "lane_held_open",
    Mode.LOCKED_OUT: "lane_locked_out",
}


def refusal_reason(state: LaneState) -> str | None:
    """Why an unlock would be refused now, or None if it would be accepted."""
    # A visitor often steps into the lane before presenting a credential, so a body at
    # the entrance beam does not block an unlock of a locked lane.
    if state.mode in (Mode.LOCKED, Mode.CLOSING):
        # A lockout given while the lane was closing takes effect when it is closed; it
        # must refuse unlocks already.
        if state.maintenance is Maintenance.LOCKED_OUT:
            return _REFUSAL[Mode.LOCKED_OUT]
        return None
    return _REFUSAL[state.mode]


def _on_unlock(
    state: LaneState, ev: Unlock, now: float, t: Timing, actions: list[Action]
) -> LaneState:
    reason = refusal_reason(state)
    if reason is not None:
        actions.append(
            Report(Kind.UNLOCK_REFUSED, direction=ev.direction, auth=ev.auth, reason=reason)
        )
        return state
    state = _drive(state, unlock_outputs(ev.direction), actions)
    actions.append(Report(Kind.UNLOCKED, direction=ev.direction, auth=ev.auth))
    deadline = now + t.unlock_timeout_s
    state = replace(
        state,
        mode=Mode.UNLOCKED,
        direction=ev.direction,
        auth=ev.auth,
        deadline=deadline,
        unlock_deadline=deadline,
    )
    if state.track.started and state.track.first is ev.direction:
        # The visitor is already standing in the entrance beam.
        return replace(state, mode=Mode.PASSING, deadline=now + t.passage_timeout_s)
    return state


def _on_emergency(state: LaneState, ev: EmergencyOn, actions: list[Action]) -> LaneState:
    first = not state.emergency
    state = _give_back(state, actions, reason="emergency")
    state = replace(state, emergency=True)
    if first:
        actions.append(Report(Kind.EMERGENCY_OPEN, reason=ev.source))
    if state.mode is Mode.FAULT:
        return state
    state = _drive(state, OPEN, actions)
    return replace(state, mode=Mode.EMERGENCY, deadline=None, direction=None, track=Track())


def _on_reset(state: LaneState, now: float, t: Timing, actions: list[Action]) -> LaneState:
    if not state.emergency:
        return state
    actions.append(Report(Kind.EMERGENCY_RESET))
    state = replace(state, emergency=False)
    if state.mode is Mode.FAULT:
        return state
    return _resume(state, now, t, actions)


def _on_link_lost(state: LaneState, actions: list[Action]) -> LaneState:
    if state.mode is Mode.FAULT:
        return state
    actions.append(Report(Kind.LINK_LOST))
    state = _give_back(state, actions, reason="link_lost")
    return replace(
        state, mode=Mode.FAULT, deadline=None, direction=None, sensors=Sensors(), track=Track()
    )


def _on_link_restored(
    state: LaneState, ev: LinkRestored, now: float, t: Timing, actions: list[Action]
) -> LaneState:
    if state.mode is not Mode.FAULT:
        return state
    actions.append(Report(Kind.LINK_RESTORED))
    state = replace(state, sensors=ev.sensors, track=Track())
    if state.emergency:
        state = _drive(state, OPEN, actions, force=True)
        return replace(state, mode=Mode.EMERGENCY)
    # The board's own state after an outage is unknown: command the site's fail state first
    # (what its watchdog should have done), then resume normal service from there. A lane
    # that fails locked but has someone in it is commanded open instead: the board may have
    # kept its last (open) outputs, and we never close on a body. Resuming from open then
    # goes through the close guard, or back to held open.
    fail = OPEN if ev.sensors.occupied else t.fail_outputs
    if state.outputs.is_open and not fail.is_open:
        # If the board did keep our last (open) outputs, this command starts a close.
        state = replace(state, closing_until=now + t.close_time_s)
    state = _drive(state, fail, actions, force=True)
    return _resume(state, now, t, actions)


def _on_hold_open(
    state: LaneState, ev: HoldOpen, now: float, t: Timing, actions: list[Action]
) -> LaneState:
    if ev.on:
        if state.maintenance is Maintenance.HELD_OPEN:
            return state
        actions.append(Report(Kind.HELD_OPEN))
        state = replace(state, maintenance=Maintenance.HELD_OPEN)
        if state.mode in (Mode.FAULT, Mode.EMERGENCY):
            return state
        state = _give_back(state, actions, reason="held_open")
        state = _drive(state, OPEN, actions)
        return replace(state, mode=Mode.HELD_OPEN, deadline=None, direction=None)
    if state.maintenance is not Maintenance.HELD_OPEN:
        return state
    actions.append(Report(Kind.HOLD_RELEASED))
    state = replace(state, maintenance=Maintenance.NONE)
    if state.mode is Mode.HELD_OPEN:
        return _close(state, now, t, actions)
    return state


def _on_lockout(
    state: LaneState, ev: Lockout, now: float, t: Timing, actions: list[Action]
) -> LaneState:
    if ev.on:
        if state.maintenance is Maintenance.LOCKED_OUT:
            return state
        actions.append(Report(Kind.LOCKED_OUT))
        state = replace(state, maintenance=Maintenance.LOCKED_OUT)
        if state.mode in (Mode.FAULT, Mode.EMERGENCY, Mode.ALARM, Mode.CLOSING, Mode.OBSTRUCTED):
            return state
        if state.mode is Mode.LOCKED:
            return replace(state, mode=Mode.LOCKED_OUT)
        state = _give_back(state, actions, reason="locked_out")
        return _close(state, now, t, actions)
    if state.maintenance is not Maintenance.LOCKED_OUT:
        return state
    actions.append(Report(Kind.LOCKOUT_RELEASED))
    state = replace(state, maintenance=Maintenance.NONE)
    if state.mode is Mode.LOCKED_OUT:
        return replace(state, mode=Mode.LOCKED)
    return state


def step(state: LaneState, event: Event, now: float, timing: Timing) -> Result:
    """Advance one lane by one event at monotonic time ``now``."""
    actions: list[Action] = []
    match event:
        case SensorsChanged(sensors):
            if state.mode is Mode.EMERGENCY:
                state = _on_emergency_sensors(state, sensors, actions)
            else:
                state = _on_sensors(state, sensors, now, timing, actions)
        case Tick():
            state = _on_tick(state, now, timing, actions)
        case Unlock():
            state = _on_unlock(state, event, now, timing, actions)
        case EmergencyOn():
            state = _on_emergency(state, event, actions)
        case EmergencyReset():
            state = _on_reset(state, now, timing, actions)
        case LinkLost():
            state = _on_link_lost(state, actions)
        case LinkRestored():
            state = _on_link_restored(state, event, now, timing, actions)
        case HoldOpen():
            state = _on_hold_open(state, event, now, timing, actions)
        case Lockout():
            state = _on_lockout(state, event, now, timing, actions)
    return state, actions


def _on_emergency_sensors(state: LaneState, sensors: Sensors, actions: list[Action]) -> LaneState:
    """During an emergency only count people; nothing may change the open outputs."""
    track, completed, bodies, _ = _advance_track(state.track, state.sensors, sensors)
    for _ in range(bodies if completed is not None else 0):
        actions.append(Report(Kind.FREE_PASSAGE, direction=completed, reason=Mode.EMERGENCY.value))
    return replace(state, sensors=sensors, track=track)


def shutdown_outputs(state: LaneState, timing: Timing) -> Outputs:
    """What to leave a lane in when the daemon stops: open in an emergency, else the
    site's fail state, but never closed on someone still in the lane."""
    if state.emergency or timing.fail_state == "open":
        return OPEN
    if state.sensors.occupied and state.outputs.is_open:
        return state.outputs
    return CLOSED
