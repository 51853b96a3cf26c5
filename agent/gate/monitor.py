"""The safety monitor: emergency and fire inputs, obstruction and link loss, on its own task.

The bus owners hand it every board snapshot (a non-blocking queue put). It steps the lanes
with safety events before anything else and never waits on verification, the cache, sync
or faces. It also checks on its own timer that every board keeps reporting, so a stalled
bus owner is treated like a lost link (Klipper's verify_heater, not the controller).

The emergency latch is site-wide: any active emergency button or fire input, or a
software request (gatectl, later the cloud), opens every lane; it stays latched until all
inputs are released AND a reset is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from agent.gate.core import (
    EmergencyOn,
    EmergencyReset,
    Event,
    LinkLost,
    LinkRestored,
    Sensors,
    SensorsChanged,
)
from drivers.base import BoardSnapshot, InputPoint

log = logging.getLogger(__name__)


class Lane(Protocol):
    """What the monitor needs of a lane runner."""

    id: str
    board: str

    def handle(self, event: Event) -> object:
        """Step the lane's state machine with one event and carry out its actions."""

    def sensors_from(self, levels: Mapping[int, bool]) -> Sensors:
        """The lane's logical sensors in a snapshot of raw input levels."""


@dataclass(frozen=True)
class Latch:
    """Site emergency latch: which sources are active now and whether it is latched."""

    active: frozenset[str] = frozenset()
    latched: bool = False
    tripped_by: str | None = None


def latch_inputs(latch: Latch, active: frozenset[str]) -> tuple[Latch, str | None]:
    """New set of active physical sources; returns the source that trips it, if any."""
    newly = sorted(active - latch.active)
    if newly and not latch.latched:
        return Latch(active, True, newly[0]), newly[0]
    return Latch(active, latch.latched, latch.tripped_by), None


def latch_software(latch: Latch, source: str) -> tuple[Latch, bool]:
    """A software emergency request; returns whether it tripped the latch now."""
    if latch.latched:
        return latch, False
    return Latch(latch.active, True, source), True


def latch_reset(latch: Latch) -> tuple[Latch, str | None]:
    """Reset request; returns the refusal reason or None when the latch is released."""
    if not latch.latched:
        return latch, "not_latched"
    if latch.active:
        return latch, "emergency_input_active"
    return Latch(), None


@dataclass
class _BoardWatch:
    link_up: bool = False
    last_seen: float = 0.0
    sensors: dict[str, Sensors] = field(default_factory=dict)


class SafetyMonitor:
    """Owns the emergency latch and feeds safety events to the lanes."""

    def __init__(
        self,
        lanes: Iterable[Lane],
        safety_points: Mapping[str, list[tuple[str, InputPoint]]],
        stale_after_s: float,
        clock: Callable[[], float],
        on_latch: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self._lanes = list(lanes)
        self._by_board: dict[str, list[Lane]] = {}
        for lane in self._lanes:
            self._by_board.setdefault(lane.board, []).append(lane)
        self._points = dict(safety_points)
        self._stale_after = stale_after_s
        self._clock = clock
        self._on_latch = on_latch or (lambda _what, _source: None)
        self._queue: asyncio.Queue[BoardSnapshot] = asyncio.Queue()
        self._boards = {b: _BoardWatch() for b in {*self._by_board, *self._points}}
        self._active: dict[str, frozenset[str]] = {}
        self.latch = Latch()
        self.alive_at = clock()

    # --- inputs from the bus owners and the control socket --------------------------------

    def submit(self, snapshot: BoardSnapshot) -> None:
        """Called by a bus owner for every poll result; never blocks."""
        self._queue.put_nowait(snapshot)

    def request_emergency(self, source: str) -> bool:
        """Software emergency open (gatectl, cloud); returns whether it tripped now."""
        self.latch, tripped = latch_software(self.latch, source)
        if tripped:
            self._trip(source)
        return tripped

    def request_reset(self) -> str | None:
        """Reset the latch; returns the refusal reason, or None when every lane was reset."""
        self.latch, refusal = latch_reset(self.latch)
        if refusal is None:
            log.warning("emergency reset")
            self._on_latch("reset", None)
            self._each(self._lanes, EmergencyReset())
        return refusal

    # --- processing -----------------------------------------------------------------------

    def _each(self, lanes: Iterable[Lane], event: Event) -> None:
        for lane in lanes:
            # One lane's failure must never keep the others from their safety event.
            try:
                lane.handle(event)
            except Exception:
                log.exception("lane %s: failed to handle %s", lane.id, type(event).__name__)

    def _trip(self, source: str) -> None:
        log.error("EMERGENCY OPEN: %s", source)
        self._on_latch("trip", source)
        self._each(self._lanes, EmergencyOn(source))

    def process(self, snap: BoardSnapshot) -> None:
        """Apply one board snapshot: safety inputs first, then each lane's sensors."""
        watch = self._boards.setdefault(snap.board, _BoardWatch())
        lanes = self._by_board.get(snap.board, [])
        watch.last_seen = snap.at
        if not snap.link_up:
            if watch.link_up:
                watch.link_up = False
                self._each(lanes, LinkLost())
            return
        points = self._points.get(snap.board)
        if points is not None:
            active = frozenset(name for name, p in points if p.is_active(snap.levels))
            if active != self._active.get(snap.board, frozenset()):
                self._active[snap.board] = active
                all_active = frozenset().union(*self._active.values())
                self.latch, tripped = latch_inputs(self.latch, all_active)
                if tripped is not None:
                    self._trip(tripped)
        restored = not watch.link_up
        watch.link_up = True
        for lane in lanes:
            sensors = lane.sensors_from(snap.levels)
            if restored:
                watch.sensors[lane.id] = sensors
                self._each([lane], LinkRestored(sensors))
            elif watch.sensors.get(lane.id) != sensors:
                watch.sensors[lane.id] = sensors
                self._each([lane], SensorsChanged(sensors))

    def check_stale(self, now: float) -> None:
        """Treat a board that stopped reporting like a lost link."""
        for name, watch in self._boards.items():
            if watch.link_up and now - watch.last_seen > self._stale_after:
                log.error(
                    "board %s: no reports for %.2f s, treating as link lost",
                    name,
                    now - watch.last_seen,
                )
                self.process(BoardSnapshot(name, False, {}, now))

    async def run(self) -> None:
        """Process snapshots as they come and check staleness on a short timer."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that races with its result, which left this loop running after shutdown.
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    snap = await self._queue.get()
                self.process(snap)
                # Drain what queued meanwhile so a burst never delays the newest input.
                while not self._queue.empty():
                    self.process(self._queue.get_nowait())
            now = self._clock()
            self.check_stale(now)
            self.alive_at = now
