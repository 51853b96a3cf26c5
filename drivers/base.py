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


@dataclass(frozen=True)
class Credential:
    """Something a visitor presented at a reader, as the reader's driver hands it on.

    ``kind`` "qr": ``value`` is the decoded text (a plain code or a signed token).
    ``kind`` "idcard": ``value`` is the holder's keyed hash; the ID number itself never
    leaves the driver. ``detail`` carries reader facts without personal data (e.g. the
    card's validity dates).
    """

    kind: str
    value: str
    reader: str
    at: float
    detail: Mapping[str, object] = field(default_factory=dict)


CredentialListener = Callable[[Credential], None]
"""Called on the event loop for every credential read; must not block."""


class CredentialReader(Protocol):
    """A QR scanner, a camera or an ID-card reader: reads until cancelled, never raises."""

    name: str

    async def run(self, listener: CredentialListener) -> None:
        """Read credentials and hand each to ``listener`` until cancelled."""

    def stats(self) -> dict[str, object]:
        """Counters and state (connected, reads, errors) for status output."""
