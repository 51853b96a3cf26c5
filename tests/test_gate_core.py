"""The gate safety core, transition by transition, then as short stories.

The table walks every mode through every kind of event, the forbidden ones included: each
row names a start state (built by feeding the core a short history), the event and its
time, and what must come out: the mode, the outputs driven and the events reported.

Default timing: unlock 8 s, passage 10 s, close 1 s, alarm 3 s, fails locked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from agent.gate.core import (
    CLOSED,
    CLOSED_ALARM,
    OPEN,
    OPEN_ALARM,
    Action,
    Direction,
    Drive,
    EmergencyOn,
    EmergencyReset,
    Event,
    HoldOpen,
    Kind,
    LaneState,
    LinkLost,
    LinkRestored,
    Lockout,
    Mode,
    Outputs,
    Report,
    Sensors,
    SensorsChanged,
    Tick,
    Timing,
    Unlock,
    shutdown_outputs,
    step,
)

ENTRY = Direction.ENTRY
EXIT = Direction.EXIT

T = Timing()
T_OPEN = Timing(fail_state="open")

CLEAR = Sensors()
AT_ENTRY = Sensors(entry_side=True)
AT_EXIT = Sensors(exit_side=True)
BOTH = Sensors(entry_side=True, exit_side=True)
OBSTRUCTION = Sensors(obstruction=True)

UNLOCK_ENTRY = Outputs(unlock_entry=True)
UNLOCK_EXIT = Outputs(unlock_exit=True)

History = list[tuple[float, Event]]


def seen(*snapshots: tuple[float, Sensors]) -> History:
    return [(at, SensorsChanged(s)) for at, s in snapshots]


def drives(actions: Sequence[Action]) -> list[Outputs]:
    return [a.outputs for a in actions if isinstance(a, Drive)]


def reports(actions: Sequence[Action]) -> list[Report]:
    return [a for a in actions if isinstance(a, Report)]


def feed(history: History, timing: Timing = T) -> LaneState:
    """The lane after a history of events, starting from boot (fault, link not yet up)."""
    state = LaneState()
    for at, event in history:
        state, _ = step(state, event, at, timing)
    return state


def assert_never_closed_on_someone(before: LaneState, after: LaneState, out: list[Action]) -> None:
    previous = before.outputs
    for outputs in drives(out):
        if previous.is_open and not outputs.is_open:
            assert not after.sensors.occupied, f"closed on someone: {after}"
        previous = outputs


# Start states, each as the history that leads to it.
LOCKED: History = [(0, LinkRestored(CLEAR))]
UNLOCKED: History = [*LOCKED, (0, Unlock(ENTRY, "A"))]
PASSING: History = [*UNLOCKED, *seen((1, AT_ENTRY))]
PASSING_AT_EXIT: History = [*PASSING, *seen((2, BOTH), (3, AT_EXIT))]
CLOSING: History = [*PASSING_AT_EXIT, *seen((4, CLEAR))]
OBSTRUCTED: History = [*CLOSING, *seen((4.5, AT_ENTRY))]
LOITERING: History = [*PASSING, (11, Tick())]
ALARM: History = [*LOCKED, *seen((1, AT_ENTRY), (2, BOTH), (3, AT_EXIT), (4, CLEAR))]
EMERGENCY: History = [*LOCKED, (0, EmergencyOn("fire"))]
FAULT: History = [*LOCKED, (0, LinkLost())]
HELD_OPEN: History = [*LOCKED, (0, HoldOpen(True))]
LOCKED_OUT: History = [*LOCKED, (0, Lockout(True))]

START: dict[str, tuple[Mode, History]] = {
    "boot": (Mode.FAULT, []),
    "locked": (Mode.LOCKED, LOCKED),
    "locked_someone_at_entry": (Mode.LOCKED, [*LOCKED, *seen((0.5, AT_ENTRY))]),
    "locked_someone_at_exit": (
        Mode.LOCKED,
        [*LOCKED, *seen((1, AT_ENTRY), (2, BOTH), (3, AT_EXIT))],
    ),
    "unlocked": (Mode.UNLOCKED, UNLOCKED),
    "unlocked_obstruction": (Mode.UNLOCKED, [*UNLOCKED, *seen((1, OBSTRUCTION))]),
    "unlocked_wrong_way_at_entry": (
        Mode.UNLOCKED,
        [*UNLOCKED, *seen((1, AT_EXIT), (2, BOTH), (3, AT_ENTRY))],
    ),
    "passing": (Mode.PASSING, PASSING),
    "passing_at_exit": (Mode.PASSING, PASSING_AT_EXIT),
    "closing": (Mode.CLOSING, CLOSING),
    "closing_locked_out": (Mode.CLOSING, [*CLOSING, (4.2, Lockout(True))]),
    "obstructed": (Mode.OBSTRUCTED, OBSTRUCTED),
    "obstructed_at_exit": (Mode.OBSTRUCTED, [*OBSTRUCTED, *seen((5, BOTH), (5.5, AT_EXIT))]),
    "loitering": (Mode.OBSTRUCTED, LOITERING),
    "loitering_at_exit": (Mode.OBSTRUCTED, [*LOITERING, *seen((12, BOTH), (13, AT_EXIT))]),
    "alarm": (Mode.ALARM, ALARM),
    "alarm_someone_at_exit": (
        Mode.ALARM,
        [*ALARM, *seen((5, AT_ENTRY), (5.5, BOTH), (6, AT_EXIT))],
    ),
    "alarm_locked_out": (Mode.ALARM, [*ALARM, (5, Lockout(True))]),
    # A wrong-way passage through a lane unlocked for entry: the alarm closes an open lane.
    "alarm_closing": (
        Mode.ALARM,
        [*UNLOCKED, *seen((1, AT_EXIT), (2, BOTH), (3, AT_ENTRY), (4, CLEAR))],
    ),
    "emergency": (Mode.EMERGENCY, EMERGENCY),
    "emergency_occupied": (Mode.EMERGENCY, [*EMERGENCY, *seen((1, AT_ENTRY))]),
    "emergency_someone_at_exit": (
        Mode.EMERGENCY,
        [*EMERGENCY, *seen((1, AT_ENTRY), (2, BOTH), (3, AT_EXIT))],
    ),
    "emergency_held_open": (Mode.EMERGENCY, [*EMERGENCY, (0.5, HoldOpen(True))]),
    "emergency_locked_out": (Mode.EMERGENCY, [*EMERGENCY, (0.5, Lockout(True))]),
    "fault": (Mode.FAULT, FAULT),
    "fault_emergency": (Mode.FAULT, [*FAULT, (0.5, EmergencyOn("fire"))]),
    "fault_held_open": (Mode.FAULT, [*FAULT, (0.5, HoldOpen(True))]),
    "fault_locked_out": (Mode.FAULT, [*FAULT, (0.5, Lockout(True))]),
    "fault_while_unlocked": (Mode.FAULT, [*UNLOCKED, (1, LinkLost())]),
    "held_open": (Mode.HELD_OPEN, HELD_OPEN),
    "held_open_occupied": (Mode.HELD_OPEN, [*HELD_OPEN, *seen((1, AT_ENTRY))]),
    "held_open_someone_at_exit": (
        Mode.HELD_OPEN,
        [*HELD_OPEN, *seen((1, AT_ENTRY), (2, BOTH), (3, AT_EXIT))],
    ),
    "locked_out": (Mode.LOCKED_OUT, LOCKED_OUT),
    "locked_out_someone_at_exit": (
        Mode.LOCKED_OUT,
        [*LOCKED_OUT, *seen((1, AT_ENTRY), (2, BOTH), (3, AT_EXIT))],
    ),
}


@dataclass(frozen=True)
class Row:
    start: str
    event: Event
    now: float
    mode: Mode
    drives: list[Outputs] = field(default_factory=list)
    reports: list[Report] = field(default_factory=list)
    timing: Timing = T
    unchanged: bool = False
    """The event must leave the state exactly as it was."""


def row(
    name: str,
    start: str,
    event: Event,
    now: float,
    mode: Mode,
    drives: Sequence[Outputs] = (),
    reports: Sequence[Report] = (),
    *,
    timing: Timing = T,
    unchanged: bool = False,
) -> pytest.ParameterSet:
    return pytest.param(
        Row(start, event, now, mode, list(drives), list(reports), timing, unchanged),
        id=f"{start}-{name}",
    )


def nothing(name: str, start: str, event: Event, now: float, mode: Mode) -> pytest.ParameterSet:
    """A row where the event is ignored: no outputs, no reports, no state change."""
    return row(name, start, event, now, mode, unchanged=True)


def refused(start: str, mode: Mode, reason: str, now: float = 1) -> pytest.ParameterSet:
    event = Unlock(EXIT, "B")
    return row(
        "unlock_refused",
        start,
        event,
        now,
        mode,
        reports=[Report(Kind.UNLOCK_REFUSED, EXIT, "B", reason)],
        unchanged=True,
    )


def given_back(reason: str, auth: str = "A", direction: Direction = ENTRY) -> Report:
    return Report(Kind.NOT_PASSED, direction, auth, reason)


R = Report
K = Kind

ROWS = [
    # --- locked ------------------------------------------------------------------------
    row("someone_steps_in", "locked", SensorsChanged(AT_ENTRY), 1, Mode.LOCKED),
    row("obstruction_on_a_closed_lane", "locked", SensorsChanged(OBSTRUCTION), 1, Mode.LOCKED),
    nothing("tick", "locked", Tick(), 100, Mode.LOCKED),
    row("unlock_entry", "locked", Unlock(ENTRY, "B"), 1, Mode.UNLOCKED,
        [UNLOCK_ENTRY], [R(K.UNLOCKED, ENTRY, "B")]),
    row("unlock_exit", "locked", Unlock(EXIT, "B"), 1, Mode.UNLOCKED,
        [UNLOCK_EXIT], [R(K.UNLOCKED, EXIT, "B")]),
    row("emergency", "locked", EmergencyOn("fire"), 1, Mode.EMERGENCY,
        [OPEN], [R(K.EMERGENCY_OPEN, reason="fire")]),
    nothing("reset_without_emergency", "locked", EmergencyReset(), 1, Mode.LOCKED),
    row("link_lost", "locked", LinkLost(), 1, Mode.FAULT, [], [R(K.LINK_LOST)]),
    nothing("link_restored_not_in_fault", "locked", LinkRestored(CLEAR), 1, Mode.LOCKED),
    row("hold_open", "locked", HoldOpen(True), 1, Mode.HELD_OPEN, [OPEN], [R(K.HELD_OPEN)]),
    nothing("hold_release_without_hold", "locked", HoldOpen(False), 1, Mode.LOCKED),
    row("lockout", "locked", Lockout(True), 1, Mode.LOCKED_OUT, [], [R(K.LOCKED_OUT)]),
    nothing("lockout_release_without_lockout", "locked", Lockout(False), 1, Mode.LOCKED),
    row("unlock_with_visitor_already_in_entry_beam", "locked_someone_at_entry",
        Unlock(ENTRY, "B"), 1, Mode.PASSING, [UNLOCK_ENTRY], [R(K.UNLOCKED, ENTRY, "B")]),
    row("unlock_other_way_with_someone_at_entry", "locked_someone_at_entry",
        Unlock(EXIT, "B"), 1, Mode.UNLOCKED, [UNLOCK_EXIT], [R(K.UNLOCKED, EXIT, "B")]),
    row("forced_passage", "locked_someone_at_exit", SensorsChanged(CLEAR), 4, Mode.ALARM,
        [CLOSED_ALARM], [R(K.FORCED_PASSAGE, ENTRY)]),
    # --- unlocked (for entry by A at 0; unlock deadline 8) -------------------------------
    row("visitor_steps_in", "unlocked", SensorsChanged(AT_ENTRY), 1, Mode.PASSING),
    row("someone_at_the_wrong_side", "unlocked", SensorsChanged(AT_EXIT), 1, Mode.UNLOCKED),
    row("obstruction_only", "unlocked", SensorsChanged(OBSTRUCTION), 1, Mode.UNLOCKED),
    nothing("tick_before_deadline", "unlocked", Tick(), 7.9, Mode.UNLOCKED),
    row("tick_at_deadline", "unlocked", Tick(), 8, Mode.CLOSING,
        [CLOSED], [given_back("timeout")]),
    row("timeout_with_lane_occupied_never_closes", "unlocked_obstruction", Tick(), 8,
        Mode.OBSTRUCTED, [OPEN_ALARM], [given_back("timeout"), R(K.OBSTRUCTION, ENTRY)]),
    refused("unlocked", Mode.UNLOCKED, "lane_busy"),
    row("emergency", "unlocked", EmergencyOn("fire"), 1, Mode.EMERGENCY,
        [OPEN], [given_back("emergency"), R(K.EMERGENCY_OPEN, reason="fire")]),
    nothing("reset_without_emergency", "unlocked", EmergencyReset(), 1, Mode.UNLOCKED),
    row("link_lost", "unlocked", LinkLost(), 1, Mode.FAULT,
        [], [R(K.LINK_LOST), given_back("link_lost")]),
    nothing("link_restored_not_in_fault", "unlocked", LinkRestored(CLEAR), 1, Mode.UNLOCKED),
    row("hold_open", "unlocked", HoldOpen(True), 1, Mode.HELD_OPEN,
        [OPEN], [R(K.HELD_OPEN), given_back("held_open")]),
    nothing("hold_release_without_hold", "unlocked", HoldOpen(False), 1, Mode.UNLOCKED),
    row("lockout", "unlocked", Lockout(True), 1, Mode.CLOSING,
        [CLOSED], [R(K.LOCKED_OUT), given_back("locked_out")]),
    nothing("lockout_release_without_lockout", "unlocked", Lockout(False), 1, Mode.UNLOCKED),
    row("wrong_way_passage", "unlocked_wrong_way_at_entry", SensorsChanged(CLEAR), 4,
        Mode.ALARM, [CLOSED, CLOSED_ALARM],
        [R(K.FORCED_PASSAGE, EXIT), given_back("forced_passage")]),
    # --- passing (visitor in the entry beam at 1; passage deadline 11) ------------------
    row("visitor_in_both_beams", "passing", SensorsChanged(BOTH), 2, Mode.PASSING),
    row("visitor_jumps_to_the_far_beam", "passing", SensorsChanged(AT_EXIT), 2, Mode.PASSING),
    row("visitor_backs_out", "passing", SensorsChanged(CLEAR), 2, Mode.UNLOCKED),
    nothing("unlock_deadline_no_longer_applies", "passing", Tick(), 8, Mode.PASSING),
    nothing("tick_before_deadline", "passing", Tick(), 10.9, Mode.PASSING),
    row("loitering_at_deadline", "passing", Tick(), 11, Mode.OBSTRUCTED, [OPEN_ALARM],
        [R(K.LOITERING, ENTRY, "A"), R(K.OBSTRUCTION, ENTRY)]),
    refused("passing", Mode.PASSING, "lane_busy"),
    row("emergency", "passing", EmergencyOn("fire"), 2, Mode.EMERGENCY,
        [OPEN], [given_back("emergency"), R(K.EMERGENCY_OPEN, reason="fire")]),
    nothing("reset_without_emergency", "passing", EmergencyReset(), 2, Mode.PASSING),
    row("link_lost", "passing", LinkLost(), 2, Mode.FAULT,
        [], [R(K.LINK_LOST), given_back("link_lost")]),
    nothing("link_restored_not_in_fault", "passing", LinkRestored(CLEAR), 2, Mode.PASSING),
    row("hold_open", "passing", HoldOpen(True), 2, Mode.HELD_OPEN,
        [OPEN], [R(K.HELD_OPEN), given_back("held_open")]),
    nothing("hold_release_without_hold", "passing", HoldOpen(False), 2, Mode.PASSING),
    row("lockout_never_closes_on_the_visitor", "passing", Lockout(True), 2, Mode.OBSTRUCTED,
        [OPEN_ALARM], [R(K.LOCKED_OUT), given_back("locked_out"), R(K.OBSTRUCTION, ENTRY)]),
    nothing("lockout_release_without_lockout", "passing", Lockout(False), 2, Mode.PASSING),
    row("passage_completes", "passing_at_exit", SensorsChanged(CLEAR), 4, Mode.CLOSING,
        [CLOSED], [R(K.PASSAGE, ENTRY, "A")]),
    row("visitor_steps_back", "passing_at_exit", SensorsChanged(BOTH), 4, Mode.PASSING),
    row("passage_completes_onto_an_obstruction", "passing_at_exit",
        SensorsChanged(OBSTRUCTION), 4, Mode.OBSTRUCTED, [OPEN_ALARM],
        [R(K.PASSAGE, ENTRY, "A"), R(K.OBSTRUCTION, ENTRY)]),
    # --- closing (passage at 4; closing until 5) ---------------------------------------
    row("someone_at_entry_reopens", "closing", SensorsChanged(AT_ENTRY), 4.5, Mode.OBSTRUCTED,
        [OPEN_ALARM], [R(K.OBSTRUCTION, ENTRY)]),
    row("someone_at_exit_reopens", "closing", SensorsChanged(AT_EXIT), 4.5, Mode.OBSTRUCTED,
        [OPEN_ALARM], [R(K.OBSTRUCTION, ENTRY)]),
    row("obstruction_reopens", "closing", SensorsChanged(OBSTRUCTION), 4.5, Mode.OBSTRUCTED,
        [OPEN_ALARM], [R(K.OBSTRUCTION, ENTRY)]),
    nothing("tick_before_deadline", "closing", Tick(), 4.9, Mode.CLOSING),
    row("closed_at_deadline", "closing", Tick(), 5, Mode.LOCKED),
    row("unlock_accepted_while_closing", "closing", Unlock(EXIT, "B"), 4.5, Mode.UNLOCKED,
        [UNLOCK_EXIT], [R(K.UNLOCKED, EXIT, "B")]),
    row("emergency", "closing", EmergencyOn("fire"), 4.5, Mode.EMERGENCY,
        [OPEN], [R(K.EMERGENCY_OPEN, reason="fire")]),
    nothing("reset_without_emergency", "closing", EmergencyReset(), 4.5, Mode.CLOSING),
    row("link_lost", "closing", LinkLost(), 4.5, Mode.FAULT, [], [R(K.LINK_LOST)]),
    nothing("link_restored_not_in_fault", "closing", LinkRestored(CLEAR), 4.5, Mode.CLOSING),
    row("hold_open", "closing", HoldOpen(True), 4.5, Mode.HELD_OPEN, [OPEN], [R(K.HELD_OPEN)]),
    nothing("hold_release_without_hold", "closing", HoldOpen(False), 4.5, Mode.CLOSING),
    row("lockout_waits_for_the_close", "closing", Lockout(True), 4.5, Mode.CLOSING,
        [], [R(K.LOCKED_OUT)]),
    nothing("lockout_release_without_lockout", "closing", Lockout(False), 4.5, Mode.CLOSING),
    row("closed_into_lockout", "closing_locked_out", Tick(), 5, Mode.LOCKED_OUT),
    refused("closing_locked_out", Mode.CLOSING, "lane_locked_out", now=4.5),
    # --- obstructed (someone stepped in while closing at 4.5; auth already used) -------
    row("cleared_then_closes", "obstructed", SensorsChanged(CLEAR), 6, Mode.CLOSING,
        [CLOSED], [R(K.OBSTRUCTION_CLEARED, ENTRY)]),
    row("still_occupied", "obstructed", SensorsChanged(BOTH), 6, Mode.OBSTRUCTED),
    row("beams_clear_obstruction_still_on", "obstructed", SensorsChanged(OBSTRUCTION), 6,
        Mode.OBSTRUCTED),
    nothing("tick", "obstructed", Tick(), 100, Mode.OBSTRUCTED),
    refused("obstructed", Mode.OBSTRUCTED, "lane_obstructed", now=6),
    row("emergency", "obstructed", EmergencyOn("fire"), 6, Mode.EMERGENCY,
        [OPEN], [R(K.EMERGENCY_OPEN, reason="fire")]),
    nothing("reset_without_emergency", "obstructed", EmergencyReset(), 6, Mode.OBSTRUCTED),
    row("link_lost", "obstructed", LinkLost(), 6, Mode.FAULT, [], [R(K.LINK_LOST)]),
    nothing("link_restored_not_in_fault", "obstructed", LinkRestored(CLEAR), 6,
            Mode.OBSTRUCTED),
    row("hold_open", "obstructed", HoldOpen(True), 6, Mode.HELD_OPEN,
        [OPEN], [R(K.HELD_OPEN)]),
    nothing("hold_release_without_hold", "obstructed", HoldOpen(False), 6, Mode.OBSTRUCTED),
    row("lockout_waits_for_the_lane_to_clear", "obstructed", Lockout(True), 6,
        Mode.OBSTRUCTED, [], [R(K.LOCKED_OUT)]),
    nothing("lockout_release_without_lockout", "obstructed", Lockout(False), 6,
            Mode.OBSTRUCTED),
    row("second_passage_is_tailgating", "obstructed_at_exit", SensorsChanged(CLEAR), 6,
        Mode.ALARM, [CLOSED, CLOSED_ALARM], [R(K.TAILGATING, ENTRY)]),
    # --- obstructed while still holding the auth (loitering since 11) ------------------
    row("loiterer_backs_out", "loitering", SensorsChanged(CLEAR), 12, Mode.CLOSING,
        [CLOSED], [given_back("backed_out"), R(K.OBSTRUCTION_CLEARED, ENTRY)]),
    row("loiterer_passes", "loitering_at_exit", SensorsChanged(CLEAR), 14, Mode.CLOSING,
        [CLOSED], [R(K.PASSAGE, ENTRY, "A")]),
    nothing("tick", "loitering", Tick(), 100, Mode.OBSTRUCTED),
    refused("loitering", Mode.OBSTRUCTED, "lane_obstructed", now=12),
    row("emergency", "loitering", EmergencyOn("fire"), 12, Mode.EMERGENCY,
        [OPEN], [given_back("emergency"), R(K.EMERGENCY_OPEN, reason="fire")]),
    row("link_lost", "loitering", LinkLost(), 12, Mode.FAULT,
        [], [R(K.LINK_LOST), given_back("link_lost")]),
    row("hold_open", "loitering", HoldOpen(True), 12, Mode.HELD_OPEN,
        [OPEN], [R(K.HELD_OPEN), given_back("held_open")]),
    row("lockout_keeps_the_auth", "loitering", Lockout(True), 12, Mode.OBSTRUCTED,
        [], [R(K.LOCKED_OUT)]),
    # --- alarm (forced passage over the locked lane at 4; alarm until 7) ---------------
    row("someone_steps_in", "alarm", SensorsChanged(AT_ENTRY), 5, Mode.ALARM),
    row("obstruction_on_the_closed_lane", "alarm", SensorsChanged(OBSTRUCTION), 5, Mode.ALARM),
    nothing("tick_before_deadline", "alarm", Tick(), 6.9, Mode.ALARM),
    row("alarm_ends_at_deadline", "alarm", Tick(), 7, Mode.LOCKED, [CLOSED]),
    refused("alarm", Mode.ALARM, "lane_alarm", now=5),
    row("emergency", "alarm", EmergencyOn("fire"), 5, Mode.EMERGENCY,
        [OPEN], [R(K.EMERGENCY_OPEN, reason="fire")]),
    nothing("reset_without_emergency", "alarm", EmergencyReset(), 5, Mode.ALARM),
    row("link_lost", "alarm", LinkLost(), 5, Mode.FAULT, [], [R(K.LINK_LOST)]),
    nothing("link_restored_not_in_fault", "alarm", LinkRestored(CLEAR), 5, Mode.ALARM),
    row("hold_open", "alarm", HoldOpen(True), 5, Mode.HELD_OPEN, [OPEN], [R(K.HELD_OPEN)]),
    nothing("hold_release_without_hold", "alarm", HoldOpen(False), 5, Mode.ALARM),
    row("lockout_waits_for_the_alarm", "alarm", Lockout(True), 5, Mode.ALARM,
        [], [R(K.LOCKED_OUT)]),
    nothing("lockout_release_without_lockout", "alarm", Lockout(False), 5, Mode.ALARM),
    row("alarm_ends_into_lockout", "alarm_locked_out", Tick(), 7, Mode.LOCKED_OUT, [CLOSED]),
    row("another_forced_passage", "alarm_someone_at_exit", SensorsChanged(CLEAR), 6.5,
        Mode.ALARM, [], [R(K.FORCED_PASSAGE, ENTRY)]),
    # The alarm does not stop the barrier closing: someone entering before it is shut
    # reopens it, as in closing.
    row("someone_steps_in_while_still_closing", "alarm_closing", SensorsChanged(AT_ENTRY),
        4.5, Mode.OBSTRUCTED, [OPEN_ALARM], [R(K.OBSTRUCTION, EXIT)]),
    row("obstruction_while_still_closing", "alarm_closing", SensorsChanged(OBSTRUCTION),
        4.5, Mode.OBSTRUCTED, [OPEN_ALARM], [R(K.OBSTRUCTION, EXIT)]),
    row("someone_steps_in_once_closed", "alarm_closing", SensorsChanged(AT_ENTRY), 5,
        Mode.ALARM),
    # --- emergency open (fire input at 0) -----------------------------------------------
    row("someone_in_the_lane", "emergency", SensorsChanged(AT_ENTRY), 1, Mode.EMERGENCY),
    row("obstruction", "emergency", SensorsChanged(OBSTRUCTION), 1, Mode.EMERGENCY),
    row("passage_is_free", "emergency_someone_at_exit", SensorsChanged(CLEAR), 4,
        Mode.EMERGENCY, [], [R(K.FREE_PASSAGE, ENTRY, reason="emergency_open")]),
    nothing("tick", "emergency", Tick(), 100, Mode.EMERGENCY),
    refused("emergency", Mode.EMERGENCY, "emergency_open"),
    nothing("second_emergency_input", "emergency", EmergencyOn("button"), 1, Mode.EMERGENCY),
    row("reset_closes", "emergency", EmergencyReset(), 1, Mode.CLOSING,
        [CLOSED], [R(K.EMERGENCY_RESET)]),
    row("reset_with_someone_in_the_lane", "emergency_occupied", EmergencyReset(), 2,
        Mode.OBSTRUCTED, [OPEN_ALARM], [R(K.EMERGENCY_RESET), R(K.OBSTRUCTION)]),
    row("reset_back_to_held_open", "emergency_held_open", EmergencyReset(), 1,
        Mode.HELD_OPEN, [], [R(K.EMERGENCY_RESET)]),
    row("reset_closes_a_locked_out_lane", "emergency_locked_out", EmergencyReset(), 1,
        Mode.CLOSING, [CLOSED], [R(K.EMERGENCY_RESET)]),
    row("link_lost", "emergency", LinkLost(), 1, Mode.FAULT, [], [R(K.LINK_LOST)]),
    nothing("link_restored_not_in_fault", "emergency", LinkRestored(CLEAR), 1, Mode.EMERGENCY),
    row("hold_open_waits", "emergency", HoldOpen(True), 1, Mode.EMERGENCY,
        [], [R(K.HELD_OPEN)]),
    nothing("hold_release_without_hold", "emergency", HoldOpen(False), 1, Mode.EMERGENCY),
    row("lockout_waits", "emergency", Lockout(True), 1, Mode.EMERGENCY, [], [R(K.LOCKED_OUT)]),
    nothing("lockout_release_without_lockout", "emergency", Lockout(False), 1, Mode.EMERGENCY),
    # --- fault (link lost at 0; outputs last driven closed) -----------------------------
    nothing("sensors_ignored", "fault", SensorsChanged(AT_ENTRY), 1, Mode.FAULT),
    nothing("tick", "fault", Tick(), 100, Mode.FAULT),
    refused("fault", Mode.FAULT, "lane_fault"),
    row("emergency_cannot_drive_yet", "fault", EmergencyOn("fire"), 1, Mode.FAULT,
        [], [R(K.EMERGENCY_OPEN, reason="fire")]),
    nothing("reset_without_emergency", "fault", EmergencyReset(), 1, Mode.FAULT),
    nothing("link_lost_again", "fault", LinkLost(), 1, Mode.FAULT),
    row("restored_fails_locked", "fault", LinkRestored(CLEAR), 1, Mode.LOCKED,
        [CLOSED], [R(K.LINK_RESTORED)]),
    row("restored_fails_open_then_closes", "fault", LinkRestored(CLEAR), 1, Mode.CLOSING,
        [OPEN, CLOSED], [R(K.LINK_RESTORED)], timing=T_OPEN),
    row("restored_fails_locked_someone_in_lane", "fault", LinkRestored(AT_ENTRY), 1,
        Mode.OBSTRUCTED, [OPEN, OPEN_ALARM], [R(K.LINK_RESTORED), R(K.OBSTRUCTION)]),
    row("restored_fails_open_obstruction", "fault", LinkRestored(OBSTRUCTION), 1,
        Mode.OBSTRUCTED, [OPEN, OPEN_ALARM], [R(K.LINK_RESTORED), R(K.OBSTRUCTION)],
        timing=T_OPEN),
    row("hold_open_waits", "fault", HoldOpen(True), 1, Mode.FAULT, [], [R(K.HELD_OPEN)]),
    nothing("hold_release_without_hold", "fault", HoldOpen(False), 1, Mode.FAULT),
    row("lockout_waits", "fault", Lockout(True), 1, Mode.FAULT, [], [R(K.LOCKED_OUT)]),
    nothing("lockout_release_without_lockout", "fault", Lockout(False), 1, Mode.FAULT),
    row("first_link_up_fails_locked", "boot", LinkRestored(CLEAR), 0, Mode.LOCKED,
        [CLOSED], [R(K.LINK_RESTORED)]),
    row("first_link_up_fails_open", "boot", LinkRestored(CLEAR), 0, Mode.CLOSING,
        [OPEN, CLOSED], [R(K.LINK_RESTORED)], timing=T_OPEN),
    refused("boot", Mode.FAULT, "lane_fault", now=0),
    row("restored_into_emergency", "fault_emergency", LinkRestored(CLEAR), 1, Mode.EMERGENCY,
        [OPEN], [R(K.LINK_RESTORED)]),
    row("reset_during_fault", "fault_emergency", EmergencyReset(), 1, Mode.FAULT,
        [], [R(K.EMERGENCY_RESET)]),
    row("restored_into_held_open", "fault_held_open", LinkRestored(CLEAR), 1, Mode.HELD_OPEN,
        [CLOSED, OPEN], [R(K.LINK_RESTORED)]),
    row("restored_into_held_open_fails_open", "fault_held_open", LinkRestored(CLEAR), 1,
        Mode.HELD_OPEN, [OPEN], [R(K.LINK_RESTORED)], timing=T_OPEN),
    row("restored_into_held_open_someone_in_lane", "fault_held_open", LinkRestored(AT_ENTRY),
        1, Mode.HELD_OPEN, [OPEN], [R(K.LINK_RESTORED)]),
    row("restored_into_lockout", "fault_locked_out", LinkRestored(CLEAR), 1, Mode.LOCKED_OUT,
        [CLOSED], [R(K.LINK_RESTORED)]),
    row("restored_into_lockout_fails_open", "fault_locked_out", LinkRestored(CLEAR), 1,
        Mode.CLOSING, [OPEN, CLOSED], [R(K.LINK_RESTORED)], timing=T_OPEN),
    row("restored_after_losing_an_open_lane", "fault_while_unlocked", LinkRestored(CLEAR), 2,
        Mode.LOCKED, [CLOSED], [R(K.LINK_RESTORED)]),
    # --- held open (maintenance hold at 0) ----------------------------------------------
    row("someone_in_the_lane", "held_open", SensorsChanged(AT_ENTRY), 1, Mode.HELD_OPEN),
    row("passage_is_free", "held_open_someone_at_exit", SensorsChanged(CLEAR), 4,
        Mode.HELD_OPEN, [], [R(K.FREE_PASSAGE, ENTRY, reason="held_open")]),
    nothing("tick", "held_open", Tick(), 100, Mode.HELD_OPEN),
    refused("held_open", Mode.HELD_OPEN, "lane_held_open"),
    row("emergency", "held_open", EmergencyOn("fire"), 1, Mode.EMERGENCY,
        [], [R(K.EMERGENCY_OPEN, reason="fire")]),
    nothing("reset_without_emergency", "held_open", EmergencyReset(), 1, Mode.HELD_OPEN),
    row("link_lost", "held_open", LinkLost(), 1, Mode.FAULT, [], [R(K.LINK_LOST)]),
    nothing("link_restored_not_in_fault", "held_open", LinkRestored(CLEAR), 1, Mode.HELD_OPEN),
    nothing("hold_again", "held_open", HoldOpen(True), 1, Mode.HELD_OPEN),
    row("release_closes", "held_open", HoldOpen(False), 1, Mode.CLOSING,
        [CLOSED], [R(K.HOLD_RELEASED)]),
    row("release_with_someone_in_lane", "held_open_occupied", HoldOpen(False), 2,
        Mode.OBSTRUCTED, [OPEN_ALARM], [R(K.HOLD_RELEASED), R(K.OBSTRUCTION)]),
    row("lockout_replaces_the_hold", "held_open", Lockout(True), 1, Mode.CLOSING,
        [CLOSED], [R(K.LOCKED_OUT)]),
    nothing("lockout_release_without_lockout", "held_open", Lockout(False), 1, Mode.HELD_OPEN),
    # --- locked out (maintenance lockout at 0) ------------------------------------------
    row("someone_steps_in", "locked_out", SensorsChanged(AT_ENTRY), 1, Mode.LOCKED_OUT),
    row("forced_passage", "locked_out_someone_at_exit", SensorsChanged(CLEAR), 4, Mode.ALARM,
        [CLOSED_ALARM], [R(K.FORCED_PASSAGE, ENTRY)]),
    nothing("tick", "locked_out", Tick(), 100, Mode.LOCKED_OUT),
    refused("locked_out", Mode.LOCKED_OUT, "lane_locked_out"),
    row("emergency_overrides", "locked_out", EmergencyOn("fire"), 1, Mode.EMERGENCY,
        [OPEN], [R(K.EMERGENCY_OPEN, reason="fire")]),
    nothing("reset_without_emergency", "locked_out", EmergencyReset(), 1, Mode.LOCKED_OUT),
    row("link_lost", "locked_out", LinkLost(), 1, Mode.FAULT, [], [R(K.LINK_LOST)]),
    nothing("link_restored_not_in_fault", "locked_out", LinkRestored(CLEAR), 1,
            Mode.LOCKED_OUT),
    row("hold_open_replaces_the_lockout", "locked_out", HoldOpen(True), 1, Mode.HELD_OPEN,
        [OPEN], [R(K.HELD_OPEN)]),
    nothing("hold_release_without_hold", "locked_out", HoldOpen(False), 1, Mode.LOCKED_OUT),
    nothing("lockout_again", "locked_out", Lockout(True), 1, Mode.LOCKED_OUT),
    row("release", "locked_out", Lockout(False), 1, Mode.LOCKED, [], [R(K.LOCKOUT_RELEASED)]),
]  # fmt: skip


@pytest.mark.parametrize("r", ROWS)
def test_transition(r: Row) -> None:
    before = feed(START[r.start][1])
    after, out = step(before, r.event, r.now, r.timing)
    assert after.mode is r.mode
    assert drives(out) == r.drives
    assert reports(out) == r.reports
    assert_never_closed_on_someone(before, after, out)
    if r.unchanged:
        assert after == before


@pytest.mark.parametrize("name", START)
def test_start_states_are_in_the_mode_they_claim(name: str) -> None:
    mode, history = START[name]
    assert feed(history).mode is mode


def test_table_covers_every_mode_and_event() -> None:
    """Every mode meets every kind of event at least once in the table."""
    kinds = {
        SensorsChanged, Tick, Unlock, EmergencyOn, EmergencyReset, LinkLost, LinkRestored,
        HoldOpen, Lockout,
    }  # fmt: skip
    covered: dict[Mode, set[type]] = {m: set() for m in Mode}
    for p in ROWS:
        r = p.values[0]
        assert isinstance(r, Row)
        covered[feed(START[r.start][1]).mode].add(type(r.event))
    for mode, seen_kinds in covered.items():
        assert seen_kinds == kinds, (mode, kinds - seen_kinds)


@pytest.mark.parametrize(
    ("start", "timing", "expected"),
    [
        ("locked", T, CLOSED),
        ("locked", T_OPEN, OPEN),
        ("emergency", T, OPEN),
        ("fault_emergency", T, OPEN),
        ("unlocked", T, CLOSED),
        ("passing", T, UNLOCK_ENTRY),
        ("obstructed", T, OPEN_ALARM),
        ("held_open", T, CLOSED),
    ],
)
def test_shutdown_outputs(start: str, timing: Timing, expected: Outputs) -> None:
    """Stopping the daemon leaves the fail state, but never closes on someone in the lane."""
    assert shutdown_outputs(feed(START[start][1]), timing) == expected


# --- stories ------------------------------------------------------------------------------


class Lane:
    """One lane driven through a story: remembers every action for the assertions."""

    def __init__(self, timing: Timing = T, boot: Sensors = CLEAR) -> None:
        self.timing = timing
        self.state = LaneState()
        self.now = 0.0
        self.log: list[Action] = []
        self.go(LinkRestored(boot))

    def go(self, event: Event, at: float | None = None) -> list[Action]:
        if at is not None:
            assert at >= self.now
            self.now = at
        before = self.state
        self.state, out = step(self.state, event, self.now, self.timing)
        assert_never_closed_on_someone(before, self.state, out)
        self.log.extend(out)
        return out

    def see(self, *snapshots: Sensors, every: float = 0.3) -> list[Action]:
        out: list[Action] = []
        for s in snapshots:
            out += self.go(SensorsChanged(s), self.now + every)
        return out

    def walk(self, direction: Direction) -> list[Action]:
        near, far = (AT_ENTRY, AT_EXIT) if direction is ENTRY else (AT_EXIT, AT_ENTRY)
        return self.see(near, BOTH, far, CLEAR)

    def tick(self, at: float) -> list[Action]:
        return self.go(Tick(), at)

    def mode(self) -> Mode:
        # A method, not a property, so that mypy does not carry a narrowed mode across steps.
        return self.state.mode

    @property
    def outputs(self) -> Outputs:
        return self.state.outputs


def kinds(actions: Sequence[Action]) -> list[Kind]:
    return [r.kind for r in reports(actions)]


def test_a_normal_entry() -> None:
    lane = Lane()
    assert kinds(lane.go(Unlock(ENTRY, "t1"), 1)) == [Kind.UNLOCKED]
    assert lane.outputs == UNLOCK_ENTRY
    out = lane.walk(ENTRY)
    assert reports(out) == [Report(Kind.PASSAGE, ENTRY, "t1")]
    assert drives(out) == [CLOSED]
    assert lane.mode() is Mode.CLOSING
    lane.tick(lane.now + T.close_time_s)
    assert lane.mode() is Mode.LOCKED


def test_a_normal_exit() -> None:
    lane = Lane()
    lane.go(Unlock(EXIT, "t1"), 1)
    assert lane.outputs == UNLOCK_EXIT
    assert reports(lane.walk(EXIT)) == [Report(Kind.PASSAGE, EXIT, "t1")]
    lane.tick(lane.now + T.close_time_s)
    assert lane.mode() is Mode.LOCKED
    assert lane.outputs == CLOSED


def test_nobody_comes_the_entry_is_given_back() -> None:
    lane = Lane()
    lane.go(Unlock(ENTRY, "t1"), 1)
    assert lane.tick(8.9) == []
    out = lane.tick(9)
    assert reports(out) == [Report(Kind.NOT_PASSED, ENTRY, "t1", "timeout")]
    assert drives(out) == [CLOSED]
    lane.tick(10)
    assert lane.mode() is Mode.LOCKED
    # The given-back entry can be used again.
    assert kinds(lane.go(Unlock(ENTRY, "t1"), 11)) == [Kind.UNLOCKED]


def test_a_visitor_who_backs_out() -> None:
    lane = Lane()
    lane.go(Unlock(ENTRY, "t1"), 0)
    lane.see(AT_ENTRY, BOTH, AT_ENTRY)
    assert lane.mode() is Mode.PASSING
    assert lane.see(CLEAR) == []
    assert lane.mode() is Mode.UNLOCKED
    # Back in unlocked, the original unlock deadline applies again.
    assert lane.state.deadline == T.unlock_timeout_s
    out = lane.tick(T.unlock_timeout_s)
    assert reports(out) == [Report(Kind.NOT_PASSED, ENTRY, "t1", "timeout")]
    assert Kind.PASSAGE not in kinds(lane.log)


def test_a_tailgater() -> None:
    lane = Lane()
    lane.go(Unlock(ENTRY, "t1"), 0)
    assert kinds(lane.walk(ENTRY)) == [Kind.PASSAGE]
    # The second person steps in while the barrier closes: it reopens for them...
    out = lane.see(AT_ENTRY, every=0.1)
    assert kinds(out) == [Kind.OBSTRUCTION]
    assert lane.outputs == OPEN_ALARM
    # ...and their passage on the same authorisation is tailgating.
    out = lane.see(BOTH, AT_EXIT, CLEAR)
    assert kinds(out) == [Kind.TAILGATING]
    assert lane.mode() is Mode.ALARM
    assert lane.outputs == CLOSED_ALARM
    lane.tick(lane.now + T.alarm_s)
    assert lane.mode() is Mode.LOCKED
    assert lane.outputs == CLOSED
    assert kinds(lane.log).count(Kind.PASSAGE) == 1


def test_forced_passage_over_a_locked_lane() -> None:
    lane = Lane()
    out = lane.walk(EXIT)
    assert reports(out) == [Report(Kind.FORCED_PASSAGE, EXIT)]
    assert lane.mode() is Mode.ALARM
    assert drives(out) == [CLOSED_ALARM]
    assert kinds(lane.go(Unlock(ENTRY, "t1"))) == [Kind.UNLOCK_REFUSED]
    lane.tick(lane.now + T.alarm_s)
    assert lane.mode() is Mode.LOCKED
    assert lane.outputs == CLOSED


def test_wrong_direction_passage_through_an_unlocked_lane() -> None:
    lane = Lane()
    lane.go(Unlock(ENTRY, "t1"), 0)
    out = lane.walk(EXIT)
    assert reports(out) == [
        Report(Kind.FORCED_PASSAGE, EXIT),
        Report(Kind.NOT_PASSED, ENTRY, "t1", "forced_passage"),
    ]
    assert lane.mode() is Mode.ALARM
    assert lane.outputs == CLOSED_ALARM
    # The alarm does not stop the closing barrier: a child stepping in reopens it.
    out = lane.see(OBSTRUCTION, every=0.2)
    assert kinds(out) == [Kind.OBSTRUCTION]
    assert lane.outputs == OPEN_ALARM
    assert kinds(lane.see(CLEAR)) == [Kind.OBSTRUCTION_CLEARED]
    lane.tick(lane.now + T.close_time_s)
    assert lane.mode() is Mode.LOCKED


def test_obstruction_while_closing_reopens_alarms_and_closes_once_clear() -> None:
    lane = Lane()
    lane.go(Unlock(ENTRY, "t1"), 0)
    lane.walk(ENTRY)
    assert lane.mode() is Mode.CLOSING
    out = lane.see(OBSTRUCTION, every=0.2)
    assert reports(out) == [Report(Kind.OBSTRUCTION, ENTRY)]
    assert drives(out) == [OPEN_ALARM]
    # However long it stays, the lane never closes on it.
    assert lane.tick(lane.now + 60) == []
    assert lane.outputs == OPEN_ALARM
    out = lane.see(CLEAR)
    assert reports(out) == [Report(Kind.OBSTRUCTION_CLEARED, ENTRY)]
    assert drives(out) == [CLOSED]
    lane.tick(lane.now + T.close_time_s)
    assert lane.mode() is Mode.LOCKED


def test_loitering_past_the_passage_timeout() -> None:
    lane = Lane()
    lane.go(Unlock(ENTRY, "t1"), 0)
    lane.see(AT_ENTRY, BOTH)
    out = lane.tick(lane.now + T.passage_timeout_s)
    assert reports(out) == [
        Report(Kind.LOITERING, ENTRY, "t1"),
        Report(Kind.OBSTRUCTION, ENTRY),
    ]
    assert lane.outputs == OPEN_ALARM
    # The slow visitor still counts when they come out the far side.
    out = lane.see(AT_EXIT, CLEAR)
    assert reports(out) == [Report(Kind.PASSAGE, ENTRY, "t1")]
    assert drives(out) == [CLOSED]
    assert lane.mode() is Mode.CLOSING


def test_emergency_during_an_unlock_gives_the_entry_back() -> None:
    lane = Lane()
    lane.go(Unlock(ENTRY, "t1"), 0)
    out = lane.go(EmergencyOn("fire"), 1)
    assert reports(out) == [
        Report(Kind.NOT_PASSED, ENTRY, "t1", "emergency"),
        Report(Kind.EMERGENCY_OPEN, reason="fire"),
    ]
    assert drives(out) == [OPEN]
    # People leave either way without alarms, and nothing closes the lane.
    assert kinds(lane.walk(EXIT)) == [Kind.FREE_PASSAGE]
    assert kinds(lane.walk(ENTRY)) == [Kind.FREE_PASSAGE]
    assert lane.tick(lane.now + 600) == []
    assert lane.go(Lockout(True)) == [Report(Kind.LOCKED_OUT)]
    assert lane.go(Lockout(False)) == [Report(Kind.LOCKOUT_RELEASED)]
    assert lane.outputs == OPEN
    out = lane.go(EmergencyReset(), lane.now + 1)
    assert kinds(out) == [Kind.EMERGENCY_RESET]
    assert drives(out) == [CLOSED]
    lane.tick(lane.now + T.close_time_s)
    assert lane.mode() is Mode.LOCKED


def test_emergency_during_fault_opens_when_the_link_returns() -> None:
    lane = Lane()
    lane.go(LinkLost(), 1)
    assert reports(lane.go(EmergencyOn("button"), 2)) == [
        Report(Kind.EMERGENCY_OPEN, reason="button")
    ]
    assert lane.mode() is Mode.FAULT
    out = lane.go(LinkRestored(AT_ENTRY), 3)
    assert kinds(out) == [Kind.LINK_RESTORED]
    assert drives(out) == [OPEN]
    assert lane.mode() is Mode.EMERGENCY
    lane.see(CLEAR)
    assert drives(lane.go(EmergencyReset(), 5)) == [CLOSED]


def test_link_lost_during_an_unlock_gives_the_entry_back() -> None:
    lane = Lane()
    lane.go(Unlock(ENTRY, "t1"), 0)
    lane.see(AT_ENTRY)
    out = lane.go(LinkLost(), 2)
    assert reports(out) == [
        Report(Kind.LINK_LOST),
        Report(Kind.NOT_PASSED, ENTRY, "t1", "link_lost"),
    ]
    assert drives(out) == []
    assert lane.go(LinkLost(), 3) == []
    assert kinds(lane.go(Unlock(ENTRY, "t2"), 3)) == [Kind.UNLOCK_REFUSED]
    out = lane.go(LinkRestored(CLEAR), 20)
    assert kinds(out) == [Kind.LINK_RESTORED]
    assert drives(out) == [CLOSED]
    assert lane.mode() is Mode.LOCKED
    # Each outage is its own pair of events.
    lane.go(LinkLost(), 21)
    lane.go(LinkRestored(CLEAR), 22)
    assert kinds(lane.log).count(Kind.LINK_LOST) == 2
    assert kinds(lane.log).count(Kind.LINK_RESTORED) == 3


def test_link_restored_fails_open_first_then_closes() -> None:
    lane = Lane(T_OPEN)
    lane.go(LinkLost(), 5)
    out = lane.go(LinkRestored(CLEAR), 6)
    assert drives(out) == [OPEN, CLOSED]
    assert lane.mode() is Mode.CLOSING
    lane.tick(6 + T_OPEN.close_time_s)
    assert lane.mode() is Mode.LOCKED


def test_link_restored_fails_locked_commands_closed_even_if_unchanged() -> None:
    lane = Lane()
    lane.go(LinkLost(), 5)
    out = lane.go(LinkRestored(CLEAR), 6)
    assert drives(out) == [CLOSED]
    assert lane.mode() is Mode.LOCKED


def test_link_restored_over_an_open_lane_treats_the_close_as_closing() -> None:
    """The board may have kept our last open outputs through the outage: the fail-locked
    command then starts a real close, and someone stepping in reopens it."""
    lane = Lane()
    lane.go(Unlock(ENTRY, "t1"), 0)
    lane.go(LinkLost(), 1)
    assert drives(lane.go(LinkRestored(CLEAR), 2)) == [CLOSED]
    out = lane.see(AT_ENTRY, every=0.5)
    assert kinds(out) == [Kind.OBSTRUCTION]
    assert lane.outputs == OPEN_ALARM


def test_lockout_during_an_unlock() -> None:
    lane = Lane()
    lane.go(Unlock(ENTRY, "t1"), 0)
    out = lane.go(Lockout(True), 1)
    assert reports(out) == [
        Report(Kind.LOCKED_OUT),
        Report(Kind.NOT_PASSED, ENTRY, "t1", "locked_out"),
    ]
    assert drives(out) == [CLOSED]
    # Refused while the barrier is still closing, and after.
    assert reports(lane.go(Unlock(ENTRY, "t2"), 1.5)) == [
        Report(Kind.UNLOCK_REFUSED, ENTRY, "t2", "lane_locked_out")
    ]
    lane.tick(2)
    assert lane.mode() is Mode.LOCKED_OUT
    assert kinds(lane.go(Unlock(ENTRY, "t2"), 3)) == [Kind.UNLOCK_REFUSED]
    lane.go(Lockout(False), 4)
    assert kinds(lane.go(Unlock(ENTRY, "t2"), 5)) == [Kind.UNLOCKED]


def test_lockout_mid_passage_never_closes_on_the_visitor() -> None:
    """Current policy: the entry is given back at once and the lane held open alarmed
    until clear; the visitor finishing the passage then counts as tailgating."""
    lane = Lane()
    lane.go(Unlock(ENTRY, "t1"), 0)
    lane.see(AT_ENTRY, BOTH)
    out = lane.go(Lockout(True), 1)
    assert kinds(out) == [Kind.LOCKED_OUT, Kind.NOT_PASSED, Kind.OBSTRUCTION]
    assert lane.outputs == OPEN_ALARM
    assert kinds(lane.see(AT_EXIT, CLEAR)) == [Kind.TAILGATING]
    lane.tick(lane.now + T.alarm_s)
    assert lane.mode() is Mode.LOCKED_OUT


def test_hold_open_then_release() -> None:
    lane = Lane()
    out = lane.go(HoldOpen(True), 1)
    assert reports(out) == [Report(Kind.HELD_OPEN)]
    assert drives(out) == [OPEN]
    assert reports(lane.walk(ENTRY)) == [Report(Kind.FREE_PASSAGE, ENTRY, reason="held_open")]
    assert reports(lane.walk(EXIT)) == [Report(Kind.FREE_PASSAGE, EXIT, reason="held_open")]
    assert kinds(lane.go(Unlock(ENTRY, "t1"))) == [Kind.UNLOCK_REFUSED]
    lane.see(AT_ENTRY)
    out = lane.go(HoldOpen(False), lane.now + 1)
    assert kinds(out) == [Kind.HOLD_RELEASED, Kind.OBSTRUCTION]
    assert lane.outputs == OPEN_ALARM
    out = lane.see(CLEAR)
    assert drives(out) == [CLOSED]
    lane.tick(lane.now + T.close_time_s)
    assert lane.mode() is Mode.LOCKED


def test_hold_open_survives_a_link_outage_with_someone_in_the_lane() -> None:
    lane = Lane()
    lane.go(HoldOpen(True), 1)
    lane.go(LinkLost(), 2)
    out = lane.go(LinkRestored(AT_ENTRY), 3)
    assert drives(out) == [OPEN]
    assert lane.mode() is Mode.HELD_OPEN
    lane.see(CLEAR)
    assert lane.mode() is Mode.HELD_OPEN
    assert kinds(lane.go(HoldOpen(False), 5)) == [Kind.HOLD_RELEASED]
    assert lane.outputs == CLOSED


def test_visitor_already_standing_in_the_entrance_beam() -> None:
    lane = Lane()
    lane.see(AT_ENTRY)
    assert lane.mode() is Mode.LOCKED
    lane.go(Unlock(ENTRY, "t1"), 1)
    assert lane.mode() is Mode.PASSING
    assert lane.state.deadline == 1 + T.passage_timeout_s
    assert reports(lane.see(BOTH, AT_EXIT, CLEAR)) == [Report(Kind.PASSAGE, ENTRY, "t1")]


def test_visitor_at_the_entrance_when_the_link_comes_back() -> None:
    """A lane failing locked is opened, not closed, for someone standing in it."""
    lane = Lane(boot=AT_ENTRY)
    assert lane.mode() is Mode.OBSTRUCTED
    assert drives(lane.log) == [OPEN, OPEN_ALARM]
    assert kinds(lane.see(CLEAR)) == [Kind.OBSTRUCTION_CLEARED]
    assert lane.outputs == CLOSED


def test_a_tight_tailgater_whose_beams_never_clear() -> None:
    """The second person breaks the entrance beam before the first has left the far one."""
    lane = Lane()
    lane.go(Unlock(ENTRY, "t1"), 1)
    out = lane.see(AT_ENTRY, BOTH, AT_EXIT, BOTH, AT_ENTRY, BOTH, AT_EXIT, CLEAR)
    assert kinds(out) == [Kind.PASSAGE, Kind.TAILGATING]
    assert reports(out)[0] == Report(Kind.PASSAGE, ENTRY, "t1")
    assert lane.mode() is Mode.ALARM


def test_a_tailgater_seen_as_far_beam_then_entrance_beam() -> None:
    """At 100 Hz the instant of clear between two people can fall between two polls."""
    lane = Lane()
    lane.go(Unlock(ENTRY, "t1"), 1)
    out = lane.see(AT_ENTRY, BOTH, AT_EXIT, AT_ENTRY, BOTH, AT_EXIT, CLEAR)
    assert kinds(out) == [Kind.PASSAGE, Kind.TAILGATING]


def test_a_visitor_stepping_back_from_the_far_beam_still_counts_once() -> None:
    lane = Lane()
    lane.go(Unlock(ENTRY, "t1"), 1)
    out = lane.see(AT_ENTRY, BOTH, AT_EXIT, BOTH, AT_EXIT, CLEAR)
    assert kinds(out) == [Kind.PASSAGE]


def test_people_clearing_the_lane_after_an_emergency_are_not_intruders() -> None:
    lane = Lane()
    lane.go(EmergencyOn("fire"), 1)
    lane.see(AT_ENTRY, BOTH)
    out = lane.go(EmergencyReset(), lane.now + 0.1)
    assert lane.mode() is Mode.OBSTRUCTED and lane.outputs.is_open
    assert kinds(out) == [Kind.EMERGENCY_RESET, Kind.OBSTRUCTION]
    out = lane.see(AT_EXIT, CLEAR)
    assert kinds(out) == [Kind.FREE_PASSAGE, Kind.OBSTRUCTION_CLEARED]
    assert lane.mode() is Mode.CLOSING
