"""Modbus turnstile I/O: the one owner of a pymodbus client per bus (TCP or RTU).

Each cycle, for every board on the bus: write pending coil changes, read the discrete
inputs, hand the snapshot to the listener, write the heartbeat register. A coil change
wakes the loop at once, so an emergency does not wait for the next poll period.

Faults (timeouts, exception replies, short or garbled frames, a dropped connection) are
counted and never escape the loop. A board with no good reply for ``link_timeout_s`` is
reported lost once (ERROR, with the last bus frames); repeats go to DEBUG; its return is
reported once more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType

from drivers.base import BoardSnapshot, SnapshotListener

log = logging.getLogger(__name__)

# pymodbus logs every retry and frame at WARNING/DEBUG; our own outage log replaces it.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class TcpLink:
    host: str
    port: int


@dataclass(frozen=True)
class RtuLink:
    port: str
    baudrate: int = 115200
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8


@dataclass(frozen=True)
class BusSettings:
    name: str
    link: TcpLink | RtuLink
    poll_hz: float = 100.0
    timeout_s: float = 0.1
    link_timeout_s: float = 0.5
    reconnect_max_s: float = 5.0


@dataclass(frozen=True)
class BoardSpec:
    """What the bus owner must know of one board: where its inputs, coils and watchdog are."""

    name: str
    unit_id: int
    inputs: tuple[int, int]
    """(first address, count) of the discrete inputs read each cycle."""
    coils: tuple[int, int]
    """(first address, count) of the coils written as one block."""
    heartbeat_register: int
    watchdog_ms_register: int | None = None
    watchdog_ms: int = 0
    fail_open_mask_register: int | None = None
    fail_open_mask: int = 0


DOWN_RETRY_S = 0.2


class BadReply(Exception):
    """The board answered with a Modbus exception or an unusable reply."""


@dataclass
class _Board:
    spec: BoardSpec
    coil_image: list[bool]
    """The latest wanted state of the board's coil block."""
    pending: list[list[bool]] = field(default_factory=list)
    """Coil images still to write, oldest first (see BoardHandle.set_coils)."""
    written: list[bool] | None = None
    """The last image the board acknowledged; None when unknown (start, after an outage)."""
    needs_setup: bool = True
    link_up: bool = False
    ever_up: bool = False
    last_ok: float = field(default_factory=time.monotonic)
    heartbeat: int = 0
    outages: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    reads: int = 0
    retry_at: float = 0.0


class BoardHandle:
    """The outputs of one board, as a lane runner drives them."""

    def __init__(self, bus: ModbusBus, board: _Board) -> None:
        self.name = board.spec.name
        self._bus = bus
        self._board = board

    def set_coils(self, coils: Mapping[int, bool]) -> None:
        """Command these coil states; the bus writes them at once, in command order.

        Changes to different coils merge into one write (an emergency opens every lane of
        a board in one request); a second change to a coil not yet written queues a new
        write, so a command such as "fail state, then normal" reaches the board as given.
        """
        b = self._board
        start, count = b.spec.coils
        image = list(b.coil_image)
        for addr, value in coils.items():
            i = addr - start
            if not 0 <= i < count:
                raise ValueError(f"coil {addr} outside board {self.name}'s block")
            image[i] = value
        if image == b.coil_image and b.pending:
            return
        if b.pending:
            base = b.pending[-2] if len(b.pending) > 1 else b.written
            last = b.pending[-1]
            rewrites = any(
                image[i] != last[i] and (base is None or last[i] != base[i]) for i in range(count)
            )
            if rewrites:
                b.pending.append(image)
            else:
                b.pending[-1] = image
        else:
            b.pending.append(image)
        b.coil_image = image
        self._bus.wake()


