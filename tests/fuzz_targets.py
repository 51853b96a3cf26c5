"""One-input fuzz targets shared by the hypothesis tests and the atheris harness.

Each target takes bytes from outside the gate (a scanner's serial line, a token's text, COSE
bytes, signed claims, a SAM reader's replies), drives the real code path in-process as far as
it goes, up to a lane whose ``unlock`` only records the call, and fails (an exception escapes)
on a finding:

- anything but the documented, typed rejection escapes (the drivers turn ``SamFrameError``
  into a counted reason code; ``ScanFramer`` counts its rejections; ``verify_token`` and the
  rules return reasons as values);
- a lane unlocks for something that is not a valid ticket, or a valid ticket's unlock is not
  one recorded unlock of an allowed decision;
- a decision carries no ``Reason``;
- a refusal leaves a reservation behind, or anything at all changes usage.

An unlock that was right is given back at once (``not_passed``), so every input meets the
same cache. The cache is built once per process (lazily, in a temporary folder) or handed in
by the caller (the pytest fixture).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import re
import shutil
import sqlite3
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cbor2

from agent.admission import Admission
from agent.gate.core import Direction
from agent.token_tool import load_trusted_keys
from drivers.base import Credential
from drivers.idcard import (
    HEADER_LEN,
    MAX_LEN,
    PREAMBLE,
    SW_OK,
    CardFields,
    FrameAssembler,
    IdCardReader,
    SamFrameError,
    build_response,
    parse_read_data,
    parse_response,
)
from drivers.qr_serial import TERMINATORS, ScanFramer, Terminator
from drivers.sim.sam import SimCard, synthetic_card
from offline_cache import Cache, holder_hash
from verify.idnumber import card_valid_on, validate_id_number
from verify.model import Decision, Policy, Reason
from verify.token import (
    MAX_CBOR_BYTES,
    PREFIX,
    KeyRing,
    b45decode,
    looks_like_token,
    sign1,
    verify_token,
    wrap,
)

VECTORS_FILE = Path(__file__).parent / "vectors" / "gt1-vectors.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_FILE.read_text())
NOW: float = float(VECTORS["now"])
"""The fixed wall clock of every decision: the vectors' own, so the valid token is valid."""
VALID_TOKEN: str = next(v["text"] for v in VECTORS["vectors"] if v["name"] == "valid")
ISSUER_SEED = bytes.fromhex(VECTORS["test_seeds"]["current"])
"""A test issuer key the ring trusts (token_claims signs with it)."""
ZONE: str = VECTORS["zone"]
LANE = "L1"
DAY = 86400.0
SITE_KEY = bytes(range(32))  # a test key, not a secret
ENROLLED_CARD = synthetic_card(1)
"""The synthetic ID card whose holder has a real-name ticket in the fuzz cache."""

PRODUCTS: list[dict[str, Any]] = [
    {"type": "product", "id": "day", "name": "Day pass", "zones": {ZONE: 1}},
    {"type": "product", "id": "season", "name": "Season", "zones": {ZONE: None}},
]


def _ticket(tid: str, code: str, product: str = "day", **extra: Any) -> dict[str, Any]:
    return {
        "type": "ticket",
        "id": tid,
        "code": code,
        "channel": "ota",
        "product_id": product,
        "valid_from": NOW - DAY,
        "valid_to": NOW + DAY,
        **extra,
    }


TICKETS: list[dict[str, Any]] = [
    _ticket("fz-1", "CODE-FZ-1"),
    _ticket("fz-2", "CODE-FZ-2", "season"),
    _ticket("fz-3", "票-FZ-3"),
    _ticket("fz-old", "CODE-FZ-OLD", valid_to=NOW - 3600),
    _ticket("fz-gone", "CODE-FZ-GONE", status="revoked"),
    _ticket("fz-rn", "CODE-FZ-RN", holder_id=ENROLLED_CARD.id_number),
    _ticket("fz-tok", "GT1:NOT-A-PLAIN-CODE"),
]
VALID_CODES = frozenset({"CODE-FZ-1", "CODE-FZ-2", "票-FZ-3", "CODE-FZ-RN"})
"""Plain codes that may open the lane (every other plain code must be refused)."""
REAL_CODES = (*sorted(VALID_CODES), "CODE-FZ-OLD", "CODE-FZ-GONE", VALID_TOKEN)
"""What a scanner really sends, for seeds and mutations."""

