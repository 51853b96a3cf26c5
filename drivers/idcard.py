"""Chinese resident ID-card reader: a SAM module spoken to over serial.

The port is ``drivers.serial_port``'s, the one owner of pyserial. The ID number is turned
into the holder's keyed hash the moment it is parsed and is never stored, logged or raised;
frames carry the name and number too, so their bytes never reach a log line either.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from drivers.base import Credential, CredentialListener, DriverError
from drivers.reader_thread import Alarm, Backoff, Worker, run_in_thread
from drivers.serial_port import PortGone, SerialPort
from verify.idnumber import NO_EXPIRY, card_valid_on, parse_day, validate_id_number

log = logging.getLogger(__name__)

PREAMBLE = b"\xaa\xaa\xaa\x96\x69"
HEADER_LEN = len(PREAMBLE) + 2
# The longest real reply (text + photo + fingerprint) is 2321 bytes; more is a misread length.
MAX_LEN = 4096

CMD_RESET = (0x01, 0xFF)
CMD_SAM_STATUS = (0x11, 0xFF)
CMD_SAM_ID = (0x12, 0xFF)
CMD_FIND = (0x20, 0x01)
CMD_SELECT = (0x20, 0x02)
CMD_READ = (0x30, 0x01)

SW_OK = 0x90
SW_CARD_FOUND = 0x9F
SW_NO_CARD = 0x80

# SW3 -> stable reason code shared with the logs, stats and the lane display.
STATUS_REASONS: dict[int, str] = {
    0x90: "ok",
    0x9F: "card_found",
    0x80: "no_card",
    0x81: "select_failed",
    0x91: "no_content",
    0x10: "sam_checksum_error",
    0x11: "sam_length_error",
    0x21: "sam_bad_command",
    0x23: "sam_unauthorised_command",
    0x24: "sam_unrecognised_error",
    0x31: "card_auth_of_sam_failed",
    0x32: "sam_auth_of_card_failed",
    0x33: "card_validation_error",
    0x40: "unknown_card_type",
    0x41: "card_read_failed",
    0x47: "random_number_failed",
    0x60: "sam_self_test_failed",
    0x66: "sam_not_authorised",
}

TEXT_LEN = 256
PHOTO_LEN = 1024
# (offset, length) in bytes of the fields we need in the UCS-2 text block; the name, address
# and the rest are never decoded, so they cannot leak from here.
FIELD_ID_NUMBER = (122, 36)
FIELD_VALID_FROM = (188, 16)
FIELD_VALID_TO = (204, 16)


class SamError(DriverError):
    """A reply that cannot be used; ``reason`` is a stable code and the only message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SamFrameError(SamError):
    """A frame that is malformed: bad preamble, length or checksum, or cut short."""


class SamStatusError(SamError):
    """A well-formed reply whose status (SW3) reports a failure."""

    def __init__(self, sw3: int) -> None:
        super().__init__(STATUS_REASONS.get(sw3, "sam_status_unknown"))
        self.sw3 = sw3


def checksum(data: bytes) -> int:
    """XOR of every byte."""
    value = 0
    for byte in data:
        value ^= byte
    return value


def build_request(cmd: int, para: int, data: bytes = b"") -> bytes:
    """A request frame: preamble, length, CMD, PARA, data, checksum."""
    body = bytes((cmd, para)) + data
    length = (len(body) + 1).to_bytes(2, "big")
    return PREAMBLE + length + body + bytes((checksum(length + body),))


def build_response(sw3: int, data: bytes = b"", sw1: int = 0, sw2: int = 0) -> bytes:
    """A reply frame as a SAM sends it (used by the simulator and tests)."""
    body = bytes((sw1, sw2, sw3)) + data
    length = (len(body) + 1).to_bytes(2, "big")
    return PREAMBLE + length + body + bytes((checksum(length + body),))


@dataclass(frozen=True)
class Response:
    """A reply with a good checksum: its three status bytes and its data."""

    sw1: int
    sw2: int
    sw3: int
    data: bytes = field(repr=False)

    @property
    def reason(self) -> str:
        """The stable reason code of the status."""
        return STATUS_REASONS.get(self.sw3, "sam_status_unknown")