class ModbusBus:
    """The single owner of one Modbus line (a TCP connection or a serial port)."""

    def __init__(
        self, settings: BusSettings, boards: list[BoardSpec], listener: SnapshotListener
    ) -> None:
        self.name = settings.name
        self._s = settings
        self._listener = listener
        self._boards = {b.name: _Board(b, coil_image=[False] * b.coils[1]) for b in boards}
        self._handles = {n: BoardHandle(self, b) for n, b in self._boards.items()}
        self._wake = asyncio.Event()
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._frames: deque[tuple[float, str, bytes]] = deque(maxlen=32)
        self._next_connect = 0.0
        self._backoff = 0.1
        self.alive_at = time.monotonic()
        """Monotonic time of the last completed cycle (the daemon's watchdog reads it)."""
        self.cycles = 0

    def board(self, name: str) -> BoardHandle:
        return self._handles[name]

    def wake(self) -> None:
        self._wake.set()

    def stats(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "bus": self.name,
            "connected": bool(self._client and self._client.connected),
            "cycles": self.cycles,
            "boards": {
                n: {
                    "unit_id": b.spec.unit_id,
                    "link_up": b.link_up,
                    "last_ok_age_s": round(now - b.last_ok, 3),
                    "reads": b.reads,
                    "outages": b.outages,
                    "faults": dict(b.faults),
                }
                for n, b in self._boards.items()
            },
        }

    # --- client -------------------------------------------------------------------------

    def _trace(self, sending: bool, data: bytes) -> bytes:
        # Ring buffer of recent frames, dumped when a link is lost (cheap: no formatting).
        self._frames.append((time.monotonic(), "tx" if sending else "rx", data))
        return data

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        link, s = self._s.link, self._s
        # reconnect_delay=0: this loop owns reconnects (with its own backoff and logging).
        if isinstance(link, TcpLink):
            return AsyncModbusTcpClient(
                link.host,
                port=link.port,
                timeout=s.timeout_s,
                retries=0,
                reconnect_delay=0,
                trace_packet=self._trace,
            )
        return AsyncModbusSerialClient(
            link.port,
            framer=FramerType.RTU,
            baudrate=link.baudrate,
            parity=link.parity,
            stopbits=link.stopbits,
            bytesize=link.bytesize,
            timeout=s.timeout_s,
            retries=0,
            reconnect_delay=0,
            trace_packet=self._trace,
        )

    async def _ensure_connected(self, now: float) -> bool:
        if self._client is not None and self._client.connected:
            return True
        if now < self._next_connect:
            return False
        if self._client is not None:
            self._client.close()
        self._client = self._make_client()
        try:
            async with asyncio.timeout(max(self._s.timeout_s, 0.5)):
                ok = await self._client.connect()
        except (TimeoutError, OSError, ModbusException):
            ok = False
        if ok:
            self._backoff = 0.1
            return True
        self._next_connect = now + self._backoff
        self._backoff = min(self._backoff * 2, self._s.reconnect_max_s)
        return False

    # --- the cycle ----------------------------------------------------------------------

    async def _service(self, b: _Board) -> None:
        client = self._client
        assert client is not None
        spec = b.spec
        if b.needs_setup:
            # Tell the board how long to wait for heartbeats and which lanes fail open.
            if spec.watchdog_ms_register is not None:
                await self._check(
                    client.write_register(
                        spec.watchdog_ms_register, spec.watchdog_ms, device_id=spec.unit_id
                    )
                )
            if spec.fail_open_mask_register is not None:
                await self._check(
                    client.write_register(
                        spec.fail_open_mask_register, spec.fail_open_mask, device_id=spec.unit_id
                    )
                )
            b.needs_setup = False
        while b.pending:
            await self._check(
                client.write_coils(spec.coils[0], b.pending[0], device_id=spec.unit_id)
            )
            b.written = b.pending.pop(0)
        start, count = spec.inputs
        rr = await self._check(
            client.read_discrete_inputs(start, count=count, device_id=spec.unit_id)
        )
        bits = getattr(rr, "bits", None)
        if bits is None or len(bits) < count:
            raise BadReply("short input reply")
        now = time.monotonic()
        b.reads += 1
        b.last_ok = now
        if not b.link_up:
            b.link_up = True
            if b.ever_up:
                log.warning("bus %s board %s: link restored", self.name, spec.name)
            else:
                log.info("bus %s board %s: connected (unit %d)", self.name, spec.name, spec.unit_id)
            b.ever_up = True
        self._listener(
            BoardSnapshot(spec.name, True, {start + i: bool(bits[i]) for i in range(count)}, now)
        )
        b.heartbeat = (b.heartbeat + 1) & 0xFFFF
        await self._check(
            client.write_register(spec.heartbeat_register, b.heartbeat, device_id=spec.unit_id)
        )

    @staticmethod
    async def _check(request: object) -> object:
        rr = await request  # type: ignore[misc]
        if rr is None or rr.isError():
            raise BadReply(f"exception reply {getattr(rr, 'exception_code', '?')}")
        return rr

    def _fault(self, b: _Board, kind: str, exc: BaseException | None, now: float) -> None:
        b.faults[kind] += 1
        # A board that is down is tried a few times a second, not every cycle: on a shared
        # RS-485 line each try costs a reply timeout that the other boards would wait out.
        b.retry_at = now + DOWN_RETRY_S
        if b.link_up and now - b.last_ok >= self._s.link_timeout_s:
            self._lose(b, now, f"{kind}: {exc}")
        elif not b.link_up:
            log.debug("bus %s board %s: still down (%s)", self.name, b.spec.name, kind)

    def _lose(self, b: _Board, now: float, why: str) -> None:
        b.link_up = False
        b.needs_setup = True
        # What was wanted before the outage is stale: the lanes command their fail state
        # afresh when the link returns.
        b.pending.clear()
        b.written = None
        b.outages += 1
        log.error("bus %s board %s: link lost (%s)", self.name, b.spec.name, why)
        if self._frames:
            log.info(
                "bus %s last frames: %s",
                self.name,
                " ".join(f"{d}:{f.hex()}" for _, d, f in list(self._frames)[-8:]),
            )
        self._listener(BoardSnapshot(b.spec.name, False, {}, now))

    async def _cycle(self) -> None:
        now = time.monotonic()
        if not await self._ensure_connected(now):
            for b in self._boards.values():
                self._fault(b, "not_connected", None, now)
            return
        for b in self._boards.values():
            if not b.link_up and now < b.retry_at:
                continue
            try:
                await self._service(b)
            except BadReply as exc:
                self._fault(b, "bad_reply", exc, time.monotonic())
            except ModbusException as exc:
                self._fault(b, "no_reply", exc, time.monotonic())
            except (OSError, TimeoutError) as exc:
                self._fault(b, "io_error", exc, time.monotonic())
            except Exception as exc:  # boundary: a broken reply must never stop the bus
                log.exception("bus %s board %s: unexpected error", self.name, b.spec.name)
                self._fault(b, "error", exc, time.monotonic())

    async def run(self) -> None:
        """Poll and write until cancelled."""
        period = 1.0 / self._s.poll_hz
        try:
            while True:
                started = time.monotonic()
                self._wake.clear()
                await self._cycle()
                self.cycles += 1
                self.alive_at = time.monotonic()
                remaining = period - (self.alive_at - started)
                if remaining > 0 and not self._wake.is_set():
                    # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await self._wake.wait()
        finally:
            if self._client is not None:
                self._client.close()

    def writes_pending(self) -> bool:
        """Whether a connected board still has coil changes to write."""
        return any(b.link_up and b.pending for b in self._boards.values())
