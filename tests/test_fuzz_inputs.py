"""Fuzzing what the lanes take from outside: scanner lines, tokens and SAM frames, random and
mutated from real ones, through admission to a lane that records unlocks. Nothing crashes,
nothing but a valid ticket opens, every decision has a reason code, and a refusal changes
no usage. The same targets run longer under atheris (``make fuzz``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cbor2
import pytest
from fuzz_targets import (
    ENROLLED_CARD,
    REAL_CODES,
    TARGETS,
    VALID_CODES,
    VALID_TOKEN,
    FuzzContext,
    claims_of,
    cose_of,
    read_reply,
    sam_card_data,
    sam_frames,
    scanner_bytes,
    scanner_input,
    scanner_line,
    seeds,
    token_claims,
    token_cose,
    token_text,
    token_texts,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.idcard import checksum
from drivers.sim.sam import SimCard, synthetic_card
from verify.token import BASE45_ALPHABET

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_COSE = cose_of(VALID_TOKEN)
assert VALID_COSE is not None
VALID_CLAIMS = claims_of(VALID_COSE)
assert VALID_CLAIMS is not None
NOISE = b"\r\n\x00\x02\x03\xaa\x96\x69" + BASE45_ALPHABET.encode()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzContext]:
    """One cache for the whole module; every input must leave it as it found it."""
    with FuzzContext.open(tmp_path_factory.mktemp("fuzz")) as context:
        yield context


@st.composite
def mutated(draw: st.DrawFn, base: bytes, max_ops: int = 6) -> bytes:
    """``base`` with a few byte flips, overwrites, insertions, deletions, cuts or repeats."""
    data = bytearray(base)
    byte = st.one_of(st.sampled_from(NOISE), st.integers(0, 255))
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut", "repeat"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "insert":
            data[i:i] = bytes((draw(byte),))
        elif not data:
            continue
        elif op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(byte)
        elif op == "delete":
            del data[i]
        elif op == "cut":
            del data[i:]
        else:
            j = draw(st.integers(i, min(len(data), i + 64)))
            data[j:j] = data[i:j]
    return bytes(data)


# --- the harness sees what it must ---------------------------------------------------------


def test_seeds_run_and_real_credentials_open(ctx: FuzzContext) -> None:
    """Every seed passes; the real valid credentials among them do open (and are given back)."""
    for name, target in TARGETS.items():
        for seed in seeds()[name]:
            target(seed, ctx)
    before = ctx.unlocked
    for code in sorted(VALID_CODES):
        scanner_bytes(scanner_input(scanner_line(code, 2), 2), ctx)
    token_text(VALID_TOKEN.encode(), ctx)
    sam_frames(b"\x00" + read_reply(ENROLLED_CARD), ctx)
    assert ctx.unlocked - before == len(VALID_CODES) + 2
    for code in ("CODE-FZ-OLD", "CODE-FZ-GONE", "GT1:NOT-A-PLAIN-CODE", "code-fz-1", "CODE-FZ-1 x"):
        scanner_bytes(scanner_input(scanner_line(code)), ctx)
    for card in (
        synthetic_card(2),
        synthetic_card(1, expired=True),
        synthetic_card(1, bad_number=True),
    ):
        sam_frames(b"\x00" + read_reply(card), ctx)
    assert ctx.unlocked - before == len(VALID_CODES) + 2
    ctx.assert_clean()


@pytest.mark.parametrize("terminator", [0, 1, 2])
@pytest.mark.parametrize("framing", [0, 1, 2])
def test_real_lines_in_any_set_up_and_read_size_open_each_valid_code(
    ctx: FuzzContext, terminator: int, framing: int
) -> None:
    stream = b"".join(scanner_line(code, terminator, framing) for code in REAL_CODES)
    for chunk in (1, 2, 3, 7, 256):
        before = ctx.unlocked
        scanner_bytes(scanner_input(stream, terminator, framing, chunk), ctx)
        assert ctx.unlocked - before == len(VALID_CODES) + 1  # and the token


# --- random bytes into every target --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TARGETS))
@FUZZ
@given(data=st.binary(max_size=1500))
def test_random_bytes(ctx: FuzzContext, name: str, data: bytes) -> None:
    TARGETS[name](data, ctx)


# --- mutations of real inputs ---------------------------------------------------------------


@FUZZ
@given(
    codes=st.lists(st.sampled_from(REAL_CODES), min_size=1, max_size=4),
    terminator=st.integers(0, 2),
    framing=st.integers(0, 2),
    chunk=st.integers(1, 256),
    short=st.booleans(),
    data=st.data(),
)
def test_mutated_scanner_lines(
    ctx: FuzzContext,
    codes: list[str],
    terminator: int,
    framing: int,
    chunk: int,
    short: bool,
    data: st.DataObject,
) -> None:
    stream = b"".join(scanner_line(code, terminator, framing) for code in codes)
    stream = data.draw(mutated(stream))
    scanner_bytes(scanner_input(stream, terminator, framing, chunk, short), ctx)


@FUZZ
@given(data=st.data(), text=st.sampled_from(token_texts()))
def test_mutated_token_texts(ctx: FuzzContext, text: str, data: st.DataObject) -> None:
    token_text(data.draw(mutated(text.encode())), ctx)


@FUZZ
@given(data=st.data())
def test_mutated_cose(ctx: FuzzContext, data: st.DataObject) -> None:
    assert VALID_COSE is not None
    token_cose(data.draw(mutated(VALID_COSE, 4)), ctx)


@FUZZ
@given(data=st.data())
def test_mutated_signed_claims(ctx: FuzzContext, data: st.DataObject) -> None:
    """Claims a trusted issuer signed, damaged below the signature: the decoder's own checks."""
    assert VALID_CLAIMS is not None
    token_claims(data.draw(mutated(VALID_CLAIMS, 4)), ctx)


