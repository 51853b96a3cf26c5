"""Site configuration: TOML validated by pydantic, with errors that point at the key.

Every model forbids unknown keys, and every field has bounds and a description. Cross
references (a lane's board, a board's bus, address collisions) are checked after the
field validation so that each error still names its key path.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.gate.core import Direction, Timing
from drivers.base import InputPoint
from drivers.presets import BoardPreset, InputSpec, load_preset

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, path: str, errors: list[str]) -> None:
        super().__init__(f"{path}: {len(errors)} error(s)")
        self.path = path
        self.errors = errors


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteConfig(_Model):
    id: str = Field(pattern=NAME, description="site (scenic area / park) identifier")
    gate_id: str = Field(pattern=NAME, description="this controller's identifier within the site")

    @model_validator(mode="after")
    def _not_all(self) -> SiteConfig:
        if self.gate_id == "all":
            raise ValueError("gate_id 'all' is reserved: gate/v1/{site}/all/cmd reaches every gate")
        return self


class DaemonConfig(_Model):
    state_dir: Path = Field(
        Path("/var/lib/gate-agent"), description="durable state: event store, later the cache"
    )
    control_socket: Path = Field(
        Path("/run/gate-agent/control.sock"), description="Unix socket for gatectl"
    )
    control_group: str | None = Field(
        None, description="group allowed to use gatectl (socket mode 0660); None keeps ours"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    log_format: Literal["json", "text"] = Field("json", description="json for journald")
    ready_timeout_s: float = Field(
        5.0, ge=0.5, le=60, description="report READY after this even if a board is still down"
    )


class _BusBase(_Model):
    name: str = Field(pattern=NAME, description="bus name that boards refer to")
    poll_hz: float = Field(100.0, ge=50, le=1000, description="input polls per second")
    timeout_s: float = Field(0.1, ge=0.01, le=0.5, description="reply timeout per request")
    link_timeout_s: float = Field(
        0.5, ge=0.05, le=0.8, description="no good reply for this long = link lost (fault < 1 s)"
    )
    reconnect_max_s: float = Field(5.0, ge=0.1, le=60, description="longest reconnect backoff")


class ModbusTcpBusConfig(_BusBase):
    type: Literal["modbus-tcp"]
    host: str = Field(min_length=1, description="board or gateway address")
    port: int = Field(502, ge=1, le=65535)


class ModbusRtuBusConfig(_BusBase):
    type: Literal["modbus-rtu"]
    port: str = Field(min_length=1, description="serial device, e.g. /dev/ttyS1")
    baudrate: int = Field(115200, ge=1200, le=921600)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8


BusConfig = Annotated[ModbusTcpBusConfig | ModbusRtuBusConfig, Field(discriminator="type")]


class BoardConfig(_Model):
    name: str = Field(pattern=NAME, description="board name that lanes refer to")
    bus: str = Field(description="name of the bus the board is on")
    unit_id: int = Field(ge=1, le=247, description="Modbus unit (slave) id")
    preset: str = Field(description="register map: config/boards/NAME.toml or a file path")
    watchdog_ms: int = Field(
        1000, ge=0, le=60000, description="board communication watchdog (0 = off)"
    )


class LaneIOOverride(_Model):
    """Explicit addresses that replace the preset's for one lane."""

    unlock_entry_coil: int | None = Field(None, ge=0, le=65535)
    unlock_exit_coil: int | None = Field(None, ge=0, le=65535)
    alarm_coil: int | None = Field(None, ge=0, le=65535)
    sensor_entry_side: InputSpec | None = None
    sensor_exit_side: InputSpec | None = None
    obstruction: InputSpec | None = None


class _ReaderBase(_Model):
    name: str = Field("", max_length=32, description="reader name in logs and status")
    direction: Literal["entry", "exit"] = Field(
        "entry", description="the direction a credential read here opens"
    )


