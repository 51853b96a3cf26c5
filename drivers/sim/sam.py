"""A simulated SAM ID-card reader on a pty pair, for tests and the demo.

Only synthetic identities: numbers are built from an address code no region uses (99xxxx)
with a correct check digit, names are obviously fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from drivers.idcard import (
    CMD_FIND,
    CMD_READ,
    CMD_RESET,
    CMD_SAM_ID,
    CMD_SAM_STATUS,
    CMD_SELECT,
    PHOTO_LEN,
    PREAMBLE,
    SW_CARD_FOUND,
    SW_NO_CARD,
    SW_OK,
    TEXT_LEN,
    FrameAssembler,
    build_response,
    checksum,
)
from drivers.sim.pty import PtyBridge, make_link, remove_link
from verify.idnumber import check_char

log = logging.getLogger(__name__)

T = TypeVar("T")

SW_SELECT_FAILED = 0x81
SW_BAD_CHECKSUM = 0x10
SW_BAD_COMMAND = 0x21
SW_CARD_OP_FAILED = 0x41
CMD_SET_RF = (0x61, 0xFF)
# No province or region has address codes starting 99: a synthetic number can never be real.
SYNTHETIC_ADDRESS_CODE = "990101"
FAULTS = ("bad_checksum", "truncated", "silent", "status", "raw", "noise")


def synthetic_id_number(
    birth: str = "19900101", seq: int = 1, address_code: str = SYNTHETIC_ADDRESS_CODE
) -> str:
    """A test ID number with a correct check digit (sequence 1..999)."""
    body = f"{address_code}{birth}{seq:03d}"
    return body + check_char(body)


def _padded(text: str, size: int) -> bytes:
    raw = text.encode("utf-16-le")[:size]
    return raw + " ".encode("utf-16-le") * ((size - len(raw)) // 2)


@dataclass(frozen=True)
class SimCard:
    """A synthetic card: what its text block holds."""

    id_number: str
    valid_from: str = "20200101"
    valid_to: str = "长期"
    name: str = "测试甲"
    sex: str = "1"
    ethnicity: str = "01"
    birth: str = "19900101"
    address: str = "模拟省测试市演示路1号"
    authority: str = "测试市公安局"

    def text_block(self) -> bytes:
        """The 256-byte UCS-2 LE text block, space padded."""
        block = b"".join(
            (
                _padded(self.name, 30),
                _padded(self.sex, 2),
                _padded(self.ethnicity, 4),
                _padded(self.birth, 16),
                _padded(self.address, 70),
                _padded(self.id_number, 36),
                _padded(self.authority, 30),
                _padded(self.valid_from, 16),
                _padded(self.valid_to, 16),
                _padded("", 36),
            )
        )
        assert len(block) == TEXT_LEN
        return block

    def read_data(self) -> bytes:
        """The data of a 30 01 reply: lengths, text, and a photo of zeros (WLT is opaque)."""
        lengths = TEXT_LEN.to_bytes(2, "big") + PHOTO_LEN.to_bytes(2, "big")
        return lengths + self.text_block() + bytes(PHOTO_LEN)


def synthetic_card(seq: int = 1, *, expired: bool = False, bad_number: bool = False) -> SimCard:
    """A synthetic card: valid with no expiry, expired since 2020, or with a wrong check digit."""
    number = synthetic_id_number(seq=seq)
    if bad_number:
        number = number[:17] + ("0" if number[17] != "0" else "1")
    if expired:
        return SimCard(number, valid_from="20000101", valid_to="20200101")
    return SimCard(number)


COMMANDS = {"find": CMD_FIND, "select": CMD_SELECT, "read": CMD_READ}


@dataclass
class _Fault:
    kind: str
    times: int
    command: tuple[int, int] | None
    sw3: int
    data: bytes


class SimSamReader:
    """Answers SAM requests on a pty; tests put cards on it and inject faults."""

    def __init__(self) -> None:
        self.card: SimCard | None = None
        self.selected = False
        self.requests: Counter[tuple[int, int]] = Counter()
        self.device: str | None = None
        self._link: str | None = None
        self._bridge: PtyBridge | None = None
        self._fd: int | None = None
        self._assembler = FrameAssembler(min_len=3)
        self._faults: list[_Fault] = []
        self._out = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_pending = False
        self.read_sent_at: float | None = None
        """time.monotonic() when the last byte of the latest card-read reply was written (bench)."""

    async def start(self, link: str | None = None) -> str:
        """Open the pty pair; returns the device the reader opens (``link`` if given)."""
        self._loop = asyncio.get_running_loop()
        self._link = link
        self._plug()
        assert self.device is not None
        return link or self.device

    def _plug(self) -> None:
        assert self._loop is not None
        self._bridge = PtyBridge(self._loop)
        self._fd = os.open(self._bridge.server_port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self._assembler.clear()
        self._out.clear()
        self._loop.add_reader(self._fd, self._on_readable)
        self.device = self._bridge.device
        if self._link:
            make_link(self.device, self._link)

    def _unplug(self) -> None:
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
        if self._link and self.device:
            remove_link(self.device, self._link)

    def unplug(self) -> None:
        """Pull the USB cable: the device node disappears."""
        self._unplug()

    def replug(self) -> str:
        """Plug back in: a new pty (the ``link`` path, if any, points at it again)."""
        self._unplug()
        self._plug()
        assert self.device is not None
        return self._link or self.device

    async def close(self) -> None:
        """Close the ptys and remove the link."""
        self._unplug()

    async def __aenter__(self) -> SimSamReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def put_card(self, card: SimCard) -> None:
        """Lay a card on the reader."""
        self.card = card
        self.selected = False

    def remove_card(self) -> None:
        """Take the card away."""
        self.card = None
        self.selected = False

    def inject(
        self,
        kind: str,
        times: int = 1,
        command: tuple[int, int] | None = None,
        sw3: int = SW_CARD_OP_FAILED,
        data: bytes = b"",
    ) -> None:
        """Spoil the next ``times`` replies (to ``command``, or any): a kind from FAULTS.

        "status" answers with ``sw3``; "raw" sends ``data`` instead of the reply; "noise" sends
        ``data`` before it; "silent" sends nothing.
        """
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {FAULTS}")
        self._faults.append(_Fault(kind, times, command, sw3, data))

    def clear_faults(self) -> None:
        """Answer properly again."""
        self._faults.clear()

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """One JSON-lines control request (for the simulator's control socket)."""
        cmd = req.get("cmd")
        try:
            if cmd == "idcard_put":
                self.put_card(
                    synthetic_card(
                        int(req.get("seq", 1)),
                        expired=bool(req.get("expired", False)),
                        bad_number=bool(req.get("bad_number", False)),
                    )
                )
            elif cmd == "idcard_remove":
                self.remove_card()
            elif cmd == "idcard_fault":
                command = req.get("command")
                self.inject(
                    str(req["kind"]),
                    times=int(req.get("times", 1)),
                    command=None if command is None else COMMANDS[command],
                    sw3=int(req.get("sw3", SW_CARD_OP_FAILED)),
                )
            elif cmd == "idcard_clear_faults":
                self.clear_faults()
            elif cmd == "idcard_unplug":
                self.unplug()
            elif cmd == "idcard_replug":
                self.replug()
            elif cmd != "idcard_state":
                return {"ok": False, "error": f"unknown command {cmd!r}"}
        except (KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "error": f"{cmd}: bad request ({exc})"}
        return {
            "ok": True,
            "card": self.card is not None,
            "plugged": self._bridge is not None,
            "requests": {f"{c:02x}{p:02x}": n for (c, p), n in self.requests.items()},
        }

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        for frame in self._assembler.feed(data):
            self._send(self._answer(frame))

    def _answer(self, frame: bytes) -> bytes:
        # Only a read reply that is actually sent gets its time stamped (not a silenced one).
        self._read_pending = False
        if checksum(frame[5:-1]) != frame[-1] or len(frame) < 10:
            return build_response(SW_BAD_CHECKSUM)
        cmd = (frame[7], frame[8])
        self.requests[cmd] += 1
        fault = self._take_fault(cmd)
        if fault is not None and fault.kind == "status":
            return build_response(fault.sw3)
        if fault is not None and fault.kind == "raw":
            return fault.data
        reply = self._reply(cmd)
        if fault is None:
            return reply
        if fault.kind == "bad_checksum":
            return reply[:-1] + bytes((reply[-1] ^ 0xFF,))
        if fault.kind == "truncated":
            return reply[: max(len(PREAMBLE) + 2, len(reply) // 2)]
        if fault.kind == "noise":
            return fault.data + reply
        return b""

    def _take_fault(self, cmd: tuple[int, int]) -> _Fault | None:
        for fault in self._faults:
            if fault.command is None or fault.command == cmd:
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _reply(self, cmd: tuple[int, int]) -> bytes:
        if cmd in (CMD_RESET, CMD_SAM_STATUS, CMD_SET_RF):
            return build_response(SW_OK)
        if cmd == CMD_SAM_ID:
            return build_response(SW_OK, bytes(16))
        if cmd == CMD_FIND:
            if self.card is None:
                return build_response(SW_NO_CARD)
            return build_response(SW_CARD_FOUND, bytes(4))
        if cmd == CMD_SELECT:
            if self.card is None:
                return build_response(SW_SELECT_FAILED)
            self.selected = True
            return build_response(SW_OK, bytes(8))
        if cmd == CMD_READ:
            if self.card is None or not self.selected:
                return build_response(SW_CARD_OP_FAILED)
            self.selected = False
            self._read_pending = True
            return build_response(SW_OK, self.card.read_data())
        return build_response(SW_BAD_COMMAND)

    def _send(self, data: bytes) -> None:
        if not data or self._fd is None or self._loop is None:
            return
        self._out += data
        self._flush()

    def _flush(self) -> None:
        assert self._fd is not None and self._loop is not None
        while self._out:
            try:
                written = os.write(self._fd, self._out)
            except BlockingIOError:
                # The pty buffer is full until the bridge drains it; wait for room.
                self._loop.add_writer(self._fd, self._flush)
                return
            except OSError:
                self._out.clear()
                return
            del self._out[:written]
        self._loop.remove_writer(self._fd)
        if self._read_pending:
            self._read_pending = False
            self.read_sent_at = time.monotonic()


class SamReaderThread:
    """A SimSamReader on an event loop of its own, for synchronous callers (tests, demo, bench).

    Every method runs on the reader's loop and returns when it has taken effect there.
    """

    def __init__(self, link: str | os.PathLike[str]) -> None:
        self._loop = asyncio.new_event_loop()
        self.sim = SimSamReader()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sim-sam", daemon=True)
        self._thread.start()
        self.path = self._call(self.sim.start(os.fspath(link)))

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _do(self, fn: Callable[..., object], *args: object) -> None:
        async def run() -> None:
            fn(*args)

        self._call(run())

    @property
    def read_sent_at(self) -> float | None:
        """time.monotonic() when the last card-read reply was fully written (bench timing)."""
        return self.sim.read_sent_at

    def put_card(self, card: SimCard) -> None:
        self._do(self.sim.put_card, card)

    def remove_card(self) -> None:
        self._do(self.sim.remove_card)

    def unplug(self) -> None:
        self._do(self.sim.unplug)

    def replug(self) -> None:
        self._do(self.sim.replug)

    def close(self) -> None:
        self._call(self.sim.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> SamReaderThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
