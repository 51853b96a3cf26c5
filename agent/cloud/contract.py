"""The MQTT contract between a gate and its site cloud: topics and message models.

docs/mqtt.md is written from these models (its JSON Schemas are generated from them and a test
keeps them in step), so a cloud team can build the other side from the document alone.
Downlink models forbid unknown fields: a message the gate does not fully understand is
refused, never half-applied.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

PREFIX = "gate/v1"
MAX_CHUNK_TICKETS = 5000
"""Bounds the memory and the time one snapshot chunk takes to check (in the worker process)."""
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"

UP_KINDS = ("events", "status", "telemetry", "cmd/ack", "resync")
SITE_DOWN_KINDS = ("tickets", "blocklist", "keys", "faces")


def up_topic(site: str, gate: str, kind: str) -> str:
    """A gate's uplink topic: events, status, telemetry, cmd/ack or resync."""
    assert kind in UP_KINDS
    return f"{PREFIX}/{site}/{gate}/{kind}"


def parse_up_topic(topic: str) -> tuple[str, str] | None:
    """(gate, kind) of an uplink topic ``gate/v1/{site}/{gate}/{kind}``, or None."""
    parts = topic.split("/")
    if len(parts) < 5:
        return None
    return parts[3], "/".join(parts[4:])


def down_topics(site: str, gate: str) -> dict[str, str]:
    """Every downlink topic a gate subscribes to, by kind."""
    topics = {kind: f"{PREFIX}/{site}/{kind}" for kind in SITE_DOWN_KINDS}
    topics["cmd"] = f"{PREFIX}/{site}/{gate}/cmd"
    topics["all_cmd"] = f"{PREFIX}/{site}/all/cmd"
    return topics


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- downlink --------------------------------------------------------------------------------


class Envelope(_Strict):
    """What travels on every downlink topic: a signed payload and who signed it."""

    v: Literal[1] = Field(description="envelope version")
    kid: str = Field(
        pattern=r"^[0-9a-f]{16}$",
        description="key id: first 8 bytes of SHA-256 of the signing public key, hex",
    )
    payload: str = Field(description="the signed JSON text (a SignedPayload), as a string")
    sig: str = Field(
        pattern=r"^[A-Za-z0-9+/]{86}==$",
        description="Ed25519 signature of 'gate/v1 downlink\\n' + payload (UTF-8), base64",
    )


class SignedPayload(_Strict):
    """The signed part: where it may be applied, once, and until when."""

    topic: str = Field(description="the exact topic this message must arrive on")
    nonce: str = Field(
        min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="unique per message"
    )
    iat: float = Field(description="issued at, epoch seconds")
    exp: float = Field(description="refused after this, epoch seconds")
    body: dict[str, Any] = Field(description="the message for this topic (see its schema)")


# Commands (gate/v1/{site}/{gate}/cmd and gate/v1/{site}/all/cmd)


class OpenCmd(_Strict):
    cmd: Literal["open"]
    lane: str = Field(pattern=NAME)
    direction: Literal["entry", "exit"] = "entry"


class EmergencyCmd(_Strict):
    cmd: Literal["emergency"]
    action: Literal["on", "reset"]


class LaneSwitchCmd(_Strict):
    cmd: Literal["lockout", "hold_open"]
    lane: str = Field(
        pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9_.-]{0,31})$",
        description="a lane id, or * for every lane",
    )
    on: bool


class ZoneCapacityCmd(_Strict):
    cmd: Literal["zone_capacity"]
    zone: str = Field(pattern=NAME)
    capacity: int | None = Field(ge=1, description="null lifts the cap")


SyncKindName = Literal["tickets", "products", "blocks", "keys"]


def _every_kind() -> list[SyncKindName]:
    return ["tickets", "products", "blocks", "keys"]


class ResyncCmd(_Strict):
    cmd: Literal["resync"]
    kinds: list[SyncKindName] = Field(default_factory=_every_kind)


class ConfigReloadCmd(_Strict):
    cmd: Literal["config_reload"]


Command = Annotated[
    OpenCmd | EmergencyCmd | LaneSwitchCmd | ZoneCapacityCmd | ResyncCmd | ConfigReloadCmd,
    Field(discriminator="cmd"),
]


# Tickets and products (gate/v1/{site}/tickets)


class TicketsDelta(_Strict):
    op: Literal["delta"]
    kind: Literal["tickets", "products"]
    from_version: int = Field(ge=0, description="applies to a gate holding from_version..to-1")
    to_version: int = Field(ge=1)
    upserts: list[dict[str, Any]] = Field(default_factory=list, description="records")
    deletes: list[str] = Field(default_factory=list, description="ids to delete")


class TicketsSnapshot(_Strict):
    op: Literal["snapshot"]
    snapshot: str = Field(min_length=1, max_length=64, description="id shared by all its chunks")
    version: int = Field(ge=1, description="tickets version after the snapshot")
    index: int = Field(ge=0, description="chunk number, from 0")
    count: int = Field(ge=1, le=100_000, description="chunks in this snapshot")
    products: list[dict[str, Any]] | None = Field(
        None, description="chunk 0 only: every product (replaces all), applied first"
    )
    products_version: int | None = Field(None, ge=1, description="with products")
    tickets: list[dict[str, Any]] = Field(
        max_length=MAX_CHUNK_TICKETS,
        description="ticket records of this chunk, at most 5,000",
    )