def parse_response(frame: bytes) -> Response:
    """Parse one complete reply frame; raises SamFrameError only."""
    if len(frame) < HEADER_LEN or frame[: len(PREAMBLE)] != PREAMBLE:
        raise SamFrameError("frame_bad_preamble")
    length = int.from_bytes(frame[5:7], "big")
    if length < 4 or length > MAX_LEN:
        raise SamFrameError("frame_bad_length")
    if len(frame) < HEADER_LEN + length:
        raise SamFrameError("frame_truncated")
    if len(frame) > HEADER_LEN + length:
        raise SamFrameError("frame_bad_length")
    if checksum(frame[5:-1]) != frame[-1]:
        raise SamFrameError("frame_bad_checksum")
    return Response(frame[7], frame[8], frame[9], bytes(frame[10:-1]))


class FrameAssembler:
    """Cuts a byte stream into frames, skipping noise before a preamble."""

    def __init__(self, min_len: int = 4) -> None:
        # A reply holds at least SW1 SW2 SW3 CHK; a request only CMD PARA CHK.
        self.min_len = min_len
        self._buf = bytearray()
        self.skipped = 0

    def clear(self) -> None:
        """Forget partial input (after a timeout, so late bytes cannot shift later replies)."""
        self._buf.clear()

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return every complete frame (checksum not yet checked)."""
        self._buf += data
        frames: list[bytes] = []
        while True:
            start = self._buf.find(PREAMBLE)
            if start < 0:
                # Keep a tail that may be the start of a preamble split across reads.
                keep = len(PREAMBLE) - 1
                if len(self._buf) > keep:
                    self.skipped += len(self._buf) - keep
                    del self._buf[:-keep]
                return frames
            if start:
                self.skipped += start
                del self._buf[:start]
            if len(self._buf) < HEADER_LEN:
                return frames
            length = int.from_bytes(self._buf[5:7], "big")
            if length < self.min_len or length > MAX_LEN:
                # A corrupt length: drop this preamble and look for the next one.
                self.skipped += 1
                del self._buf[:1]
                continue
            if len(self._buf) < HEADER_LEN + length:
                return frames
            frames.append(bytes(self._buf[: HEADER_LEN + length]))
            del self._buf[: HEADER_LEN + length]


@dataclass(frozen=True)
class CardFields:
    """What the driver takes from a card's text block; the number is hidden from repr."""

    id_number: str = field(repr=False)
    valid_from: str
    valid_to: str


def _field(text: bytes, spec: tuple[int, int]) -> str:
    offset, length = spec
    raw = text[offset : offset + length]
    try:
        value = raw.decode("utf-16-le")
    except UnicodeDecodeError:
        raise SamFrameError("text_undecodable") from None
    # Space padded on the card; some readers pad with NULs instead.
    return value.strip(" \x00")


def parse_read_data(data: bytes) -> CardFields:
    """The ID number and validity dates from a 30 01 reply's data; raises SamFrameError only."""
    if len(data) < 4:
        raise SamFrameError("read_data_short")
    text_len = int.from_bytes(data[0:2], "big")
    photo_len = int.from_bytes(data[2:4], "big")
    if text_len != TEXT_LEN or len(data) < 4 + text_len + photo_len:
        raise SamFrameError("read_data_bad_length")
    text = data[4 : 4 + text_len]
    return CardFields(
        id_number=_field(text, FIELD_ID_NUMBER),
        valid_from=_field(text, FIELD_VALID_FROM),
        valid_to=_field(text, FIELD_VALID_TO),
    )


def _date_or_empty(text: str) -> str:
    """The field if it is a date (or 长期); anything else from a misread block is dropped."""
    return text if text == NO_EXPIRY or parse_day(text) is not None else ""


class _LinkLost(Exception):
    """The serial device failed or vanished; the port must be reopened."""


@dataclass
class _Stats:
    connected: bool = False
    polls: int = 0
    cards_found: int = 0
    reads: int = 0
    invalid_cards: int = 0
    bad_frames: int = 0
    timeouts: int = 0
    status_errors: int = 0
    reopens: int = 0
    last_error: str | None = None
    errors: Counter[str] = field(default_factory=Counter)