class QrSerialReaderConfig(_ReaderBase):
    type: Literal["qr-serial"]
    port: str = Field(min_length=1, description="e.g. /dev/serial/by-id/... or socket://h:p")
    baudrate: int = Field(9600, ge=1200, le=921600)
    terminator: Literal["CR", "LF", "CRLF"] = Field("CR", description="what ends each code")
    prefix: str = Field("", max_length=16, description="stripped from each code if present")
    suffix: str = Field("", max_length=16, description="stripped from each code if present")
    max_length: int = Field(2048, ge=16, le=4096, description="longer lines are rejected")
    debounce_s: float = Field(1.0, ge=0, le=10, description="same code again ignored this long")


class CameraReaderConfig(_ReaderBase):
    type: Literal["camera"]
    source: str | int = Field(
        description="V4L2 index or /dev/v4l/by-id path, rtsp:// or http:// URL, video or folder"
    )
    max_fps: float = Field(10, gt=0, le=30, description="frames decoded per second at most")
    scan_density: int = Field(1, ge=1, le=4, description="2 halves decode time, small codes")


class IdCardReaderConfig(_ReaderBase):
    type: Literal["idcard"]
    port: str = Field(min_length=1, description="serial device of the SAM reader")
    baudrate: int = Field(115200, ge=9600, le=921600)
    poll_s: float = Field(0.2, ge=0.05, le=2, description="card detection interval")
    reread_after_s: float = Field(10, ge=1, le=600, description="a card left on is read again")


ReaderConfig = Annotated[
    QrSerialReaderConfig | CameraReaderConfig | IdCardReaderConfig, Field(discriminator="type")
]


class LaneConfig(_Model):
    id: str = Field(pattern=NAME, description="lane id used by gatectl, events and the cloud")
    board: str = Field(description="name of the board the lane is wired to")
    channel: int = Field(ge=1, le=64, description="channel of the lane on its board (1-based)")
    fail_state: Literal["open", "locked"] = Field(
        description="what the lane does when the daemon loses its board: a fire-code decision"
    )
    unlock_timeout_s: float = Field(8.0, ge=1, le=120, description="unlock to first beam")
    passage_timeout_s: float = Field(10.0, ge=1, le=300, description="first beam to clear")
    close_time_s: float = Field(1.0, ge=0.1, le=10, description="time the arm/flap takes to close")
    alarm_s: float = Field(3.0, ge=0.5, le=300, description="how long an alarm sounds")
    zone: str = Field(
        "park", pattern=NAME, description="zone an entry through this lane leads into"
    )
    io: LaneIOOverride = LaneIOOverride()
    readers: list[ReaderConfig] = Field(
        default_factory=list, description="QR scanners, cameras, ID-card readers of this lane"
    )

    def timing(self) -> Timing:
        return Timing(
            unlock_timeout_s=self.unlock_timeout_s,
            passage_timeout_s=self.passage_timeout_s,
            close_time_s=self.close_time_s,
            alarm_s=self.alarm_s,
            fail_state=self.fail_state,
        )


class SafetyInputConfig(_Model):
    kind: Literal["emergency_button", "fire"]
    board: str = Field(description="board the input is wired to")
    input: InputSpec | None = Field(None, description="address/polarity if not the preset's")


class SafetyConfig(_Model):
    inputs: list[SafetyInputConfig] = Field(
        default_factory=list, description="emergency buttons and fire inputs; any opens all lanes"
    )


class AdmissionConfig(_Model):
    """Site-wide admission rules (products may override slot grace and re-entry)."""

    slot_grace_before_s: float = Field(600, ge=0, le=86400, description="early entry allowed")
    slot_grace_after_s: float = Field(600, ge=0, le=86400, description="late entry allowed")
    reentry: Literal["never", "after_exit", "after_minutes", "always"] = Field(
        "after_exit", description="when a used ticket may enter the same zone again"
    )
    reentry_minutes: float = Field(30, ge=0, le=10080, description="for reentry=after_minutes")
    anti_passback: bool = Field(True, description="refuse a ticket already inside the zone")
    clock_tolerance_s: float = Field(
        300, ge=0, le=86400, description="device clock may lag the cloud's by this much"
    )
    utc_offset_hours: float = Field(8, ge=-12, le=14, description="site's local day vs UTC")
    holder_key_file: Path | None = Field(
        None, description="root-only file with the site key for ID-number hashes (>= 32 bytes)"
    )
    max_events: int = Field(
        1_000_000, ge=1000, description="outbox size that raises an alarm at 80 % (never drops)"
    )


