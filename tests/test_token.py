"""GT1 signed tickets: committed vectors, every refusal, the rules engine, fuzzing, the CLI."""

from __future__ import annotations

import json
import os
import stat
import time
import zlib
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.token_tool import (
    KeyFileError,
    add_token_commands,
    load_seed,
    load_trusted_keys,
    run_token_command,
)
from verify.model import Point, Policy, Reason, Situation, Usage
from verify.rules import decide
from verify.token import (
    BASE45_ALPHABET,
    PREFIX,
    KeyRing,
    TokenClaims,
    TrustedKey,
    b45decode,
    b45encode,
    claims_payload,
    kid_for,
    mint_token,
    public_key_for,
    read_unverified,
    sign1,
    verify_token,
    wrap,
)

VECTORS_FILE = Path(__file__).parent / "vectors" / "gt1-vectors.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_FILE.read_text())
NOW: float = VECTORS["now"]
RING = load_trusted_keys(VECTORS_FILE)
SEED = bytes.fromhex(VECTORS["test_seeds"]["current"])
VALID = next(v["text"] for v in VECTORS["vectors"] if v["name"] == "valid")


def _claims(**over: Any) -> TokenClaims:
    base: dict[str, Any] = {
        "issuer": "demo-park",
        "ticket_id": "T-1",
        "product": "park-day",
        "zones": {"park": 1, "cable": 2},
        "not_before": int(NOW) - 3600,
        "expires": int(NOW) + 3600,
        "issued_at": int(NOW) - 7200,
        "channel": "web",
    }
    base.update(over)
    return TokenClaims(**base)


def _rules(result: Any, zone: str = "park", **situation: Any) -> Reason:
    s = Situation(ticket=result.ticket, product=result.product, **situation)
    return decide(s, Point("lane-1", zone), NOW, Policy()).reason


# --- committed vectors ---------------------------------------------------------------------


@pytest.mark.parametrize("vec", VECTORS["vectors"], ids=lambda v: v["name"])
def test_vector(vec: dict[str, Any]) -> None:
    result = verify_token(vec["text"], RING, NOW)
    assert result.ok is vec["ok"], result.detail
    if vec["ok"]:
        assert result.reason is None
        assert result.claims == vec["claims"]
        assert _rules(result, VECTORS["zone"]).value == vec["rules"]
    else:
        assert result.reason is not None
        assert result.reason.value == vec["reason"]
        assert result.ticket is None and result.product is None and not result.claims


def test_vectors_cover_the_issue_list() -> None:
    names = {v["name"] for v in VECTORS["vectors"]}
    wanted = {
        "valid", "tampered-payload", "wrong-key", "unknown-kid", "expired", "not-yet-valid",
        "truncated-base45", "bad-cbor-envelope", "zip-bomb", "too-long", "wrong-prefix",
        "wrong-alg-es256", "key-outside-window",
    }  # fmt: skip
    assert wanted <= names