class IdCardReader:
    """Polls a SAM reader (find, select, read) and hands on each card as a hashed Credential."""

    def __init__(
        self,
        name: str,
        port_url: str,
        hasher: Callable[[str], str],
        baudrate: int = 115200,
        poll_s: float = 0.2,
        reply_timeout_s: float = 1.0,
        read_timeout_s: float = 2.0,
        reread_after_s: float = 10.0,
        absent_polls_to_clear: int = 1,
        silent_replies_to_reopen: int = 3,
        reopen_min_s: float = 0.2,
        reopen_max_s: float = 5.0,
        utc_offset_h: float = 8.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.port_url = port_url
        self._hasher = hasher
        self.baudrate = baudrate
        self.poll_s = poll_s
        self.reply_timeout_s = reply_timeout_s
        self.read_timeout_s = read_timeout_s
        self.reread_after_s = reread_after_s
        self.absent_polls_to_clear = absent_polls_to_clear
        self.silent_replies_to_reopen = silent_replies_to_reopen
        self.reopen_min_s = reopen_min_s
        self.reopen_max_s = reopen_max_s
        self.utc_offset_h = utc_offset_h
        self._clock = clock
        self._monotonic = monotonic
        self._port: SerialPort | None = None
        self._assembler = FrameAssembler()
        self._stats = _Stats()
        self._alarm = Alarm()
        # The worker adds error codes while stats() copies them from the event loop.
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        # The latch: a card stays "already read" until it leaves the field or the time runs out.
        self._latched_at: float | None = None
        self._absent_polls = 0
        self._silent = 0
        self._backoff = Backoff(reopen_min_s, reopen_max_s)

    async def run(self, listener: CredentialListener) -> None:
        """Poll the reader in its own thread until cancelled; never raises on reader faults."""
        # One thread owns the port: a blocking read never stalls the event loop, and nothing
        # else can interleave bytes on the line.
        await run_in_thread(
            f"idcard {self.name}",
            functools.partial(self._worker, listener),
            stop_wait_s=self.read_timeout_s + 1.0,
        )

    def stats(self) -> dict[str, object]:
        """Counters and link state for status output."""
        s = self._stats
        with self._stats_lock:
            errors = dict(s.errors)
        return {
            "connected": s.connected,
            "alarm": self._alarm.reason,
            "polls": s.polls,
            "cards_found": s.cards_found,
            "reads": s.reads,
            "invalid_cards": s.invalid_cards,
            "bad_frames": s.bad_frames,
            "timeouts": s.timeouts,
            "status_errors": s.status_errors,
            "reopens": s.reopens,
            "last_error": s.last_error,
            "errors": errors,
        }

    def _deliver(self, listener: CredentialListener, credential: Credential) -> None:
        try:
            listener(credential)
        except Exception:
            log.exception("id reader %s: credential listener failed", self.name)

    def _worker(self, listener: CredentialListener, worker: Worker) -> None:
        self._stop = worker.stop

        def deliver(credential: Credential) -> None:
            worker.post(self._deliver, listener, credential)

        try:
            while not self._stop.is_set():
                try:
                    if self._port is None and not self._open():
                        self._backoff.wait(self._stop)
                        continue
                    self._poll_once(deliver)
                except _LinkLost as exc:
                    self._lose_link(str(exc))
                    continue
                except Exception as exc:
                    # The boundary: a bug here must not end the reader for good. Code lines
                    # only, no exception text: it could quote the card's fields.
                    log.error(
                        "id reader %s: poll failed (%s)\n%s",
                        self.name,
                        type(exc).__name__,
                        "".join(traceback.format_tb(exc.__traceback__)),
                    )
                    self._lose_link("internal_error")
                    continue
                self._stop.wait(self.poll_s)
        finally:
            self._close()

    def _open(self) -> bool:
        try:
            self._port = SerialPort(
                self.port_url, baudrate=self.baudrate, timeout=0.05, write_timeout=1.0
            )
        except PortGone as exc:
            self._port = None
            self._stats.connected = False
            self._outage("port_unavailable", exc.cause)
            return False
        self._assembler.clear()
        self._silent = 0
        self._stats.connected = True
        if self._alarm.up:
            self._stats.reopens += 1
        return True

    def _outage(self, reason: str, cause: str = "") -> None:
        """Raise the alarm: logged once at ERROR, repeats at DEBUG until a good reply."""
        if self._alarm.fail(reason):
            log.error(
                "id reader %s: %s on %s (%s); retrying",
                self.name,
                reason,
                self.port_url,
                cause or reason,
            )
        else:
            log.debug("id reader %s: still %s", self.name, reason)

    def _recovered(self) -> None:
        if self._alarm.recover():
            log.warning("id reader %s: answering again on %s", self.name, self.port_url)
        self._backoff.reset()

    def _lose_link(self, reason: str) -> None:
        self._outage(reason)
        self._stats.connected = False
        self._count_error(reason)
        self._close()
        # Card state is unknown after an outage: the next card on the reader is a new passage.
        self._latched_at = None
        self._backoff.wait(self._stop)

    def _close(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None

    def _count_error(self, reason: str) -> None:
        with self._stats_lock:
            self._stats.last_error = reason
            self._stats.errors[reason] += 1

    def _transact(self, cmd: tuple[int, int], timeout_s: float) -> tuple[Response, float] | None:
        """Send one request and wait for its reply; None (counted) on a bad or missing reply."""
        port = self._port
        assert port is not None
        heard = False
        try:
            port.discard_input()
            port.write(build_request(*cmd))
            deadline = self._monotonic() + timeout_s
            while True:
                chunk = port.read()
                heard = heard or bool(chunk)
                frames = self._assembler.feed(chunk) if chunk else []
                if frames:
                    done_at = self._monotonic()
                    break
                if self._stop.is_set():
                    return None
                if self._monotonic() > deadline:
                    self._assembler.clear()
                    self._stats.timeouts += 1
                    self._count_error("reply_timeout")
                    # A cut-short reply still shows a live line; only silence means reopen.
                    self._silent = 0 if heard else self._silent + 1
                    if self._silent >= self.silent_replies_to_reopen:
                        raise _LinkLost("reader_silent")
                    return None
        except PortGone as exc:
            raise _LinkLost("io_error") from exc
        self._silent = 0
        # One request, one reply: anything after the first frame is stale.
        self._assembler.clear()
        try:
            response = parse_response(frames[0])
        except SamFrameError as exc:
            self._stats.bad_frames += 1
            self._count_error(exc.reason)
            log.debug("id reader %s: bad reply (%s)", self.name, exc.reason)
            return None
        self._recovered()
        return response, done_at

    def _status_error(self, response: Response) -> None:
        self._stats.status_errors += 1
        self._count_error(response.reason)
        log.debug("id reader %s: status %s", self.name, response.reason)

    def _poll_once(self, deliver: Callable[[Credential], None]) -> None:
        self._stats.polls += 1
        found = self._transact(CMD_FIND, self.reply_timeout_s)
        if found is None:
            return
        response, _ = found
        if response.sw3 == SW_NO_CARD:
            self._absent_polls += 1
            if self._absent_polls >= self.absent_polls_to_clear:
                self._latched_at = None
            return
        if response.sw3 != SW_CARD_FOUND:
            self._status_error(response)
            return
        self._absent_polls = 0
        now = self._monotonic()
        if self._latched_at is not None and now - self._latched_at < self.reread_after_s:
            return
        self._stats.cards_found += 1
        selected = self._transact(CMD_SELECT, self.reply_timeout_s)
        if selected is None:
            return
        if selected[0].sw3 != SW_OK:
            self._status_error(selected[0])
            return
        read = self._transact(CMD_READ, self.read_timeout_s)
        if read is None:
            return
        response, done_at = read
        if response.sw3 != SW_OK:
            self._status_error(response)
            return
        try:
            card = parse_read_data(response.data)
        except SamFrameError as exc:
            self._stats.bad_frames += 1
            self._count_error(exc.reason)
            return
        credential = self._credential(card, done_at)
        # Latch only once a credential exists: a failed read is retried on the next poll.
        self._latched_at = now
        self._stats.reads += 1
        deliver(credential)

    def _credential(self, card: CardFields, done_at: float) -> Credential:
        """Validate and hash at once; the number goes no further than this function."""
        day = time.strftime("%Y%m%d", time.gmtime(self._clock() + self.utc_offset_h * 3600))
        check = validate_id_number(card.id_number, today=day)
        value = ""
        reason = check.reason
        if check.ok:
            try:
                value = self._hasher(card.id_number)
            except Exception:
                # The hasher's own message could echo its input: never let it out.
                reason = "hash_failed"
        if reason is None:
            reason = card_valid_on(card.valid_from, card.valid_to, day)
        if reason is not None:
            self._stats.invalid_cards += 1
            self._count_error(reason)
            log.info("id reader %s: card not accepted (%s)", self.name, reason)
        return Credential(
            kind="idcard",
            value=value,
            reader=self.name,
            at=done_at,
            detail={
                "valid_from": _date_or_empty(card.valid_from),
                "valid_to": _date_or_empty(card.valid_to),
                "card_valid": reason is None,
                "reason": reason,
            },
        )