SCANNER_FRAMINGS: tuple[tuple[str, str], ...] = (("", ""), ("\x02", "\x03"), ("]Q1", ""))
"""(prefix, suffix) a scanner may be set up to add: none, STX/ETX, an AIM symbology id."""
SCANNER_TERMINATORS: tuple[Terminator, ...] = ("CR", "LF", "CRLF")
SHORT_MAX_LENGTH = 16
"""The smallest max_length config allows: over-long lines are cheap to reach."""
REASON_CODE = re.compile(r"[a-z][a-z0-9_]*")
FLUSH_EVERY = 2000
"""Inputs between outbox trims and usage checks (the cloud would acknowledge events so)."""


class RecordingLane:
    """A lane that records every unlock and always accepts it."""

    def __init__(self, lane_id: str) -> None:
        self.id = lane_id
        self.unlocks: list[tuple[Direction, str]] = []

    def unlock(self, direction: Direction, auth: str) -> tuple[bool, str | None]:
        self.unlocks.append((direction, auth))
        return True, None

    def take(self) -> list[tuple[Direction, str]]:
        """The unlocks since the last call."""
        got, self.unlocks = self.unlocks, []
        return got


@dataclass
class FuzzContext:
    """An in-process admission with a real cache, and the lane it decides for."""

    cache: Cache
    admission: Admission
    lane: RecordingLane
    keys: KeyRing
    reader: IdCardReader
    enrolled_hash: str
    inputs: int = 0
    unlocked: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @classmethod
    @contextlib.contextmanager
    def open(cls, folder: Path) -> Iterator[FuzzContext]:
        """A fresh cache in ``folder`` holding the fuzz tickets; closed on leaving."""
        with Cache(folder / "gate.db", policy=Policy(), site_key=SITE_KEY) as cache:
            result = cache.import_records([*PRODUCTS, *TICKETS])
            assert result.rejected == 0, result.problems
            keys = load_trusted_keys(VECTORS_FILE)
            admission = Admission(cache, {LANE: ZONE}, Policy(), keys, wall_clock=lambda: NOW)
            # Only its _credential is used (validate and hash): the reader never opens a port.
            reader = IdCardReader("fuzz-id", "loop://", _site_hasher, clock=lambda: NOW)
            enrolled = _site_hasher(ENROLLED_CARD.id_number)
            ctx = cls(cache, admission, RecordingLane(LANE), keys, reader, enrolled)
            yield ctx
            ctx.assert_clean()

    def settle(self, decision: Decision, outcome: str, legit: bool) -> None:
        """Check one decision and what the lane did; give a right unlock back at once."""
        assert isinstance(decision.reason, Reason), decision
        unlocks = self.lane.take()
        self.reasons[decision.reason.value] = self.reasons.get(decision.reason.value, 0) + 1
        if outcome == "unlocked":
            assert legit, f"unlocked for a credential that is not a valid ticket: {decision}"
            assert decision.allowed and decision.reason in (Reason.OK, Reason.OK_EXIT), decision
            assert len(unlocks) == 1, unlocks
            # Nobody walked through: the entry goes back, usage stays as it was.
            assert self.admission.not_passed(unlocks[0][1], "fuzz"), "unlock without a hold"
            self.unlocked += 1
        else:
            assert outcome == "refused", outcome
            assert not unlocks, f"refused ({decision.reason}) yet the lane unlocked"
            assert not decision.allowed, decision
        assert not self.cache.reservations, "a reservation outlived its credential"

    def tick(self) -> None:
        """Count one input; now and then acknowledge the outbox and check usage."""
        self.inputs += 1
        if self.inputs % FLUSH_EVERY == 0:
            # Every refusal queues a "denied" event; at fuzzing speed the writer falls behind
            # and the queue grows without end. Waiting here bounds it, as the cloud's acks do.
            sent = self.cache.mark_sent(self.cache.stats()["outbox"]["last_seq"])
            sent.result(timeout=60)
            self.assert_clean(truncate_wal=True)

    def assert_clean(self, truncate_wal: bool = False) -> None:
        """No usage was ever recorded and no reservation is held."""
        assert not self.cache.reservations
        db = sqlite3.connect(self.cache.path, timeout=10)
        try:
            (rows,) = db.execute("SELECT count(*) FROM usage").fetchone()
            if truncate_wal:
                # The writer commits thousands of events a second while this thread reads:
                # its passive checkpoints never get the WAL reset (measured: 138 MB in 15 s).
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            db.close()
        assert rows == 0, f"usage changed: {rows} row(s)"