TicketsBody = Annotated[TicketsDelta | TicketsSnapshot, Field(discriminator="op")]


# Blocklist (gate/v1/{site}/blocklist)


class BlocklistDelta(_Strict):
    op: Literal["delta"]
    from_version: int = Field(ge=0)
    to_version: int = Field(ge=1)
    upserts: list[dict[str, Any]] = Field(default_factory=list, description="block records")
    deletes: list[dict[str, Any]] = Field(default_factory=list, description="{kind, value}")


class BlocklistReplace(_Strict):
    op: Literal["replace"]
    version: int = Field(ge=1)
    blocks: list[dict[str, Any]] = Field(description="every block in force")


BlocklistBody = Annotated[BlocklistDelta | BlocklistReplace, Field(discriminator="op")]


# Issuer keys for signed (GT1) tickets (gate/v1/{site}/keys, retained)


class IssuerKey(_Strict):
    issuer: str = Field(min_length=1, max_length=100)
    public_key: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    not_before: float | None = None
    not_after: float | None = None


class KeysBody(_Strict):
    version: int = Field(ge=1, description="a gate applies only a newer version")
    keys: list[IssuerKey] = Field(max_length=64, description="every issuer key in force")


# Faces (gate/v1/{site}/faces): enrolment deltas, applied once faces are built


class FacesBody(_Strict):
    op: Literal["delta"]
    from_version: int = Field(ge=0)
    to_version: int = Field(ge=1)
    upserts: list[dict[str, Any]] = Field(default_factory=list)
    deletes: list[str] = Field(default_factory=list)


# --- uplink ----------------------------------------------------------------------------------


class UpEvent(_Strict):
    seq: int = Field(ge=1, description="gap-free per gate")
    id: str = Field(description="UUIDv7, stable across redeliveries: de-duplicate by it")
    ts: float = Field(description="epoch seconds at the gate")
    kind: str
    lane: str | None
    data: dict[str, Any]
    prev_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256(prev_hash bytes + canonical)")


class EventsMessage(_Strict):
    v: Literal[1]
    site: str
    gate: str
    events: list[UpEvent] = Field(min_length=1, description="consecutive seqs, oldest first")


class OutboxState(_Strict):
    depth: int = Field(ge=0, description="events not yet acknowledged by the broker")
    oldest_age_s: float | None = Field(description="age of the oldest unsent event")
    last_seq: int = Field(ge=0)


class LaneState(_Strict):
    id: str
    mode: str


class StatusMessage(_Strict):
    v: Literal[1]
    site: str
    gate: str
    state: Literal["online", "offline"]
    at: float
    reason: str | None = Field(None, description="offline: shutdown or lost (Last Will)")
    agent_version: str | None = None
    versions: dict[str, int] = Field(
        default_factory=dict, description="tickets, products, blocks, keys in force"
    )
    config: str | None = Field(None, description="SHA-256 of the config file, hex (first 16)")
    lanes: list[LaneState] = Field(default_factory=list)
    emergency: bool | None = None
    outbox: OutboxState | None = None
    downlink_rejected: dict[str, int] = Field(
        default_factory=dict, description="downlink messages refused since start, by reason"
    )


class LaneCounts(_Strict):
    decisions: dict[str, int] = Field(description="reason code -> decisions in the interval")
    reports: dict[str, int] = Field(
        description="lane report kind -> reports in the interval: unlocked, passage, "
        "not_passed, tailgating, forced_passage, ... (event kinds)"
    )


class TelemetryMessage(_Strict):
    v: Literal[1]
    site: str
    gate: str
    at: float
    interval_s: float
    lanes: dict[str, LaneCounts]
    zones: dict[str, dict[str, int | None]] = Field(description="zone -> occupancy, capacity")


class AckMessage(_Strict):
    v: Literal[1]
    site: str
    gate: str
    nonce: str
    cmd: str
    ok: bool
    error: str | None = None
    message: str | None = None
    at: float


class ResyncRequest(_Strict):
    v: Literal[1]
    site: str
    gate: str
    kind: Literal["tickets", "products", "blocks", "keys"]
    have: int = Field(ge=0, description="version the gate holds")
    reason: Literal["gap", "snapshot_incomplete", "command", "rejected"]
    at: float


_COMMAND: TypeAdapter[Any] = TypeAdapter(Command)

DOWN_BODIES: dict[str, TypeAdapter[Any]] = {
    "cmd": _COMMAND,
    "all_cmd": _COMMAND,
    "tickets": TypeAdapter(TicketsBody),
    "blocklist": TypeAdapter(BlocklistBody),
    "keys": TypeAdapter(KeysBody),
    "faces": TypeAdapter(FacesBody),
}
"""The body model of each downlink kind (validate with ``.validate_python``)."""

UP_MESSAGES: dict[str, type[_Strict]] = {
    "events": EventsMessage,
    "status": StatusMessage,
    "telemetry": TelemetryMessage,
    "cmd/ack": AckMessage,
    "resync": ResyncRequest,
}
