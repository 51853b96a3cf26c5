"""Validation of incoming records (cloud snapshots and deltas, installer imports) into rows.

Every function either returns a row tuple ready for SQL or raises ``RecordError`` whose
message names the field and what was expected, never the value: a value may be personal.
Unknown keys are ignored, so a newer cloud can add fields without breaking older gates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from offline_cache.errors import RecordError
from offline_cache.privacy import holder_hash, is_holder_hash
from verify.model import Product, ReentryPolicy

MAX_ID = 200
MAX_CODE = 4096
"""Longest ticket code stored or looked up; longer credentials are signed tokens, not codes."""
MAX_TEXT = 200
STATUSES = ("valid", "refunded", "revoked")
BLOCK_KINDS = ("ticket", "holder", "face")
REENTRY_MODES = ("never", "after_exit", "after_minutes", "always")

TicketRow = tuple[
    str, str, str, str, float, float, float | None, float | None, int | None, int | None,
    str, str | None, int,
]  # fmt: skip
ProductRow = tuple[str, str, str, str | None, float | None, float | None, int]
BlockRow = tuple[str, str, str, float | None, int]
ZoneRow = tuple[str, int | None]
SyncKind = Literal["tickets", "products", "blocks"]


def _mapping(rec: object) -> Mapping[str, Any]:
    if not isinstance(rec, Mapping):
        raise RecordError("record: expected a JSON object")
    return rec


def _text(rec: Mapping[str, Any], name: str, max_len: int = MAX_ID) -> str:
    value = rec.get(name)
    if not isinstance(value, str) or not value:
        raise RecordError(f"{name}: expected non-empty text")
    if len(value) > max_len:
        raise RecordError(f"{name}: longer than {max_len} characters")
    if "\x00" in value:
        raise RecordError(f"{name}: contains a NUL character")
    return value


def _opt_text(rec: Mapping[str, Any], name: str, default: str = "") -> str:
    value = rec.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise RecordError(f"{name}: expected text up to {MAX_TEXT} characters")
    return value


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"{name}: expected a number")
    result = float(value)
    if not math.isfinite(result):
        raise RecordError(f"{name}: expected a finite number")
    return result


def parse_time(value: object, name: str, utc_offset_s: int) -> float:
    """Epoch seconds from a number or an ISO-8601 text (no zone given: the site's local time)."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise RecordError(f"{name}: expected epoch seconds or an ISO-8601 time") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone(timedelta(seconds=utc_offset_s)))
        return parsed.timestamp()
    try:
        return _number(value, name)
    except RecordError:
        raise RecordError(f"{name}: expected epoch seconds or an ISO-8601 time") from None


def _opt_time(rec: Mapping[str, Any], name: str, utc_offset_s: int) -> float | None:
    value = rec.get(name)
    return None if value is None else parse_time(value, name, utc_offset_s)


def _count(rec: Mapping[str, Any], name: str, default: int | None = None) -> int | None:
    value = rec.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
        raise RecordError(f"{name}: expected a whole number >= 0")
    return value


def _version(rec: Mapping[str, Any]) -> int:
    version = _count(rec, "version", 0)
    return 0 if version is None else version


def _holder(rec: Mapping[str, Any], key: bytes | None, field: str = "holder_hash") -> str | None:
    """The holder binding as a hash: given ready-made, or hashed here from ``holder_id``."""
    given, identifier = rec.get(field), rec.get("holder_id")
    if given is not None and identifier is not None:
        raise RecordError(f"give {field} or holder_id, not both")
    if identifier is not None:
        if key is None:
            raise RecordError("holder_id: no site key is configured to hash it with")
        try:
            return holder_hash(key, identifier)
        except ValueError as exc:
            raise RecordError(f"holder_id: {exc}") from None
    if given is None:
        return None
    if not is_holder_hash(given):
        raise RecordError(f"{field}: expected 64 lowercase hex digits (HMAC-SHA256)")
    return str(given)


def ticket_row(rec: object, *, key: bytes | None, utc_offset_s: int) -> TicketRow:
    """Validate one ticket; ``holder_id`` (if any) is hashed at once and dropped."""
    r = _mapping(rec)
    valid_from = parse_time(r.get("valid_from"), "valid_from", utc_offset_s)
    valid_to = parse_time(r.get("valid_to"), "valid_to", utc_offset_s)
    if valid_to < valid_from:
        raise RecordError("valid_to: earlier than valid_from")
    slot_start = _opt_time(r, "slot_start", utc_offset_s)
    slot_end = _opt_time(r, "slot_end", utc_offset_s)
    if slot_start is not None and slot_end is not None and slot_end < slot_start:
        raise RecordError("slot_end: earlier than slot_start")
    status = r.get("status", "valid")
    if status not in STATUSES:
        raise RecordError(f"status: expected one of {', '.join(STATUSES)}")
    return (
        _text(r, "id"),
        _text(r, "code", MAX_CODE),
        _opt_text(r, "channel"),
        _text(r, "product_id"),
        valid_from,
        valid_to,
        slot_start,
        slot_end,
        _count(r, "max_entries_per_day"),
        _count(r, "max_entries_total"),
        str(status),
        _holder(r, key),
        _version(r),
    )


def product_row(rec: object) -> ProductRow:
    """Validate one product: zones map zone -> entries allowed there (null: no own limit)."""
    r = _mapping(rec)
    zones = r.get("zones")
    if isinstance(zones, list) and all(isinstance(z, str) for z in zones):
        zones = dict.fromkeys(zones)
    if not isinstance(zones, Mapping) or not zones:
        raise RecordError("zones: expected a non-empty object of zone -> entries (or null)")
    clean: dict[str, int | None] = {}
    for zone, limit in zones.items():
        if not isinstance(zone, str) or not zone or len(zone) > MAX_ID:
            raise RecordError("zones: zone names must be non-empty text")
        clean[zone] = _count({"n": limit}, "n")
    reentry = r.get("reentry")
    reentry_json = None
    if reentry is not None:
        if not isinstance(reentry, Mapping) or reentry.get("mode") not in REENTRY_MODES:
            raise RecordError(f"reentry.mode: expected one of {', '.join(REENTRY_MODES)}")
        minutes = _number(reentry.get("minutes", 0.0), "reentry.minutes")
        if minutes < 0:
            raise RecordError("reentry.minutes: expected a number >= 0")
        reentry_json = json.dumps({"mode": reentry["mode"], "minutes": minutes})
    graces = []
    for name in ("slot_grace_before_s", "slot_grace_after_s"):
        value = r.get(name)
        grace = None if value is None else _number(value, name)
        if grace is not None and grace < 0:
            raise RecordError(f"{name}: expected a number >= 0")
        graces.append(grace)
    return (
        _text(r, "id"),
        _opt_text(r, "name"),
        json.dumps(clean, sort_keys=True),
        reentry_json,
        graces[0],
        graces[1],
        _version(r),
    )


def product_from_row(row: tuple[Any, ...]) -> Product:
    """The model's Product from a products row (zones read-only)."""
    pid, name, zones, reentry, before, after, version = row
    policy = None
    if reentry is not None:
        parsed = json.loads(reentry)
        policy = ReentryPolicy(parsed["mode"], float(parsed["minutes"]))
    return Product(
        id=pid,
        name=name,
        zones=MappingProxyType(json.loads(zones)),
        reentry=policy,
        slot_grace_before_s=before,
        slot_grace_after_s=after,
        version=version,
    )


def block_key(rec: object, *, key: bytes | None) -> tuple[str, str]:
    """(kind, value) of a block; a holder block may give ``holder_id`` instead of the hash."""
    r = _mapping(rec)
    kind = r.get("kind")
    if kind not in BLOCK_KINDS:
        raise RecordError(f"kind: expected one of {', '.join(BLOCK_KINDS)}")
    if kind == "holder":
        value = _holder(r, key, "value")
        if value is None:
            raise RecordError("value: expected the holder hash (or holder_id)")
        return "holder", value
    if "holder_id" in r:
        raise RecordError("holder_id: only a holder block takes one")
    return str(kind), _text(r, "value")


def block_row(rec: object, *, key: bytes | None, utc_offset_s: int) -> BlockRow:
    """Validate one block (ticket id, holder hash or face id; reason; until)."""
    kind, value = block_key(rec, key=key)
    r = _mapping(rec)
    return kind, value, _opt_text(r, "reason"), _opt_time(r, "until", utc_offset_s), _version(r)


def zone_row(rec: object) -> ZoneRow:
    """Validate a zone record: its name and capacity (null: no cap)."""
    r = _mapping(rec)
    return _text(r, "zone"), _count(r, "capacity")


def delete_key(kind: SyncKind, rec: object, *, key: bytes | None) -> tuple[str, ...]:
    """The primary key a delta deletes: a ticket or product id, or a block's (kind, value)."""
    if kind == "blocks":
        return block_key(rec, key=key)
    if isinstance(rec, str):
        rec = {"id": rec}
    return (_text(_mapping(rec), "id"),)


def read_json_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line number, record, "") for each record of a JSON-lines file (the ``gatectl cache
    import`` format), or (line number, None, why) for a line that is not a JSON object.
    Blank lines and ``#`` comments are skipped, as ``Cache.import_records`` skips them."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, None, f"not JSON ({exc.msg})"
                continue
            if isinstance(record, dict):
                yield n, record, ""
            else:
                yield n, None, "not a JSON object"
