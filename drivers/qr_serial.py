"""Serial QR scanner: reads terminated lines from a USB/RS-232 scanner and hands on codes.

A reader thread owns the port (pyserial blocks) and passes raw chunks to the event loop with
``call_soon_threadsafe``; framing, checks and debounce run on the loop. The port itself is
``drivers.serial_port``'s, the one owner of pyserial.

The code text is a bearer credential: it never appears in a log line, only lengths and counters.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Literal

from drivers.base import Credential, CredentialListener
from drivers.reader_thread import Alarm, Backoff, Worker, run_in_thread
from drivers.serial_port import PortGone, SerialPort

log = logging.getLogger(__name__)

Terminator = Literal["CR", "LF", "CRLF"]
TERMINATORS: dict[str, bytes] = {"CR": b"\r", "LF": b"\n", "CRLF": b"\r\n"}

# A short read timeout bounds how long stopping the reader thread takes; data still arrives
# as soon as the first byte is there, so it costs no latency.
READ_TIMEOUT_S = 0.1
REOPEN_FIRST_S = 0.1
STOP_WAIT_S = 2.0
# Bytes a scanner may glue to either end of a line when its terminator setting differs from ours.
LINE_TRIM = b"\r\n\x00"


def _has_control(text: str) -> bool:
    return any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in text)


class ScanFramer:
    """Splits a scanner byte stream into code texts; counts every rejected line by reason."""

    def __init__(
        self,
        terminator: Terminator = "CR",
        prefix: str = "",
        suffix: str = "",
        max_length: int = 2048,
    ) -> None:
        if terminator not in TERMINATORS:
            raise ValueError(f"terminator must be one of {sorted(TERMINATORS)}, not {terminator!r}")
        if max_length < 1:
            raise ValueError("max_length must be at least 1")
        self.terminator = TERMINATORS[terminator]
        self.prefix = prefix.encode()
        self.suffix = suffix.encode()
        self.max_length = max_length
        # A line may carry its framing and stray CR/LF around the code itself.
        self._max_line = max_length + len(self.prefix) + len(self.suffix) + 2
        self._buf = bytearray()
        self._skipping = False
        self.rejected: Counter[str] = Counter()

    def reset(self) -> None:
        """Forget a partial line (the device went away mid-code)."""
        if self._buf or self._skipping:
            self.rejected["partial"] += 1
        self._buf.clear()
        self._skipping = False

    def feed(self, data: bytes) -> list[str]:
        """Add received bytes; return the codes of every line they complete."""
        self._buf += data
        codes: list[str] = []
        while True:
            end = self._buf.find(self.terminator)
            if end < 0:
                break
            line = bytes(self._buf[:end])
            del self._buf[: end + len(self.terminator)]
            if self._skipping:
                # The tail of an over-long run: already counted, dropped up to this terminator.
                self._skipping = False
                continue
            code = self._check(line)
            if code is not None:
                codes.append(code)
        if len(self._buf) > self._max_line:
            if not self._skipping:
                self.rejected["too_long"] += 1
            self._skipping = True
            # Keep what could be the start of a split CRLF, or its terminator would be lost.
            del self._buf[: len(self._buf) - (len(self.terminator) - 1)]
        return codes

    def _check(self, line: bytes) -> str | None:
        line = line.strip(LINE_TRIM)
        if self.prefix:
            start = line.rfind(self.prefix)
            if start < 0:
                self.rejected["no_prefix"] += 1
                return None
            # Noise before the prefix is line garbage; the framed code after it is still good.
            line = line[start + len(self.prefix) :]
        if self.suffix:
            if not line.endswith(self.suffix):
                self.rejected["no_suffix"] += 1
                return None
            line = line[: -len(self.suffix)]
        if not line:
            self.rejected["empty"] += 1
            return None
        if len(line) > self.max_length:
            self.rejected["too_long"] += 1
            return None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.rejected["not_utf8"] += 1
            return None
        if _has_control(text):
            # No printed or phone-displayed ticket carries control characters: this is noise.
            self.rejected["control_chars"] += 1
            return None
        return text


class SerialScanner:
    """A QR scanner on a serial port (or any pyserial URL) that reconnects by itself."""

    def __init__(
        self,
        name: str,
        port_url: str,
        *,
        baudrate: int = 9600,
        terminator: Terminator = "CR",
        prefix: str = "",
        suffix: str = "",
        max_length: int = 2048,
        debounce_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        reopen_max_s: float = 5.0,
    ) -> None:
        self.name = name
        self.port_url = port_url
        self.baudrate = baudrate
        self.debounce_s = debounce_s
        self.reopen_max_s = max(reopen_max_s, REOPEN_FIRST_S)
        self._clock = clock
        self._framer = ScanFramer(terminator, prefix, suffix, max_length)
        self._listener: CredentialListener | None = None
        self._port: SerialPort | None = None
        self._connected = False
        self._alarm = Alarm()
        self._last_code: str | None = None
        self._last_seen = 0.0
        self._counts: Counter[str] = Counter()

    async def run(self, listener: CredentialListener) -> None:
        """Read codes and hand each to ``listener`` until cancelled; never raises on port faults."""
        self._listener = listener
        try:
            await run_in_thread(
                f"qr-serial {self.name}",
                self._read_forever,
                stop_wait_s=STOP_WAIT_S,
                on_stop=self._stopping,
            )
        finally:
            self._connected = False

    def _stopping(self) -> None:
        self._listener = None
        port = self._port
        if port is not None:
            # Wakes a posix read at once instead of after READ_TIMEOUT_S.
            port.cancel_read()

    def stats(self) -> dict[str, object]:
        """Link state, alarm flag and counters (never the code text)."""
        return {
            "connected": self._connected,
            "alarm": self._alarm.up,
            "reads": self._counts["reads"],
            "repeats": self._counts["repeats"],
            "bytes": self._counts["bytes"],
            "outages": self._alarm.raised,
            "rejected": dict(self._framer.rejected),
        }

    # -- event loop side ----------------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        self._counts["bytes"] += len(data)
        for code in self._framer.feed(data):
            now = self._clock()
            # A scanner re-sends a code held under it; the window slides so one hold is one read.
            repeat = code == self._last_code and now - self._last_seen < self.debounce_s
            self._last_code, self._last_seen = code, now
            if repeat:
                self._counts["repeats"] += 1
                continue
            self._counts["reads"] += 1
            listener = self._listener
            if listener is None:
                continue
            try:
                listener(Credential(kind="qr", value=code, reader=self.name, at=now))
            except Exception:
                log.exception(
                    "scanner %s: credential listener failed (len %d)", self.name, len(code)
                )

    def _on_connected(self) -> None:
        self._connected = True
        self._framer.reset()
        if self._alarm.recover():
            log.warning("scanner %s: back on %s", self.name, self.port_url)

    def _on_lost(self, reason: str) -> None:
        self._connected = False
        self._framer.reset()
        if self._alarm.fail(reason):
            log.error("scanner %s: %s unavailable (%s); retrying", self.name, self.port_url, reason)
        else:
            log.debug("scanner %s: still unavailable (%s)", self.name, reason)

    # -- reader thread ------------------------------------------------------------------------

    def _read_forever(self, worker: Worker) -> None:
        stop, post = worker.stop, worker.post
        backoff = Backoff(REOPEN_FIRST_S, self.reopen_max_s)
        while not stop.is_set():
            try:
                # Exclusive: two lanes configured onto one scanner would each get half the codes.
                port = SerialPort(
                    self.port_url, baudrate=self.baudrate, timeout=READ_TIMEOUT_S, exclusive=True
                )
            except PortGone as exc:
                post(self._on_lost, exc.cause)
                backoff.wait(stop)
                continue
            self._port = port
            backoff.reset()
            if not post(self._on_connected):
                port.close()
                break
            try:
                while not stop.is_set():
                    data = port.read()
                    if data and not post(self._on_data, data):
                        break
            except PortGone as exc:
                if not stop.is_set():
                    post(self._on_lost, exc.cause)
                    stop.wait(REOPEN_FIRST_S)
            except Exception:
                # A thread boundary: a pyserial surprise must not end the scanner for good.
                log.exception("scanner %s: reading %s failed", self.name, self.port_url)
                if not stop.is_set():
                    post(self._on_lost, "read error")
                    stop.wait(REOPEN_FIRST_S)
            finally:
                self._port = None
                port.close()