class TrustedKeyConfig(_Model):
    """An issuer's Ed25519 public key for signed (GT1) tickets; several allow rotation."""

    issuer: str = Field(min_length=1, max_length=100, description="the site that signs")
    public_key: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="32-byte key, hex")
    not_before: float | None = Field(None, description="epoch seconds the key becomes valid")
    not_after: float | None = Field(None, description="epoch seconds the key stops verifying")


class CloudKeyConfig(_Model):
    """A site cloud's Ed25519 public key that signs every downlink message."""

    public_key: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="32-byte key, hex")
    not_before: float | None = Field(None, description="epoch seconds the key becomes valid")
    not_after: float | None = Field(None, description="epoch seconds the key stops verifying")


class CloudConfig(_Model):
    """The site's MQTT broker and the keys its cloud signs with (docs/mqtt.md)."""

    host: str = Field(min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="8883 is usual with TLS")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT version; 3.1.1 as a fallback")
    client_id: str = Field(
        "", max_length=64, description="MQTT client id; empty: gate-{site}-{gate_id}"
    )
    tls: bool = Field(False, description="connect with TLS")
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's cert")
    cert_file: Path | None = Field(None, description="client certificate (PEM), if required")
    key_file: Path | None = Field(None, description="client private key (PEM), root-only")
    username: str | None = Field(None, max_length=256, description="MQTT user name")
    password_file: Path | None = Field(None, description="file holding the MQTT password")
    keepalive_s: int = Field(15, ge=2, le=600, description="a silent link is noticed in 1.5x")
    session_expiry_s: int = Field(
        7 * 86400, ge=0, le=2**32 - 1, description="broker keeps our session this long offline"
    )
    connect_timeout_s: float = Field(10, ge=1, le=120, description="TCP + CONNACK")
    reconnect_min_s: float = Field(0.5, ge=0.05, le=60, description="first retry delay")
    reconnect_max_s: float = Field(60, ge=1, le=3600, description="longest retry delay")
    batch_events: int = Field(200, ge=1, le=5000, description="events per uplink message")
    batch_bytes: int = Field(
        256 * 1024, ge=4096, le=4 * 1024 * 1024, description="bytes per uplink message at most"
    )
    inflight: int = Field(20, ge=1, le=200, description="uplink messages awaiting PUBACK")
    status_interval_s: float = Field(30, ge=1, le=3600, description="status refresh")
    telemetry_interval_s: float = Field(60, ge=1, le=3600, description="telemetry period")
    max_message_bytes: int = Field(
        8 * 1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024, description="larger downlink refused"
    )
    max_lifetime_s: float = Field(
        7 * 86400, ge=60, le=30 * 86400, description="longest exp - iat a message may claim"
    )
    trust_anchors: list[CloudKeyConfig] = Field(
        min_length=1, description="the site cloud's signing keys; several during a rotation"
    )

    @model_validator(mode="after")
    def _pairs(self) -> CloudConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs a username")
        if (self.cert_file or self.ca_file) and not self.tls:
            raise ValueError("ca_file and cert_file need tls = true")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must not be below reconnect_min_s")
        return self


class ZoneConfig(_Model):
    name: str = Field(pattern=NAME, description="zone name used by products and lanes")
    capacity: int | None = Field(None, ge=1, description="most people inside at once")


class GateConfig(_Model):
    site: SiteConfig
    daemon: DaemonConfig = DaemonConfig()
    admission: AdmissionConfig = AdmissionConfig()
    zones: list[ZoneConfig] = Field(default_factory=list)
    trusted_keys: list[TrustedKeyConfig] = Field(
        default_factory=list, description="issuers whose signed tickets this gate accepts"
    )
    buses: list[BusConfig] = Field(min_length=1)
    boards: list[BoardConfig] = Field(min_length=1)
    lanes: list[LaneConfig] = Field(min_length=1)
    safety: SafetyConfig = SafetyConfig()
    cloud: CloudConfig | None = Field(None, description="MQTT sync; none: the gate runs offline")


