"""Properties of the gate safety core over random event sequences.

Each example boots one lane (a link restore with random sensors), then feeds it a random
mix of sensor snapshots, ticks, unlocks, emergencies, link changes and maintenance
commands at non-decreasing times, and checks the safety rules after every step:
(a) no close command while anyone is in the lane, and no barrier left closing onto someone;
(b) an emergency keeps the lane open until reset; (c) every unlock is answered once and
every authorisation settled once; (d) step never raises and its outputs never drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.gate.core import (
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
    Maintenance,
    Mode,
    Outputs,
    Report,
    Sensors,
    SensorsChanged,
    Tick,
    Timing,
    Unlock,
    step,
)

PROPERTY_SETTINGS = settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# An empty lane is the common case, and an obstruction the rare one: with every input a
# coin flip the lane would almost never be clear, and most transitions never reached.
sensors_st = st.one_of(
    st.just(Sensors()),
    st.builds(Sensors, st.booleans(), st.booleans(), st.sampled_from([False, False, True])),
)

timing_st = st.builds(
    Timing,
    unlock_timeout_s=st.floats(0.5, 15.0),
    passage_timeout_s=st.floats(0.5, 15.0),
    close_time_s=st.floats(0.1, 3.0),
    alarm_s=st.floats(0.5, 5.0),
    fail_state=st.sampled_from(["open", "locked"]),
)


@dataclass(frozen=True)
class UnlockRequest:
    """An Unlock whose auth is numbered when the run feeds it, so every auth is unique."""

    direction: Direction


@dataclass(frozen=True)
class Walk:
    """Someone walking the beams towards ``direction``: the first ``length`` snapshots of a
    complete passage (near, both, far, clear), 0.2 s apart. Random snapshots alone rarely
    make a whole passage, and passages are where tailgating and forced alarms start."""

    direction: Direction
    length: int


@dataclass(frozen=True)
class Visit:
    """A visitor presents a credential (an unlock), then walks like ``walk``."""

    walk: Walk


Planned = Event | UnlockRequest | Walk | Visit


def weighted(*choices: tuple[int, st.SearchStrategy[Planned]]) -> st.SearchStrategy[Planned]:
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(lambda s: s)


directions = st.sampled_from(Direction)
walk_st = st.builds(Walk, directions, st.integers(1, 4))

# Sensors, walks, ticks and unlocks are a lane's daily life; emergencies, outages and
# maintenance are rarer, so that a run spends most of its time in normal service.
event_st = weighted(
    (4, st.builds(Visit, walk_st)),
    (4, st.just(Tick())),
    (2, st.builds(SensorsChanged, sensors_st)),
    (2, walk_st),
    (1, st.builds(UnlockRequest, directions)),
    (1, st.builds(EmergencyOn, st.sampled_from(["fire", "button"]))),
    (1, st.just(EmergencyReset())),
    (1, st.just(LinkLost())),
    (1, st.builds(LinkRestored, sensors_st)),
    (1, st.builds(HoldOpen, st.booleans())),
    (1, st.builds(Lockout, st.booleans())),
)

dt_st = st.one_of(st.sampled_from([0.0, 0.05, 0.5, 1.0, 3.0, 8.0, 12.0]), st.floats(0.0, 20.0))

RunPlan = tuple[Timing, Sensors, list[tuple[float, Planned]]]
"""The lane's timing, the sensors when its link first comes up, then (delay, event)."""

run_st = st.tuples(
    timing_st, sensors_st, st.lists(st.tuples(dt_st, event_st), min_size=1, max_size=50)
)


@dataclass(frozen=True)
class Step:
    """One step of a run: what went in, the state before and after, what came out."""

    now: float
    event: Event
    before: LaneState
    after: LaneState
    actions: list[Action]


@dataclass
class Run:
    timing: Timing
    steps: list[Step] = field(default_factory=list)

    @property
    def final(self) -> LaneState:
        return self.steps[-1].after


def passage(direction: Direction) -> list[Sensors]:
    near = Sensors(entry_side=True) if direction is Direction.ENTRY else Sensors(exit_side=True)
    far = Sensors(exit_side=True) if direction is Direction.ENTRY else Sensors(entry_side=True)
    return [near, Sensors(entry_side=True, exit_side=True), far, Sensors()]


def play(timing: Timing, boot_sensors: Sensors, plan: list[tuple[float, Planned]]) -> Run:
    """Boot a lane and feed it the plan; unlocks get auths a1, a2, ... in order."""
    run = Run(timing)
    state = LaneState()
    now = 0.0
    events: list[tuple[float, Event]] = [(0.0, LinkRestored(boot_sensors))]
    for n, (dt, planned) in enumerate(plan, start=1):
        now += dt
        if isinstance(planned, Visit):
            events.append((now, Unlock(planned.walk.direction, f"a{n}")))
            planned = planned.walk
            now += 0.5
        if isinstance(planned, UnlockRequest):
            events.append((now, Unlock(planned.direction, f"a{n}")))
        elif isinstance(planned, Walk):
            for snapshot in passage(planned.direction)[: planned.length]:
                events.append((now, SensorsChanged(snapshot)))
                now += 0.2
        else:
            events.append((now, planned))
    for at, event in events:
        after, actions = step(state, event, at, timing)
        run.steps.append(Step(at, event, state, after, actions))
        state = after
    return run