def _site_hasher(identifier: str) -> str:
    return holder_hash(SITE_KEY, identifier)


_default: FuzzContext | None = None
_default_stack = contextlib.ExitStack()


def default_context(folder: Path | None = None) -> FuzzContext:
    """The process's context, built on first use (in ``folder``, else a temporary one)."""
    global _default
    if _default is None:
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="gate-fuzz-"))
            _default_stack.callback(shutil.rmtree, folder, ignore_errors=True)
        _default = _default_stack.enter_context(FuzzContext.open(folder))
        atexit.register(_default_stack.close)
    return _default


# --- scanner lines ---------------------------------------------------------------------------


def scanner_input(
    stream: bytes, terminator: int = 0, framing: int = 0, chunk: int = 64, short: bool = False
) -> bytes:
    """The input ``scanner_bytes`` reads as this scanner set-up and stream."""
    setup = terminator % 3 + 3 * (framing % 3) + (9 if short else 0)
    return bytes((setup, (chunk - 1) % 256)) + stream


def scanner_line(code: str, terminator: int = 0, framing: int = 0) -> bytes:
    """A code as a scanner set up so sends it."""
    prefix, suffix = SCANNER_FRAMINGS[framing % 3]
    term = TERMINATORS[SCANNER_TERMINATORS[terminator % 3]]
    return (prefix + code + suffix).encode() + term


