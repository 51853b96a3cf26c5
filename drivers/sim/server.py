"""Modbus plumbing of the simulator: serves SimBoards over Modbus TCP and RTU (pty pair).

This is the only module of the simulator that imports pymodbus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simutils import SimUtils

from drivers.sim.board import SimBoard
from drivers.sim.pty import PtyBridge, make_link, remove_link

log = logging.getLogger(__name__)

SLOW_REPLY_S = 0.5
WATCHDOG_TICK_S = 0.01
# Where the unit id sits in an outgoing frame: after the 6-byte MBAP header on TCP, first on RTU.
TCP_UNIT_OFFSET = 6
RTU_UNIT_OFFSET = 0


def _fill_bits(registers: list[int], bits: list[bool]) -> None:
    # The block pymodbus hands over ends with a sentinel register; leave it in place.
    packed = SimUtils.bitsToRegisters(bits)
    registers[: len(packed)] = packed


def _board_device(board: SimBoard) -> SimDevice:
    """A pymodbus device whose every access is answered from the board's state."""

    async def action(
        fc: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if board.link == "slow":
            await asyncio.sleep(SLOW_REPLY_S)
        # A muted board hears nothing either (a cut cable); its reply is dropped in trace_packet.
        if board.link in ("mute", "exception"):
            return ExcCodes.DEVICE_FAILURE
        # `values` is only set on writes; fc 6 also calls us with None to read back.
        if fc in (1, 5, 15):
            if values:
                board.write_coils(address, [bool(v) for v in values])
            _fill_bits(registers, board.coils)
        elif fc == 2:
            _fill_bits(registers, board.levels)
        elif fc in (3, 6, 16, 22, 23):
            if values:
                board.write_registers(address, [int(v) for v in values])
            registers[: len(board.holding)] = board.holding
        return None

    return SimDevice(
        id=board.unit,
        simdata=(
            [SimData(0, count=board.coil_count, values=False, datatype=DataType.BITS)],
            [SimData(0, count=board.input_count, values=False, datatype=DataType.BITS)],
            [SimData(0, count=board.register_count, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, count=1, values=0, datatype=DataType.REGISTERS)],
        ),
        action=action,
    )


def _catch_all_device() -> SimDevice:
    """Device id 0 answers for unknown units, so pymodbus does not log a KeyError traceback."""

    async def action(*_: object) -> ExcCodes | None:
        return ExcCodes.GATEWAY_NO_RESPONSE

    def bits() -> list[SimData]:
        return [SimData(0, count=16, values=False, datatype=DataType.BITS)]

    def regs() -> list[SimData]:
        return [SimData(0, count=1, values=0, datatype=DataType.REGISTERS)]

    return SimDevice(id=0, simdata=(bits(), bits(), regs(), regs()), action=action)


class SimServer:
    """Serves simulated boards over Modbus TCP and/or RTU and runs their watchdogs."""

    def __init__(self, boards: Sequence[SimBoard]) -> None:
        self.boards: dict[int, SimBoard] = {}
        for board in boards:
            if board.unit in self.boards:
                raise ValueError(f"unit id {board.unit} used twice")
            self.boards[board.unit] = board
        self.tcp_port: int | None = None
        self.rtu_device: str | None = None
        self.rtu_link: str | None = None
        self._servers: list[ModbusTcpServer | ModbusSerialServer] = []
        self._bridge: PtyBridge | None = None
        self._ticker: asyncio.Task[None] | None = None

    def _devices(self) -> list[SimDevice]:
        # Each pymodbus server keeps its own copy of the registers; the board stays the truth.
        devices = [_board_device(board) for board in self.boards.values()]
        if 0 not in self.boards:
            devices.append(_catch_all_device())
        return devices

    def _trace(self, unit_offset: int) -> Callable[[bool, bytes], bytes]:
        def trace_packet(sending: bool, data: bytes) -> bytes:
            if not sending or len(data) <= unit_offset:
                return data
            board = self.boards.get(data[unit_offset])
            # Returning b"" suppresses the send: an unknown unit stays silent, as on a real bus.
            if board is None or board.link == "mute":
                return b""
            if board.link == "garble":
                return data[:-3]
            return data

        return trace_packet

    def _start_ticker(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_forever(), name="sim watchdog")

    async def _tick_forever(self) -> None:
        while True:
            for board in self.boards.values():
                try:
                    board.tick()
                except Exception:
                    # A failing listener must not silently stop every board's watchdog.
                    log.exception("sim unit %s: watchdog check failed", board.unit)
            await asyncio.sleep(WATCHDOG_TICK_S)

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve Modbus TCP; port 0 picks a free port. Returns the bound port."""
        srv = ModbusTcpServer(
            self._devices(), address=(host, port), trace_packet=self._trace(TCP_UNIT_OFFSET)
        )
        try:
            await srv.serve_forever(background=True)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc}") from exc
        self._servers.append(srv)
        sockets = getattr(srv.transport, "sockets", None) or []
        self.tcp_port = sockets[0].getsockname()[1] if sockets else port
        self._start_ticker()
        return self.tcp_port

    async def start_rtu(self, link: str | None = None) -> str:
        """Serve Modbus RTU on a pty pair; returns the device the daemon opens (or `link`)."""
        if self._bridge is not None:
            raise RuntimeError("RTU is already being served")
        self._bridge = PtyBridge(asyncio.get_running_loop())
        srv = ModbusSerialServer(
            self._devices(),
            port=self._bridge.server_port,
            framer=FramerType.RTU,
            baudrate=115200,
            trace_packet=self._trace(RTU_UNIT_OFFSET),
        )
        try:
            await srv.serve_forever(background=True)
        except RuntimeError as exc:
            raise OSError(f"cannot open {self._bridge.server_port}: {exc}") from exc
        self._servers.append(srv)
        self.rtu_device = self._bridge.device
        if link:
            make_link(self.rtu_device, link)
            self.rtu_link = link
        self._start_ticker()
        return self.rtu_device

    async def close(self) -> None:
        """Stop serving, close the ptys and remove the symlink."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for srv in self._servers:
            await srv.shutdown()  # type: ignore[no-untyped-call]  # pymodbus leaves it untyped
        self._servers.clear()
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
        if self.rtu_link and self.rtu_device:
            remove_link(self.rtu_device, self.rtu_link)
            self.rtu_link = None

    async def __aenter__(self) -> SimServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