# --- resolved I/O -----------------------------------------------------------------------


@dataclass(frozen=True)
class LaneIO:
    """A lane's absolute addresses and polarities on its board."""

    board: str
    unlock_entry: int
    unlock_exit: int | None
    alarm: int | None
    entry_side: InputPoint
    exit_side: InputPoint
    obstruction: InputPoint | None

    def coil_for(self, direction: Direction) -> int | None:
        return self.unlock_entry if direction is Direction.ENTRY else self.unlock_exit

    @property
    def coils(self) -> list[int]:
        return [a for a in (self.unlock_entry, self.unlock_exit, self.alarm) if a is not None]

    @property
    def inputs(self) -> list[InputPoint]:
        return [p for p in (self.entry_side, self.exit_side, self.obstruction) if p is not None]


def _point(spec: InputSpec) -> InputPoint:
    return InputPoint(spec.address, spec.active_low)


def resolve_lane_io(lane: LaneConfig, preset: BoardPreset) -> LaneIO:
    """Apply the lane's overrides to its channel's addresses in the board preset."""
    m = preset.lane_map(lane.channel)
    o = lane.io
    obstruction = o.obstruction or m.inputs.obstruction
    return LaneIO(
        board=lane.board,
        unlock_entry=o.unlock_entry_coil
        if o.unlock_entry_coil is not None
        else m.coils.unlock_entry,
        unlock_exit=o.unlock_exit_coil if o.unlock_exit_coil is not None else m.coils.unlock_exit,
        alarm=o.alarm_coil if o.alarm_coil is not None else m.coils.alarm,
        entry_side=_point(o.sensor_entry_side or m.inputs.sensor_entry_side),
        exit_side=_point(o.sensor_exit_side or m.inputs.sensor_exit_side),
        obstruction=_point(obstruction) if obstruction else None,
    )


def safety_point(inp: SafetyInputConfig, preset: BoardPreset) -> InputPoint | None:
    spec = inp.input or getattr(preset.board_inputs, inp.kind)
    return _point(spec) if spec is not None else None


@dataclass(frozen=True)
class Site:
    """A validated configuration with its presets loaded and every lane's I/O resolved."""

    config: GateConfig
    presets: dict[str, BoardPreset]
    lane_io: dict[str, LaneIO]
    safety_points: dict[str, list[tuple[str, InputPoint]]]
    """Per board: (source name, input) of each emergency button / fire input."""


# --- loading and error reporting --------------------------------------------------------


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(msg: str) -> str:
    msg = msg[0].lower() + msg[1:] if msg else msg
    return msg.removeprefix("input should be ")


_TAGS = frozenset({"modbus-tcp", "modbus-rtu", "qr-serial", "camera", "idcard"})


def _format_pydantic(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        # Drop the discriminator tag pydantic inserts into union paths ("buses.0.modbus-tcp.x").
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _TAGS))
        if err["type"] == "extra_forbidden":
            lines.append(f"{_loc(loc)}: {_show(err['input'])} — unknown key (not allowed here)")
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            tag = err.get("ctx", {}).get("tag", "missing")
            expected = err.get("ctx", {}).get("expected_tags", "a known type")
            lines.append(f"{_loc((*loc, 'type'))}: {_show(tag)} — expected one of {expected}")
        elif err["type"] == "missing":
            lines.append(f"{_loc(loc)}: missing — required key")
        else:
            lines.append(f"{_loc(loc)}: {_show(err['input'])} — expected {_expected(err['msg'])}")
    return lines


