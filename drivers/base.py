"""The small interfaces between the daemon and whatever drives the turnstile hardware.

The gate safety core and the lane runners know only these types; which bus or vendor
protocol sits behind them is chosen by the configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol


class DriverError(Exception):
    """Base of the errors a driver raises to the daemon."""


@dataclass(frozen=True)
class InputPoint:
    """One discrete input and the electrical level that means "active"."""

    address: int
    active_low: bool = False

    def is_active(self, levels: Mapping[int, bool]) -> bool:
        """Whether the input is active in a snapshot of raw levels."""
        return levels.get(self.address, False) != self.active_low


@dataclass(frozen=True)
class BoardSnapshot:
    """What one poll of one I/O board saw: raw input levels by address, or a lost link."""

    board: str
    link_up: bool
    levels: Mapping[int, bool] = field(default_factory=dict)
    at: float = 0.0
    """Monotonic time of the read (or of the moment the link was declared lost)."""


SnapshotListener = Callable[[BoardSnapshot], None]
"""Called from the bus owner's task for every poll result; must not block."""


class BoardOutputs(Protocol):
    """The outputs of one I/O board as a lane runner drives them."""

    name: str

    def set_coils(self, coils: Mapping[int, bool]) -> None:
        """Ask for these coil states; the bus owner writes them at once. Never blocks."""


class Bus(Protocol):
    """The one owner of a field bus: polls its boards, writes their outputs, reconnects."""

    name: str

    def board(self, name: str) -> BoardOutputs:
        """The outputs of one board on this bus."""

    async def run(self) -> None:
        """Poll and write until cancelled; never raises on bus faults."""

    def stats(self) -> dict[str, object]:
        """Counters and link state for status output."""