def test_vectors_regenerate_to_the_same_verdicts() -> None:
    """The generator still produces what is committed (texts may differ only if zlib does)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_gt1_vectors", VECTORS_FILE.with_name("make_gt1_vectors.py")
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fresh = mod.vectors()
    assert [(v["name"], v["ok"], v.get("reason")) for v in fresh] == [
        (v["name"], v["ok"], v.get("reason")) for v in VECTORS["vectors"]
    ]
    assert verify_token(fresh[0]["text"], RING, NOW).ok


def test_worked_example_stages_match_the_valid_vector() -> None:
    stages = VECTORS["stages_of_valid"]
    assert stages["text"] == VALID
    assert b45decode(VALID[len(PREFIX) :]).hex() == stages["zlib"]
    assert zlib.decompress(bytes.fromhex(stages["zlib"])).hex() == stages["cose_sign1"]
    envelope = cbor2.loads(bytes.fromhex(stages["cose_sign1"]))
    assert envelope.tag == 18
    assert envelope.value[0].hex() == stages["protected"]
    assert envelope.value[2].hex() == stages["claims_cbor"]


# --- the token ticket meets the rules engine ------------------------------------------------


def _ring() -> KeyRing:
    public = public_key_for(SEED)
    return KeyRing([TrustedKey(kid_for(public), public, "demo-park")])


def test_token_becomes_ticket_and_product() -> None:
    c = _claims(slot_start=int(NOW) - 60, slot_end=int(NOW) + 60, max_entries_per_day=2)
    result = verify_token(mint_token(c, SEED), _ring(), NOW)
    assert result.ok
    t, p = result.ticket, result.product
    assert t is not None and p is not None
    assert (t.id, t.code, t.channel, t.product_id) == ("T-1", "GT1:T-1", "web", "gt1:park-day")
    assert (t.valid_from, t.valid_to) == (NOW - 3600, NOW + 3600)
    assert (t.slot_start, t.slot_end, t.max_entries_per_day) == (NOW - 60, NOW + 60, 2)
    assert p.id == t.product_id and dict(p.zones) == {"park": 1, "cable": 2}
    assert result.kid == kid_for(public_key_for(SEED))


def test_bytes_cti_is_ticket_id_in_hex() -> None:
    claims = cbor2.loads(claims_payload(_claims()))
    claims[7] = bytes.fromhex("0102abcd")
    result = verify_token(wrap(sign1(cbor2.dumps(claims), SEED)), _ring(), NOW)
    assert result.ticket is not None and result.ticket.id == "0102abcd"


@pytest.mark.parametrize(
    ("situation", "zone", "reason"),
    [
        ({}, "park", Reason.OK),
        ({}, "museum", Reason.WRONG_ZONE),
        ({"usage": Usage(entries=1)}, "park", Reason.ZONE_USED_UP),
        ({"usage": Usage(entries=1, last_entry_at=NOW - 10)}, "cable", Reason.NO_REENTRY),
    ],
)
def test_token_ticket_goes_through_the_same_rules(
    situation: dict[str, Any], zone: str, reason: Reason
) -> None:
    result = verify_token(mint_token(_claims(), SEED), _ring(), NOW)
    assert _rules(result, zone, **situation) is reason


def test_revocation_and_blocklist_apply_by_cti() -> None:
    from dataclasses import replace

    from verify.model import Block

    result = verify_token(mint_token(_claims(holder_hash="ab" * 32), SEED), _ring(), NOW)
    assert _rules(result, blocks=(Block("ticket", "T-1"),)) is Reason.BLOCKED
    assert _rules(result, blocks=(Block("holder", "ab" * 32),)) is Reason.BLOCKED
    assert result.ticket is not None
    revoked = replace(result, ticket=replace(result.ticket, status="revoked"))
    assert _rules(revoked) is Reason.REVOKED


# --- keys, rotation, windows --------------------------------------------------------------


def test_rotation_two_active_keys_both_verify() -> None:
    seed2 = bytes(range(32))
    pub1, pub2 = public_key_for(SEED), public_key_for(seed2)
    ring = KeyRing(
        [
            TrustedKey(kid_for(pub1), pub1, "demo-park", not_after=NOW + 10),
            TrustedKey(kid_for(pub2), pub2, "demo-park", not_before=NOW - 10),
        ]
    )
    assert verify_token(mint_token(_claims(), SEED), ring, NOW).ok
    assert verify_token(mint_token(_claims(), seed2), ring, NOW).ok
    later = verify_token(mint_token(_claims(), SEED), ring, NOW + 11)
    assert later.reason is Reason.BAD_SIGNATURE and "window" in later.detail


def test_colliding_kids_are_each_tried() -> None:
    seed2 = bytes(range(32))
    pub1, pub2 = public_key_for(SEED), public_key_for(seed2)
    kid = b"\x00" * 8
    ring = KeyRing([TrustedKey(kid, pub2, "demo-park"), TrustedKey(kid, pub1, "demo-park")])
    assert verify_token(mint_token(_claims(), SEED, kid), ring, NOW).ok
    assert len(ring.lookup(kid)) == 2


def test_empty_ring_refuses() -> None:
    assert verify_token(VALID, KeyRing(), NOW).reason is Reason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "over",
    [
        {"expires": int(NOW) - 7200},
        {"slot_start": int(NOW)},
        {"slot_start": int(NOW), "slot_end": int(NOW) - 1},
        {"holder_hash": "not-hex"},
        {"zones": {}},
        {"product": ""},
        {"channel": "x" * 65},
        {"ticket_id": "bad\nid"},
        {"max_entries_total": -1},
        {"max_entries_per_day": True},
    ],
)
def test_signed_but_malformed_claims_are_bad_signature(over: dict[str, Any]) -> None:
    result = verify_token(mint_token(_claims(**over), SEED), _ring(), NOW)
    assert not result.ok and result.reason is Reason.BAD_SIGNATURE
    assert result.ticket is None


def test_trailing_newline_from_a_scanner_is_accepted() -> None:
    assert verify_token(VALID + "\r\n", RING, NOW).ok


def test_never_raises_on_non_text() -> None:
    assert verify_token(None, RING, NOW).reason is Reason.BAD_CODE  # type: ignore[arg-type]


# --- Base45 (RFC 9285) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"AB", "BB8"),
        (b"Hello!!", "%69 VD92EX0"),
        (b"base-45", "UJCLQE7W581"),
        (b"ietf!", "QED8WEX0"),
    ],
)
def test_base45_rfc_examples(raw: bytes, text: str) -> None:
    assert b45encode(raw) == text
    assert b45decode(text) == raw


@pytest.mark.parametrize("bad", ["GGW", "ZZ", "A", "a1b", "é00", "::::"])
def test_base45_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        b45decode(bad)


@given(st.binary(max_size=300))
def test_base45_round_trip(data: bytes) -> None:
    assert b45decode(b45encode(data)) == data


# --- fuzzing ----------------------------------------------------------------------------------


def _refused(text: str) -> None:
    result = verify_token(text, RING, NOW)
    assert not result.ok
    assert result.reason in (Reason.BAD_CODE, Reason.BAD_SIGNATURE)
    assert result.ticket is None


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=600))
def test_fuzz_random_text(text: str) -> None:
    _refused(text)
    _refused(PREFIX + text)


@settings(max_examples=400)
@given(st.binary(max_size=600), st.booleans())
def test_fuzz_random_bytes_in_the_envelope(data: bytes, compress: bool) -> None:
    _refused(PREFIX + b45encode(zlib.compress(data) if compress else data))


@settings(max_examples=300)
@given(st.from_regex(r"[0-9A-Z $%*+\-./:]{0,400}", fullmatch=True))
def test_fuzz_base45_alphabet(body: str) -> None:
    _refused(PREFIX + body)


@settings(max_examples=600)
@given(st.data())
def test_fuzz_mutated_valid_token(data: st.DataObject) -> None:
    body = VALID[len(PREFIX) :]
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "replace", "delete"]))
    i = data.draw(st.integers(0, len(body) - 1))
    if kind == "flip":
        raw = bytearray(b45decode(body))
        j = data.draw(st.integers(0, len(raw) - 1))
        raw[j] ^= 1 << data.draw(st.integers(0, 7))
        mutated = b45encode(bytes(raw))
    elif kind == "truncate":
        mutated = body[:i]
    elif kind == "insert":
        mutated = body[:i] + data.draw(st.sampled_from(BASE45_ALPHABET)) + body[i:]
    elif kind == "replace":
        mutated = body[:i] + data.draw(st.sampled_from(BASE45_ALPHABET)) + body[i + 1 :]
    else:
        mutated = body[:i] + body[i + 1 :]
    if mutated == body:
        return
    _refused(PREFIX + mutated)


@settings(max_examples=300)
@given(st.data())
def test_fuzz_mutated_cose_bytes(data: st.DataObject) -> None:
    """Mutations below zlib reach the CBOR and signature stages (zlib's CRC would stop most)."""
    cose = zlib.decompress(b45decode(VALID[len(PREFIX) :]))
    raw = bytearray(cose)
    for _ in range(data.draw(st.integers(1, 4))):
        j = data.draw(st.integers(0, len(raw) - 1))
        raw[j] = data.draw(st.integers(0, 255))
    if bytes(raw) == cose:
        return
    _refused(PREFIX + b45encode(zlib.compress(bytes(raw))))


def test_verify_time_per_token(capsys: pytest.CaptureFixture[str]) -> None:
    n = 300
    start = time.perf_counter()
    for _ in range(n):
        assert verify_token(VALID, RING, NOW).ok
    us = (time.perf_counter() - start) / n * 1e6
    with capsys.disabled():
        print(f"\ntoken_verify_us {us:.0f}")
    assert us < 5000


# --- gatectl token -------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="gatectl")
    add_token_commands(parser.add_subparsers(dest="command", required=True))
    return run_token_command(parser.parse_args(argv))


def test_keygen_mint_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "issuer.key"
    assert _run(["token", "keygen", "--out", str(key)]) == 0
    out = capsys.readouterr().out
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    seed = load_seed(key)
    public = public_key_for(seed)
    assert public.hex() in out and kid_for(public).hex() in out and seed.hex() not in out
    assert _run(["token", "keygen", "--out", str(key)]) == 1  # never overwrites

    trusted = tmp_path / "trusted.toml"
    trusted.write_text(
        f'[[keys]]\nissuer = "demo-park"\npublic_key = "{public.hex()}"\n'
        f"not_before = 2020-01-01T00:00:00Z\n"
    )
    argv = [
        "token", "mint", "--key", str(key), "--ticket", "T-9", "--product", "combo",
        "--zone", "park=1", "--zone", "cable=*", "--valid-from", "2026-05-28T00:00:00+08:00",
        "--valid-to", "2026-05-29T00:00:00+08:00", "--max-total", "3",
    ]  # fmt: skip
    assert _run(argv) == 0
    code = capsys.readouterr().out.strip()
    assert code.startswith(PREFIX)
    ring = load_trusted_keys(trusted)
    result = verify_token(code, ring, NOW)
    assert result.ok and result.claims["zones"] == {"park": 1, "cable": None}

    assert _run(["token", "inspect", code, "--keys", str(trusted), "--now", str(NOW)]) == 0
    shown = capsys.readouterr().out
    assert "verdict" in shown and "T-9" in shown and seed.hex() not in shown
    assert _run(["token", "inspect", code, "--json"]) == 1
    unverified = json.loads(capsys.readouterr().out)
    assert unverified["verified"] is False and unverified["claims"]["cti"] == "T-9"
    assert _run(["token", "inspect", "GT1:XYZ", "--keys", str(trusted)]) == 1
    assert "bad_code" in capsys.readouterr().out


def test_mint_refuses_local_time_without_offset(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(SEED)
    argv = [
        "token", "mint", "--key", str(key), "--ticket", "T", "--product", "p", "--zone", "park=1",
        "--valid-from", "2026-05-28T00:00:00", "--valid-to", "2026-05-29T00:00:00Z",
    ]  # fmt: skip
    assert _run(argv) == 1


def test_inspect_vectors_file_as_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["token", "inspect", VALID, "--keys", str(VECTORS_FILE), "--now", "0"]) == 0
    assert "not_yet_valid" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content",
    [
        "keys = 1",
        '[[keys]]\nissuer = "x"\n',
        '[[keys]]\nissuer = "x"\npublic_key = "abcd"\n',
        f'[[keys]]\nissuer = "x"\npublic_key = "{"00" * 32}"\nkid = "0011223344556677"\n',
        f'[[keys]]\nissuer = "x"\npublic_key = "{"00" * 32}"\nwindow = 3\n',
        f'[[keys]]\nissuer = "x"\npublic_key = "{"00" * 32}"\nnot_after = "2026-01-01"\n',
    ],
)
def test_trusted_keys_file_errors_name_the_field(tmp_path: Path, content: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(content)
    with pytest.raises(KeyFileError, match=r"keys"):
        load_trusted_keys(path)


def test_seed_file_formats(tmp_path: Path) -> None:
    (tmp_path / "raw").write_bytes(SEED)
    (tmp_path / "hex").write_text(SEED.hex() + "\n")
    (tmp_path / "bad").write_text("nope")
    assert load_seed(tmp_path / "raw") == load_seed(tmp_path / "hex") == SEED
    with pytest.raises(KeyFileError):
        load_seed(tmp_path / "bad")


def test_read_unverified_never_raises() -> None:
    assert read_unverified("nonsense")[1] is None
    kid, claims, _ = read_unverified(VALID)
    assert kid is not None and claims is not None and claims["iss"] == "demo-park"


def test_spec_worked_example_is_the_committed_vector() -> None:
    spec = (Path(__file__).parents[1] / "docs" / "ticket-token.md").read_text()
    stages = VECTORS["stages_of_valid"]
    flat = "".join(spec.split())
    assert stages["text"] in spec
    for name in ("claims_cbor", "protected", "sig_structure", "signature", "cose_sign1", "zlib"):
        assert stages[name] in flat, name
    assert VECTORS["keys"][0]["public_key"] in spec and VECTORS["keys"][0]["kid"] in spec


@pytest.mark.parametrize(
    "tag", [0, 1, 2, 3, 4, 5, 18, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261,
            1004, 43000, 55799, 65535, 2**32, 2**64 - 1],
)  # fmt: skip
def test_strict_cbor_refuses_every_tag(tag: int) -> None:
    from verify.token import _strict_cbor

    for value in (0, b"\x00" * 4, "x", [0, 0], {1: 2}):
        with pytest.raises(Exception):  # noqa: B017 - any decoder error is a refusal
            _strict_cbor(cbor2.dumps([cbor2.CBORTag(tag, value)]), max_depth=3)