def _cross_check(cfg: GateConfig, base: Path) -> tuple[list[str], Site | None]:
    errors: list[str] = []

    def bad(path: str, value: object, expected: str) -> None:
        errors.append(f"{path}: {_show(value)} — expected {expected}")

    def unique(kind: str, key: str, names: list[str]) -> None:
        seen: set[str] = set()
        for i, n in enumerate(names):
            if n in seen:
                bad(f"{kind}[{i}].{key}", n, "a unique name")
            seen.add(n)

    unique("buses", "name", [b.name for b in cfg.buses])
    unique("boards", "name", [b.name for b in cfg.boards])
    unique("lanes", "id", [lane.id for lane in cfg.lanes])
    bus_names = sorted(b.name for b in cfg.buses)
    board_names = sorted(b.name for b in cfg.boards)
    presets: dict[str, BoardPreset] = {}
    units: set[tuple[str, int]] = set()
    for i, board in enumerate(cfg.boards):
        if board.bus not in bus_names:
            bad(f"boards[{i}].bus", board.bus, f"one of {bus_names}")
        if (board.bus, board.unit_id) in units:
            bad(f"boards[{i}].unit_id", board.unit_id, f"a unit id not used on bus {board.bus!r}")
        units.add((board.bus, board.unit_id))
        try:
            preset_arg = board.preset
            if Path(preset_arg).suffix and not Path(preset_arg).is_absolute():
                preset_arg = str(base / preset_arg)
            presets[board.name] = load_preset(preset_arg, search=[base / "boards"])
        except FileNotFoundError:
            bad(f"boards[{i}].preset", board.preset, "a preset in config/boards or a file")
        except (ValidationError, tomllib.TOMLDecodeError) as exc:
            bad(f"boards[{i}].preset", board.preset, f"a valid preset ({exc})")

    lane_io: dict[str, LaneIO] = {}
    used: dict[tuple[str, int], str] = {}
    for i, lane in enumerate(cfg.lanes):
        preset = presets.get(lane.board)
        if preset is None:
            if lane.board not in board_names:
                bad(f"lanes[{i}].board", lane.board, f"one of {board_names}")
            continue
        if lane.channel > preset.channels:
            bad(f"lanes[{i}].channel", lane.channel, f"1..{preset.channels} on {preset.name!r}")
            continue
        io = resolve_lane_io(lane, preset)
        lane_io[lane.id] = io
        for addr in io.coils:
            other = used.get((lane.board, addr))
            if other is not None:
                bad(f"lanes[{i}].io", f"coil {addr}", f"a coil not also used by lane {other!r}")
            used[(lane.board, addr)] = lane.id

    if cfg.admission.holder_key_file is None:
        for i, lane in enumerate(cfg.lanes):
            for j, reader in enumerate(lane.readers):
                if reader.type == "idcard":
                    bad(
                        f"lanes[{i}].readers[{j}].type",
                        "idcard",
                        "admission.holder_key_file set: ID numbers are hashed with the site key",
                    )

    zone_names = [z.name for z in cfg.zones]
    unique("zones", "name", zone_names)
    if zone_names:
        for i, lane in enumerate(cfg.lanes):
            if lane.zone not in zone_names:
                bad(f"lanes[{i}].zone", lane.zone, f"one of the zones {sorted(zone_names)}")

    safety: dict[str, list[tuple[str, InputPoint]]] = {}
    for i, inp in enumerate(cfg.safety.inputs):
        preset = presets.get(inp.board)
        if preset is None:
            if inp.board not in board_names:
                bad(f"safety.inputs[{i}].board", inp.board, f"one of {board_names}")
            continue
        point = safety_point(inp, preset)
        if point is None:
            bad(
                f"safety.inputs[{i}].input", None, f"an address ({preset.name!r} has no {inp.kind})"
            )
            continue
        safety.setdefault(inp.board, []).append((f"{inp.kind}:{inp.board}:{point.address}", point))

    if errors:
        return errors, None
    return [], Site(cfg, presets, lane_io, safety)


def parse_config(data: dict[str, Any], path: str = "<config>") -> Site:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    try:
        cfg = GateConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, _format_pydantic(exc)) from None
    errors, site = _cross_check(cfg, Path(path).parent)
    if site is None:
        raise ConfigError(path, errors)
    return site


def load_config(path: str | Path) -> Site:
    """Read and validate a TOML configuration file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(p), [f"{p}: file not found"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), [f"{p}: not valid TOML — {exc}"]) from None
    return parse_config(data, str(p))