CBOR_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=80),
        st.binary(max_size=40),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=3) | st.integers(), inner)
    ),
    max_leaves=8,
)


@FUZZ
@given(data=st.data())
def test_signed_claims_with_odd_values(ctx: FuzzContext, data: st.DataObject) -> None:
    """A trusted issuer's claims with one value replaced, removed or added, well encoded."""
    assert VALID_CLAIMS is not None
    claims: dict[Any, Any] = cbor2.loads(VALID_CLAIMS)
    ticket: dict[Any, Any] = claims[-70001]
    where = data.draw(st.sampled_from([claims, ticket, ticket["z"]]))
    key = data.draw(st.sampled_from([*where, "z2", 8, -70002]))
    if data.draw(st.booleans()) and key in where:
        del where[key]
    else:
        where[key] = data.draw(CBOR_VALUES)
    token_claims(cbor2.dumps(claims), ctx)


def _fix_checksum(frame: bytes) -> bytes:
    return frame[:-1] + bytes((checksum(frame[5:-1]),)) if len(frame) > 7 else frame


@FUZZ
@given(
    card=st.sampled_from([ENROLLED_CARD, synthetic_card(1, expired=True)]),
    fix=st.booleans(),
    chunk=st.integers(1, 256),
    noise=st.binary(max_size=16),
    data=st.data(),
)
def test_mutated_sam_replies(
    ctx: FuzzContext, card: SimCard, fix: bool, chunk: int, noise: bytes, data: st.DataObject
) -> None:
    """A real read reply damaged; with ``fix`` its checksum is made good, so the damage
    reaches the text block and the ID-number checks."""
    frame = data.draw(mutated(read_reply(card)))
    if fix:
        frame = _fix_checksum(frame)
    sam_frames(bytes((chunk - 1,)) + noise + frame, ctx)


@FUZZ
@given(data=st.data())
def test_mutated_card_text(ctx: FuzzContext, data: st.DataObject) -> None:
    read_data = bytearray(ENROLLED_CARD.read_data())
    for _ in range(data.draw(st.integers(1, 6))):
        # Bytes 4..260 are the text block: the number at 126, the dates at 192 and 208.
        i = data.draw(st.sampled_from([*range(126, 162), *range(192, 224)]) | st.integers(0, 260))
        read_data[i] = data.draw(st.sampled_from(b"0123456789X \x00\xff") | st.integers(0, 255))
    sam_card_data(bytes(read_data), ctx)
