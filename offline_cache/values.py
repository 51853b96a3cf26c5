"""Values the cache hands out: reservations and the results of sync and import operations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from verify.model import Direction


@dataclass(frozen=True)
class Reservation:
    """An entry (or exit) held for one lane between ``reserve`` and ``commit``/``abort``."""

    id: str
    """UUIDv7; also the authorisation id the lane unlocks with and reports its passage by."""
    ticket_id: str
    zone: str
    lane: str
    direction: Direction
    at: float


class Hold:
    """A reservation as the cache tracks it: the writer marks it done once the commit is durable."""

    __slots__ = ("committing", "done", "reservation")

    def __init__(self, reservation: Reservation) -> None:
        self.reservation = reservation
        self.committing = False
        self.done = False


class Problem(NamedTuple):
    """A rejected record and why: its line (import) or 1-based record number (snapshot,
    delta; upserts first, then deletes); 0 when no single record is to blame."""

    line: int
    reason: str


SnapshotStatus = Literal["applied", "duplicate", "stale", "rejected"]
DeltaStatus = Literal["applied", "duplicate", "gap"]


@dataclass(frozen=True)
class SnapshotResult:
    """What ``apply_snapshot`` did."""

    status: SnapshotStatus
    """applied; duplicate (this version is already current); stale (older than current);
    rejected (too many bad records: the old tickets stay in force)."""
    version: int
    """The tickets version in force afterwards."""
    tickets: int = 0
    rejected: int = 0
    problems: tuple[Problem, ...] = ()
    seconds: float = 0.0


@dataclass(frozen=True)
class DeltaResult:
    """What ``apply_delta`` did."""

    status: DeltaStatus
    """applied; duplicate (already had it: nothing done); gap (versions missing in between:
    nothing done, request a snapshot)."""
    kind: str
    version: int
    """This kind's version in force afterwards."""
    upserted: int = 0
    deleted: int = 0
    rejected: int = 0
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True)
class ImportResult:
    """Rows written per type by ``import_records``, and the lines it rejected."""

    tickets: int = 0
    products: int = 0
    blocks: int = 0
    zones: int = 0
    rejected: int = 0
    problems: tuple[Problem, ...] = ()
    """The first problems, by line number (at most 100; ``rejected`` counts them all)."""


@dataclass(frozen=True)
class ValidatedChunk:
    """Snapshot rows already validated elsewhere (e.g. in a worker process), with the number
    of records that failed validation and the first problems (numbered within the chunk)."""

    rows: list[tuple[Any, ...]]
    records: int
    problems: tuple[Problem, ...] = ()
