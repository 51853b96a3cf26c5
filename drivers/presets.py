"""Register maps of supported turnstile I/O boards, read from ``config/boards/*.toml``.

Shared by the daemon's configuration (which resolves a lane's addresses from its board
and channel) and by the simulated board (which serves the same map).
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PRESET_DIR = Path(__file__).resolve().parent.parent / "config" / "boards"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    address: int = Field(ge=0, le=65535, description="0-based discrete input address")
    active: Literal["high", "low"] = Field(
        "high", description="electrical level that means active ('low' for normally-closed)"
    )

    @property
    def active_low(self) -> bool:
        return self.active == "low"


class BoardRegisters(_Strict):
    heartbeat: int = Field(ge=0, le=65535, description="holding register written every cycle")
    watchdog_ms: int | None = Field(
        None, ge=0, le=65535, description="holding register: watchdog time in ms"
    )
    fail_open_mask: int | None = Field(
        None, ge=0, le=65535, description="holding register: bit N-1 = channel N fails open"
    )


class LaneCoils(_Strict):
    unlock_entry: int = Field(ge=0, le=65535)
    unlock_exit: int | None = Field(None, ge=0, le=65535)
    alarm: int | None = Field(None, ge=0, le=65535)


class LaneInputs(_Strict):
    sensor_entry_side: InputSpec
    sensor_exit_side: InputSpec
    obstruction: InputSpec | None = None


class LaneMap(_Strict):
    coils: LaneCoils
    inputs: LaneInputs


class BoardInputs(_Strict):
    emergency_button: InputSpec | None = None
    fire: InputSpec | None = None


class BoardPreset(_Strict):
    name: str
    description: str = ""
    channels: int = Field(ge=1, le=64)
    stride_coils: int = Field(ge=0)
    stride_inputs: int = Field(ge=0)
    registers: BoardRegisters
    lane: LaneMap
    board_inputs: BoardInputs = BoardInputs()

    def lane_map(self, channel: int) -> LaneMap:
        """Absolute addresses of one channel (1-based)."""
        if not 1 <= channel <= self.channels:
            raise ValueError(f"channel {channel} not in 1..{self.channels}")
        dc = (channel - 1) * self.stride_coils
        di = (channel - 1) * self.stride_inputs

        def shift_in(spec: InputSpec | None) -> InputSpec | None:
            return None if spec is None else spec.model_copy(update={"address": spec.address + di})

        def shift_co(addr: int | None) -> int | None:
            return None if addr is None else addr + dc

        c, i = self.lane.coils, self.lane.inputs
        entry, exit_ = shift_in(i.sensor_entry_side), shift_in(i.sensor_exit_side)
        assert entry is not None and exit_ is not None
        return LaneMap(
            coils=LaneCoils(
                unlock_entry=c.unlock_entry + dc,
                unlock_exit=shift_co(c.unlock_exit),
                alarm=shift_co(c.alarm),
            ),
            inputs=LaneInputs(
                sensor_entry_side=entry,
                sensor_exit_side=exit_,
                obstruction=shift_in(i.obstruction),
            ),
        )


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def find_preset(name_or_path: str, search: Sequence[Path] = ()) -> Path:
    """A preset's file: a path as given, or NAME.toml in ``search`` then the shipped presets.

    On a controller the site's own maps live beside its configuration
    (``/etc/gate-agent/boards``); the ones shipped in ``config/boards`` come last.
    """
    path = Path(name_or_path)
    if path.suffix or "/" in name_or_path:
        return path
    for folder in (*search, PRESET_DIR):
        candidate = folder / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(name_or_path)


def load_preset(name_or_path: str, search: Sequence[Path] = ()) -> BoardPreset:
    """Load a preset by name or by file path (see ``find_preset``)."""
    with find_preset(name_or_path, search).open("rb") as f:
        return BoardPreset.model_validate(tomllib.load(f))