def scanner_bytes(data: bytes, ctx: FuzzContext | None = None) -> None:
    """Bytes from a serial QR scanner: framed into codes, each presented at the lane.

    Byte 0 picks the set-up (terminator, framing, max_length), byte 1 the read size; the rest
    is what the port delivers.
    """
    ctx = ctx or default_context()
    ctx.tick()
    if len(data) < 2:
        return
    setup, chunk, stream = data[0], data[1] % 256 + 1, data[2:]
    terminator = SCANNER_TERMINATORS[setup % 3]
    prefix, suffix = SCANNER_FRAMINGS[(setup // 3) % 3]
    max_length = SHORT_MAX_LENGTH if (setup // 9) % 2 else 2048
    framer = ScanFramer(terminator, prefix, suffix, max_length)
    codes: list[str] = []
    for i in range(0, len(stream), chunk):
        codes += framer.feed(stream[i : i + chunk])
        # A garbage stream must not grow the buffer: it is bounded by one line.
        assert len(framer._buf) <= framer._max_line, len(framer._buf)
    for reason in framer.rejected:
        assert REASON_CODE.fullmatch(reason), reason
    whole = ScanFramer(terminator, prefix, suffix, max_length)
    if _fits(stream, TERMINATORS[terminator], framer._max_line):
        # However the port cuts the stream, the same codes come out.
        assert whole.feed(stream) == codes, (whole.feed(b""), codes)
    for code in codes:
        assert isinstance(code, str) and code, code
        assert len(code.encode()) <= max_length
        assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in code), code
        _present_code(ctx, code, "entry")


def _fits(stream: bytes, terminator: bytes, max_line: int) -> bool:
    """Whether every line (and a split terminator's first half) fits the framer's buffer."""
    return all(len(line) + len(terminator) - 1 <= max_line for line in stream.split(terminator))


# --- tokens ----------------------------------------------------------------------------------


def token_text(data: bytes, ctx: FuzzContext | None = None) -> None:
    """Any text presented as a code (a token if it starts GT1:), at the lane."""
    ctx = ctx or default_context()
    ctx.tick()
    _present_code(ctx, data.decode("utf-8", "surrogateescape"), "entry")


def token_cose(data: bytes, ctx: FuzzContext | None = None) -> None:
    """Bytes as a token's COSE_Sign1 (zlib, Base45 and the prefix added), at the lane."""
    ctx = ctx or default_context()
    ctx.tick()
    _present_code(ctx, wrap(data), "entry")


def token_claims(data: bytes, ctx: FuzzContext | None = None) -> None:
    """Bytes as the claims of a token signed by a trusted issuer, at the lane."""
    ctx = ctx or default_context()
    ctx.tick()
    _present_code(ctx, wrap(sign1(data, ISSUER_SEED)), "entry")


def _legit_code(ctx: FuzzContext, code: str) -> bool:
    """Whether a code may open the lane: a cached valid ticket's, or a token that verifies."""
    if looks_like_token(code):
        return verify_token(code, ctx.keys, NOW).ok
    return code in VALID_CODES


def _present_code(ctx: FuzzContext, code: str, direction: str) -> None:
    decision, outcome = ctx.admission.present(ctx.lane, code, direction)
    ctx.settle(decision, outcome, _legit_code(ctx, code) if outcome == "unlocked" else False)


# --- SAM ID-card reader ----------------------------------------------------------------------


def sam_frames(data: bytes, ctx: FuzzContext | None = None) -> None:
    """Bytes from a SAM reader: cut into frames, parsed, and every card read presented.

    Byte 0 picks the read size; every good reply with status 90 is taken as a read reply.
    """
    ctx = ctx or default_context()
    ctx.tick()
    if not data:
        return
    chunk, stream = data[0] + 1, data[1:]
    assembler = FrameAssembler()
    for i in range(0, len(stream), chunk):
        for frame in assembler.feed(stream[i : i + chunk]):
            _reply(ctx, frame)
        # Noise is dropped as it comes: at most one frame (and its header) is ever held.
        assert assembler.pending <= HEADER_LEN + MAX_LEN, assembler.pending


def sam_card_data(data: bytes, ctx: FuzzContext | None = None) -> None:
    """Bytes as the data of a well-formed read reply (lengths, text block, photo)."""
    ctx = ctx or default_context()
    ctx.tick()
    frames = FrameAssembler().feed(build_response(SW_OK, data))
    for frame in frames:
        _reply(ctx, frame)


def _reply(ctx: FuzzContext, frame: bytes) -> None:
    """One frame as the reader's poll handles a read reply (drivers.idcard._poll_once)."""
    try:
        response = parse_response(frame)
    except SamFrameError as exc:
        assert type(exc) is SamFrameError and REASON_CODE.fullmatch(exc.reason), exc
        return
    assert REASON_CODE.fullmatch(response.reason), response.reason
    if response.sw3 != SW_OK:
        return
    try:
        card = parse_read_data(response.data)
    except SamFrameError as exc:
        assert type(exc) is SamFrameError and REASON_CODE.fullmatch(exc.reason), exc
        return
    _present_card(ctx, card)


def _present_card(ctx: FuzzContext, card: CardFields) -> None:
    credential = ctx.reader._credential(card, time.monotonic())
    number = card.id_number.strip()
    if len(number) >= 10:
        # The number goes no further than the driver: not in the credential, hashed or not.
        assert number not in repr(credential), "the ID number leaked into the credential"
    decision, outcome = _present_holder(ctx, credential)
    ctx.settle(decision, outcome, outcome == "unlocked" and _legit_card(ctx, card))


def _present_holder(ctx: FuzzContext, cred: Credential) -> tuple[Decision, str]:
    """What agent.readers.LaneReaders.on_credential does with an ID card, minus its catch-all."""
    problem = (
        None if cred.detail.get("card_valid") else str(cred.detail.get("reason") or "card_invalid")
    )
    return ctx.admission.present_holder(ctx.lane, cred.value, "entry", problem)


def _legit_card(ctx: FuzzContext, card: CardFields) -> bool:
    """Whether a card may open the lane: the enrolled holder's number, valid today."""
    day = time.strftime("%Y%m%d", time.gmtime(NOW + 8 * 3600))
    return (
        validate_id_number(card.id_number, today=day).ok
        and card_valid_on(card.valid_from, card.valid_to, day) is None
        and _site_hasher(card.id_number) == ctx.enrolled_hash
    )


class Target(Protocol):
    """A fuzz target: one input, the process's context unless one is given."""

    def __call__(self, data: bytes, ctx: FuzzContext | None = None) -> None: ...


TARGETS: dict[str, Target] = {
    "scanner_bytes": scanner_bytes,
    "token_text": token_text,
    "token_cose": token_cose,
    "token_claims": token_claims,
    "sam_frames": sam_frames,
    "sam_card_data": sam_card_data,
}
"""Every target by name (the atheris harness's TARGET argument)."""


# --- seeds -----------------------------------------------------------------------------------


def token_texts() -> list[str]:
    """The texts of every committed GT1 test vector (valid and refused ones)."""
    return [v["text"] for v in VECTORS["vectors"] if isinstance(v.get("text"), str)]


def cose_of(text: str) -> bytes | None:
    """A token text's COSE_Sign1 bytes, or None if the text does not unwrap."""
    try:
        return zlib.decompress(b45decode(text[len(PREFIX) :].rstrip("\r\n")))
    except (ValueError, zlib.error):
        return None


def claims_of(cose: bytes) -> bytes | None:
    """The signed payload of a COSE_Sign1, or None if it is not one."""
    try:
        item = cbor2.loads(cose)
        payload = item.value[2]
    except Exception:
        return None
    return payload if isinstance(payload, bytes) else None


def read_reply(card: SimCard) -> bytes:
    """The reply a SAM sends to a read (30 01) with this card on it."""
    return build_response(SW_OK, card.read_data())


def seeds() -> dict[str, list[bytes]]:
    """Real inputs of every target, to start a fuzzer from."""
    lines = [scanner_line(code, t, f) for code in REAL_CODES for t in range(3) for f in range(3)]
    scanner = [
        scanner_input(line, t, f, chunk, short)
        for (t, f, line) in [(i % 3, (i // 3) % 3, line) for i, line in enumerate(lines)]
        for chunk, short in ((64, False), (1, True))
    ]
    scanner.append(scanner_input(b"\x00\xff garbage\r" + scanner_line("CODE-FZ-1") * 2, 0))
    texts = token_texts()
    # Not the zip-bomb vector's megabyte: a fuzzer's input stays under 8 KiB.
    coses = [c for c in map(cose_of, texts) if c is not None and len(c) <= MAX_CBOR_BYTES]
    claims = [c for c in map(claims_of, coses) if c is not None]
    cards = [
        ENROLLED_CARD,
        synthetic_card(2),
        synthetic_card(1, expired=True),
        synthetic_card(1, bad_number=True),
    ]
    replies = [read_reply(card) for card in cards]
    sam_streams = [bytes((0xFF,)) + r for r in replies]
    sam_streams.append(
        bytes((7,))
        + b"\x00\xaa\xaa"
        + build_response(0x9F, bytes(4))
        + build_response(0x80)
        + replies[0]
    )
    return {
        "scanner_bytes": scanner,
        "token_text": [t.encode() for t in [*texts, "CODE-FZ-1", VALID_TOKEN + "\r\n"]],
        "token_cose": coses,
        "token_claims": claims,
        "sam_frames": sam_streams,
        "sam_card_data": [card.read_data() for card in cards],
    }


def dictionary() -> dict[str, list[bytes]]:
    """Tokens of each input's grammar, for a fuzzer to splice in."""
    framing = [b"\r", b"\n", b"\r\n", b"\x02", b"\x03", b"]Q1", b"\x00"]
    token = [PREFIX.encode(), b"\r\n", VALID_TOKEN[4:12].encode()]
    sam = [PREAMBLE, PREAMBLE + b"\x05\x08", b"\x00\x00\x90", b"\x01\x00\x04\x00", b"X\x00"]
    return {
        "scanner_bytes": [*framing, *(c.encode() for c in sorted(VALID_CODES)), *token],
        "token_text": token,
        "token_cose": [b"\xd2\x84", b"\xa2\x01\x27\x04\x48", b"\x58\x40"],
        "token_claims": [b"\x3a\x00\x01\x11\x70", b"\x61z", b"\x62ch", b"\x62ss", b"\x62se"],
        "sam_frames": sam,
        "sam_card_data": sam[2:],
    }
