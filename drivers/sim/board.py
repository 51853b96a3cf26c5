"""State and behaviour of one simulated turnstile I/O board (one Modbus unit).

The board knows nothing about Modbus framing: ``drivers.sim.server`` feeds it the requests
it receives. Everything runs on one asyncio loop; nothing here is thread-safe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

from drivers.presets import BoardPreset, InputSpec, LaneMap

Direction = Literal["entry", "exit"]
LinkMode = Literal["up", "mute", "exception", "slow", "garble"]
LINK_MODES: tuple[str, ...] = get_args(LinkMode)
OUTPUT_NAMES = ("unlock_entry", "unlock_exit", "alarm")

HistoryEntry = dict[str, Any]
Listener = Callable[[HistoryEntry], None]

# Sizes the real board answers for; addresses past them get ILLEGAL_ADDRESS like on hardware.
MIN_BITS = 64
MIN_REGISTERS = 16


def _round_up_16(n: int) -> int:
    return (n + 15) // 16 * 16


class SimBoard:
    """One simulated gate I/O board: inputs, coils, holding registers, watchdog, people."""

    def __init__(
        self,
        preset: BoardPreset,
        *,
        unit: int = 1,
        lanes: int | None = None,
        default_watchdog_ms: int = 0,
        default_fail_open_mask: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        lanes = preset.channels if lanes is None else lanes
        if not 1 <= lanes <= preset.channels:
            raise ValueError(f"lanes must be 1..{preset.channels} for {preset.name}, not {lanes}")
        if not 0 <= unit <= 247:
            raise ValueError(f"unit id must be 0..247, not {unit}")
        self.preset = preset
        self.unit = unit
        self.lanes = lanes
        self.clock = clock
        self.lane_maps = {ch: preset.lane_map(ch) for ch in range(1, lanes + 1)}

        # Every channel the board has is addressable, wired to a lane or not.
        last = preset.lane_map(preset.channels)
        coil_top = max(a for a in last.coils.model_dump().values() if a is not None)
        input_top = max(spec.address for spec in self._all_input_specs(last))
        regs = preset.registers.model_dump().values()
        self.coil_count = max(MIN_BITS, _round_up_16(coil_top + 1))
        self.input_count = max(MIN_BITS, _round_up_16(input_top + 1))
        self.register_count = max(MIN_REGISTERS, max(r for r in regs if r is not None) + 1)

        self.coils = [False] * self.coil_count
        self.holding = [0] * self.register_count
        # Every input starts inactive: a normally-closed (active-low) contact reads high.
        self.levels = [False] * self.input_count
        for ch in range(1, preset.channels + 1):
            for spec in self._all_input_specs(preset.lane_map(ch)):
                self.levels[spec.address] = spec.active_low

        self.link: LinkMode = "up"
        self.history: list[HistoryEntry] = []
        self.coil_writes: list[HistoryEntry] = []
        self.listeners: list[Listener] = []
        self.heartbeat_count = 0
        self.heartbeat_value: int | None = None
        self.watchdog_tripped = False
        self._fed_at = clock()
        self._outputs = {ch: self._compute_outputs(ch) for ch in self.lane_maps}
        self._waiters: set[asyncio.Future[None]] = set()
        self._lane_locks = {ch: asyncio.Lock() for ch in self.lane_maps}

        regs_cfg = preset.registers
        if regs_cfg.watchdog_ms is not None:
            self.holding[regs_cfg.watchdog_ms] = default_watchdog_ms
        if regs_cfg.fail_open_mask is not None:
            self.holding[regs_cfg.fail_open_mask] = default_fail_open_mask

    def _all_input_specs(self, lane: LaneMap) -> list[InputSpec]:
        specs = [lane.inputs.sensor_entry_side, lane.inputs.sensor_exit_side]
        specs += [lane.inputs.obstruction] if lane.inputs.obstruction else []
        b = self.preset.board_inputs
        specs += [s for s in (b.emergency_button, b.fire) if s is not None]
        return specs

    # ---- configuration the daemon writes ----

    @property
    def watchdog_ms(self) -> int:
        """Watchdog time in ms (0 = disabled), as last written."""
        addr = self.preset.registers.watchdog_ms
        return 0 if addr is None else self.holding[addr]

    @property
    def fail_open_mask(self) -> int:
        """Bit N-1 set = channel N opens when the watchdog trips."""
        addr = self.preset.registers.fail_open_mask
        return 0 if addr is None else self.holding[addr]

    # ---- Modbus side: called by the server for each request ----

    def write_coils(self, address: int, values: Sequence[bool]) -> None:
        """Apply a coil write request (fc 5 or 15) and log it."""
        values = [bool(v) for v in values]
        _check_range("coil", address, len(values), self.coil_count)
        self.coil_writes.append(
            {"t": self.clock(), "unit": self.unit, "address": address, "values": values}
        )
        self.coils[address : address + len(values)] = values
        self._refresh_outputs()

    def write_registers(self, address: int, values: Sequence[int]) -> None:
        """Apply a holding register write (fc 6 or 16): heartbeat and watchdog settings."""
        _check_range("holding register", address, len(values), self.register_count)
        regs = self.preset.registers
        for addr, value in enumerate(values, start=address):
            old = self.holding[addr]
            self.holding[addr] = int(value)
            if addr == regs.heartbeat:
                self._heartbeat(int(value), changed=value != old or self.heartbeat_value is None)
            elif addr == regs.watchdog_ms:
                # A real board restarts its timer when configured; otherwise enabling the
                # watchdog after a long quiet spell would trip it at once.
                self._fed_at = self.clock()
                if value == 0 and self.watchdog_tripped:
                    self._set_tripped(False)
        self._refresh_outputs()

    def _heartbeat(self, value: int, *, changed: bool) -> None:
        self.heartbeat_count += 1
        self.heartbeat_value = value
        # Only a change feeds the watchdog: a stuck daemon repeating one value must still trip it.
        if changed:
            self._fed_at = self.clock()
            if self.watchdog_tripped:
                self._set_tripped(False)

    def tick(self, now: float | None = None) -> None:
        """Run the watchdog check (the server calls this every 10 ms)."""
        now = self.clock() if now is None else now
        wd_ms = self.watchdog_ms
        if wd_ms > 0 and not self.watchdog_tripped and now - self._fed_at >= wd_ms / 1000:
            self._set_tripped(True)
            self._refresh_outputs()

    def _set_tripped(self, tripped: bool) -> None:
        self.watchdog_tripped = tripped
        self._record(None, "watchdog", tripped)

    # ---- physical outputs ----

    def _compute_outputs(self, channel: int) -> dict[str, bool]:
        coils = self.lane_maps[channel].coils
        addresses = {name: getattr(coils, name) for name in OUTPUT_NAMES}
        present = {name: a for name, a in addresses.items() if a is not None}
        if not self.watchdog_tripped:
            return {name: self.coils[a] for name, a in present.items()}
        fail_open = bool(self.fail_open_mask >> (channel - 1) & 1)
        return {name: fail_open and name != "alarm" for name in present}

    def outputs(self, channel: int) -> dict[str, bool]:
        """Physical outputs of a lane: its coils, or its fail state while the watchdog trips."""
        return dict(self._outputs[channel])

    def _refresh_outputs(self) -> None:
        changed = False
        for ch in self.lane_maps:
            new = self._compute_outputs(ch)
            old = self._outputs[ch]
            for name, value in new.items():
                if old.get(name) != value:
                    self._record(ch, name, value)
                    changed = True
            self._outputs[ch] = new
        if changed:
            for fut in self._waiters:
                if not fut.done():
                    fut.set_result(None)
            self._waiters.clear()

    async def wait_output(self, channel: int, name: str, value: bool, timeout_s: float) -> bool:
        """Wait until a physical output has a value; False if it does not within the timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._outputs[channel].get(name) != value:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.add(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                return False
            finally:
                self._waiters.discard(fut)
        return True

    # ---- inputs ----

    def _set_input(self, channel: int | None, what: str, spec: InputSpec, active: bool) -> None:
        level = active != spec.active_low
        if self.levels[spec.address] == level:
            return
        self.levels[spec.address] = level
        self._record(channel, what, active)

    def input_active(self, spec: InputSpec) -> bool:
        """Logical state of one input."""
        return self.levels[spec.address] != spec.active_low

    def lane_inputs(self, channel: int) -> dict[str, bool]:
        """Logical inputs of a lane."""
        inputs = self.lane_maps[channel].inputs
        specs = {
            "sensor_entry_side": inputs.sensor_entry_side,
            "sensor_exit_side": inputs.sensor_exit_side,
            "obstruction": inputs.obstruction,
        }
        return {name: self.input_active(s) for name, s in specs.items() if s is not None}

    def board_inputs(self) -> dict[str, bool]:
        """Logical board-wide safety inputs."""
        b = self.preset.board_inputs
        specs = {"emergency_button": b.emergency_button, "fire": b.fire}
        return {name: self.input_active(s) for name, s in specs.items() if s is not None}

    def _lane(self, channel: int) -> LaneMap:
        if channel not in self.lane_maps:
            raise ValueError(f"unit {self.unit} has lanes 1..{self.lanes}, not {channel}")
        return self.lane_maps[channel]

    def set_beams(self, channel: int, *, entry_side: bool, exit_side: bool) -> None:
        """Set both passage beams of a lane (True = interrupted)."""
        inputs = self._lane(channel).inputs
        self._set_input(channel, "sensor_entry_side", inputs.sensor_entry_side, entry_side)
        self._set_input(channel, "sensor_exit_side", inputs.sensor_exit_side, exit_side)

    def set_obstruction(self, channel: int, on: bool) -> None:
        """Something is (or is no longer) in the flap zone of a lane."""
        spec = self._lane(channel).inputs.obstruction
        if spec is None:
            raise ValueError(f"preset {self.preset.name} has no obstruction input")
        self._set_input(channel, "obstruction", spec, on)

    def set_emergency(self, on: bool) -> None:
        """Press (True) or release the emergency button."""
        spec = self.preset.board_inputs.emergency_button
        if spec is None:
            raise ValueError(f"preset {self.preset.name} has no emergency button input")
        self._set_input(None, "emergency_button", spec, on)

    def set_fire(self, on: bool) -> None:
        """Raise (True) or clear the fire alarm input."""
        spec = self.preset.board_inputs.fire
        if spec is None:
            raise ValueError(f"preset {self.preset.name} has no fire input")
        self._set_input(None, "fire", spec, on)

    def set_link(self, mode: str) -> None:
        """Choose how the board answers: up, mute, exception, slow or garble."""
        if mode not in LINK_MODES:
            raise ValueError(f"link mode must be one of {', '.join(LINK_MODES)}, not {mode!r}")
        self.link = mode  # type: ignore[assignment]

    # ---- people ----

    async def _pass_beams(self, channel: int, direction: Direction, step_s: float) -> None:
        near_first = direction == "entry"
        # Entry breaks the entry-side beam first; exit is the mirror image.
        for near, far in ((True, False), (True, True), (False, True), (False, False)):
            entry_side, exit_side = (near, far) if near_first else (far, near)
            self.set_beams(channel, entry_side=entry_side, exit_side=exit_side)
            if near or far:
                await asyncio.sleep(step_s)

    def _unlock_output(self, channel: int, direction: Direction) -> str:
        coils = self._lane(channel).coils
        # A lane without a separate exit lock is released for both directions by one output.
        if direction == "exit" and coils.unlock_exit is not None:
            return "unlock_exit"
        return "unlock_entry"

    async def walk(
        self,
        channel: int,
        direction: Direction,
        *,
        wait_unlock: bool = True,
        wait_timeout_s: float = 5.0,
        step_s: float = 0.06,
        people: int = 1,
    ) -> bool:
        """People pass; with wait_unlock the first waits for the lane to open, else they jump
        it. Each follower starts as soon as the one ahead clears the beams (tailgating)."""
        _check_direction(direction)
        output = self._unlock_output(channel, direction)
        async with self._lane_locks[channel]:
            if wait_unlock and not await self.wait_output(channel, output, True, wait_timeout_s):
                return False
            for _ in range(people):
                await self._pass_beams(channel, direction, step_s)
            return True

    async def crowd(
        self, channel: int, direction: Direction, people: int, *, step_s: float, gap_s: float
    ) -> int:
        """People pass one after another through a lane that is held open, ``gap_s`` apart
        (long enough for the daemon to see the beams clear); returns how many passed."""
        _check_direction(direction)
        self._lane(channel)
        async with self._lane_locks[channel]:
            for _ in range(people):
                await self._pass_beams(channel, direction, step_s)
                await asyncio.sleep(gap_s)
        return people

    async def tailgate(
        self,
        channel: int,
        direction: Direction,
        *,
        wait_unlock: bool = True,
        wait_timeout_s: float = 5.0,
        step_s: float = 0.06,
    ) -> bool:
        """Two people back to back on one unlock."""
        return await self.walk(
            channel,
            direction,
            wait_unlock=wait_unlock,
            wait_timeout_s=wait_timeout_s,
            step_s=step_s,
            people=2,
        )

    async def back_out(self, channel: int, direction: Direction, *, step_s: float = 0.06) -> None:
        """A person steps into the near beam, then turns back without reaching the far beam."""
        _check_direction(direction)
        self._lane(channel)
        entry = direction == "entry"
        async with self._lane_locks[channel]:
            self.set_beams(channel, entry_side=entry, exit_side=not entry)
            await asyncio.sleep(2 * step_s)
            self.set_beams(channel, entry_side=False, exit_side=False)

    # ---- history ----

    def _record(self, channel: int | None, what: str, value: bool) -> None:
        entry = {
            "t": self.clock(),
            "unit": self.unit,
            "channel": channel,
            "what": what,
            "value": value,
        }
        self.history.append(entry)
        for listener in self.listeners:
            listener(entry)

    def clear_history(self) -> None:
        """Forget recorded history and coil write requests."""
        self.history.clear()
        self.coil_writes.clear()

    def state(self) -> dict[str, Any]:
        """Snapshot of the board as plain JSON-able data."""
        lanes: dict[str, Any] = {}
        for ch, lane in self.lane_maps.items():
            coils = {
                name: self.coils[addr]
                for name in OUTPUT_NAMES
                if (addr := getattr(lane.coils, name)) is not None
            }
            lanes[str(ch)] = {
                "coils": coils,
                "outputs": self.outputs(ch),
                "inputs": self.lane_inputs(ch),
            }
        return {
            "unit": self.unit,
            "link": self.link,
            "lanes": lanes,
            "board_inputs": self.board_inputs(),
            "coils": list(self.coils),
            "watchdog_tripped": self.watchdog_tripped,
            "watchdog_ms": self.watchdog_ms,
            "fail_open_mask": self.fail_open_mask,
            "heartbeat_count": self.heartbeat_count,
            "heartbeat_value": self.heartbeat_value,
        }


def _check_range(kind: str, address: int, count: int, size: int) -> None:
    if address < 0 or address + count > size:
        raise ValueError(f"{kind} {address}..{address + count - 1} outside 0..{size - 1}")


def _check_direction(direction: str) -> None:
    if direction not in ("entry", "exit"):
        raise ValueError(f"direction must be 'entry' or 'exit', not {direction!r}")