def drives(actions: list[Action]) -> list[Outputs]:
    return [a.outputs for a in actions if isinstance(a, Drive)]


def reports(actions: list[Action]) -> list[Report]:
    return [a for a in actions if isinstance(a, Report)]


@PROPERTY_SETTINGS
@given(run_st)
def test_no_close_command_while_anyone_is_in_the_lane(run: RunPlan) -> None:
    """(a) A Drive from open to closed never happens while a beam or the obstruction is on."""
    for s in play(*run).steps:
        previous = s.before.outputs
        for outputs in drives(s.actions):
            if previous.is_open and not outputs.is_open:
                assert not s.after.sensors.occupied, (s.event, s.before.mode, s.after)
            previous = outputs


@PROPERTY_SETTINGS
@given(run_st)
def test_barrier_never_finishes_closing_onto_someone(run: RunPlan) -> None:
    """(a) A body entering while the barrier is still moving closed (close_time_s after the
    close command) reopens it, whatever the mode: an alarm does not stop the motion."""
    result = play(*run)
    closed_at: float | None = None
    for s in result.steps:
        previous = s.before.outputs
        for outputs in drives(s.actions):
            if previous.is_open and not outputs.is_open:
                closed_at = s.now
            previous = outputs
        after = s.after
        moving = closed_at is not None and s.now < closed_at + result.timing.close_time_s
        if after.mode is not Mode.FAULT and moving and after.sensors.occupied:
            assert after.outputs.is_open, (s.event, s.before.mode, after)


@PROPERTY_SETTINGS
@given(run_st)
def test_emergency_keeps_the_lane_open_until_reset(run: RunPlan) -> None:
    """(b) Between EmergencyOn and EmergencyReset the lane is open (or in fault, where it
    cannot drive anything, and opens as soon as the link returns)."""
    emergency = False
    last: Outputs | None = None
    for s in play(*run).steps:
        for outputs in drives(s.actions):
            last = outputs
        if isinstance(s.event, EmergencyOn):
            emergency = True
        elif isinstance(s.event, EmergencyReset):
            emergency = False
        if not emergency or s.after.mode is Mode.FAULT:
            continue
        assert s.after.mode is Mode.EMERGENCY, (s.event, s.before.mode, s.after)
        assert last is not None
        assert last.unlock_entry and last.unlock_exit, (s.event, last)


@PROPERTY_SETTINGS
@given(run_st)
def test_every_unlock_is_answered_and_every_auth_settled_once(run: RunPlan) -> None:
    """(c) Unlock -> exactly one UNLOCKED or UNLOCK_REFUSED; each UNLOCKED auth ends in
    exactly one PASSAGE or NOT_PASSED, or is still the lane's pending auth."""
    result = play(*run)
    unlocked: list[str] = []
    settled: list[str] = []
    for s in result.steps:
        rs = reports(s.actions)
        if isinstance(s.event, Unlock):
            answers = [r for r in rs if r.kind in (Kind.UNLOCKED, Kind.UNLOCK_REFUSED)]
            assert len(answers) == 1, (s.before.mode, rs)
            assert answers[0].auth == s.event.auth
            assert answers[0].direction is s.event.direction
            if s.before.maintenance is not Maintenance.NONE:
                assert answers[0].kind is Kind.UNLOCK_REFUSED, (s.before.maintenance, rs)
            if answers[0].kind is Kind.UNLOCKED:
                unlocked.append(s.event.auth)
                assert s.after.auth == s.event.auth
            else:
                assert answers[0].reason
                assert s.after == s.before, "a refused unlock changes nothing"
        else:
            assert not [r for r in rs if r.kind in (Kind.UNLOCKED, Kind.UNLOCK_REFUSED)]
        for r in rs:
            if r.kind in (Kind.PASSAGE, Kind.NOT_PASSED):
                assert r.auth is not None, r
                settled.append(r.auth)
    assert len(settled) == len(set(settled)), settled
    assert set(settled) <= set(unlocked), (settled, unlocked)
    pending = set(unlocked) - set(settled)
    assert pending == ({result.final.auth} if result.final.auth else set()), (
        pending,
        result.final,
    )


@PROPERTY_SETTINGS
@given(run_st)
def test_step_never_raises_and_outputs_never_drift(run: RunPlan) -> None:
    """(d) Any sequence is handled (play() would raise), and the core's idea of the
    outputs is always the last Drive it returned."""
    last: Outputs | None = None
    for s in play(*run).steps:
        for outputs in drives(s.actions):
            last = outputs
        assert last == s.after.outputs, (s.event, s.before.mode, s.after)
