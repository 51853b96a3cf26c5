"""Values the admission rules decide on: tickets, products, usage, blocks, and the decision.

Plain frozen dataclasses with no I/O, shared by the rules engine (``verify.rules``), the
offline cache (``offline_cache``) that stores them, and the daemon that wires them to lanes.
Times are Unix epoch seconds (UTC); "today" is the site's local calendar day.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal


def local_day(ts: float, utc_offset_s: int) -> str:
    """The site's local calendar date (YYYY-MM-DD) at epoch time ``ts``."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts + utc_offset_s))


TicketStatus = Literal["valid", "refunded", "revoked"]
Direction = Literal["entry", "exit"]


class Reason(StrEnum):
    """Stable reason codes shared by display, logs, events and the cloud (docs/reasons.md)."""

    OK = "ok"
    OK_EXIT = "ok_exit"
    BAD_CODE = "bad_code"
    BAD_SIGNATURE = "bad_signature"
    CARD_INVALID = "card_invalid"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    REFUNDED = "refunded"
    BLOCKED = "blocked"
    CLOCK_ERROR = "clock_error"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    TOO_EARLY = "too_early"
    TOO_LATE = "too_late"
    WRONG_ZONE = "wrong_zone"
    ZONE_USED_UP = "zone_used_up"
    DAILY_LIMIT = "daily_limit"
    TOTAL_LIMIT = "total_limit"
    NO_REENTRY = "no_reentry"
    REENTRY_TOO_SOON = "reentry_too_soon"
    ALREADY_INSIDE = "already_inside"
    ZONE_FULL = "zone_full"
    IN_USE = "in_use"
    ERROR = "error"


@dataclass(frozen=True)
class ReentryPolicy:
    """When a ticket that was used in a zone may enter it again (within its entry limits)."""

    mode: Literal["never", "after_exit", "after_minutes", "always"] = "after_exit"
    minutes: float = 0.0


@dataclass(frozen=True)
class Product:
    id: str
    name: str
    zones: Mapping[str, int | None]
    """Zone -> entries allowed in it (None: only the ticket's own limits apply). A combo
    "park + cable car" ticket is one product with two zones."""
    reentry: ReentryPolicy | None = None
    """Overrides the site's re-entry policy for this product."""
    slot_grace_before_s: float | None = None
    slot_grace_after_s: float | None = None
    version: int = 0


@dataclass(frozen=True)
class Ticket:
    id: str
    code: str
    """The code as issued by the sales channel (what the QR holds for a plain code)."""
    channel: str
    product_id: str
    valid_from: float
    valid_to: float
    slot_start: float | None = None
    slot_end: float | None = None
    max_entries_per_day: int | None = None
    max_entries_total: int | None = None
    status: TicketStatus = "valid"
    holder_hash: str | None = None
    """HMAC-SHA256 of the holder's ID number with the site key; never the number itself."""
    version: int = 0


@dataclass(frozen=True)
class Usage:
    """One ticket's use of one zone."""

    entries: int = 0
    entries_today: int = 0
    day: str | None = None
    """Local date (YYYY-MM-DD) that entries_today counts."""
    last_entry_at: float | None = None
    last_exit_at: float | None = None
    inside: bool = False
    last_lane: str | None = None


@dataclass(frozen=True)
class Block:
    kind: Literal["ticket", "holder", "face"]
    value: str
    reason: str = ""
    until: float | None = None


@dataclass(frozen=True)
class Policy:
    """Site-wide admission settings (products may override slot grace and re-entry)."""

    slot_grace_before_s: float = 600.0
    slot_grace_after_s: float = 600.0
    reentry: ReentryPolicy = ReentryPolicy()
    anti_passback: bool = True
    clock_tolerance_s: float = 300.0
    utc_offset_s: int = 8 * 3600
    """Offset of the site's local day from UTC (China Standard Time has no DST)."""


@dataclass(frozen=True)
class Point:
    """Where a credential is presented: a lane, the zone it leads into, the direction."""

    lane: str
    zone: str
    direction: Direction = "entry"


@dataclass(frozen=True)
class Situation:
    """Everything the rules need about one credential, gathered by the cache."""

    ticket: Ticket | None
    product: Product | None = None
    usage: Usage = Usage()
    """Committed use of the point's zone."""
    held: int = 0
    """Entries reserved by other lanes and not yet committed, in this zone."""
    ticket_entries: int = 0
    """Committed entries of this ticket across all its zones."""
    ticket_entries_today: int = 0
    blocks: tuple[Block, ...] = ()
    occupancy: int = 0
    capacity: int | None = None
    cloud_time: float | None = None
    """The latest time the cloud told us; the device clock must not be before it."""


@dataclass(frozen=True)
class Step:
    """One rule as the engine saw it, for ``gatectl cache lookup``."""

    rule: str
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: Reason
    ticket_id: str | None = None
    zone: str | None = None
    remaining: int | None = None
    """Entries left after this one: the smallest of the zone's, today's and the ticket's
    total allowance (None: no limit applies)."""
    prompt_zh: str = ""
    prompt_en: str = ""
    steps: tuple[Step, ...] = field(default=(), compare=False)
