"""GT1 signed ticket tokens: verify (and, for installers and tests, mint) offline QR tickets.

A GT1 token is ``"GT1:" + Base45(zlib(COSE_Sign1(CWT claims)))`` signed with Ed25519; the
format is specified in docs/ticket-token.md. Verification only decides whether the token is
authentic and well formed and turns its claims into a ``Ticket`` and ``Product``; validity
times, zones, entries, revocations and the blocklist are left to the rules engine
(``verify.rules.decide``) so a token ticket is judged exactly like a cached one.

Nothing attacker-controlled is parsed beyond the COSE envelope before the signature has been
checked, every stage is size-bounded, and ``verify_token`` never raises.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from verify.model import Product, Reason, Ticket

PREFIX = "GT1:"
MAX_TEXT_CHARS = 4096
"""Longest token text accepted; a QR code in alphanumeric mode holds at most 4296 chars."""
MAX_CBOR_BYTES = 8192
"""Largest decompressed COSE_Sign1 accepted (zip-bomb bound); real tokens are ~250 bytes."""
MAX_PROTECTED_BYTES = 64
KID_BYTES = 8
SIGNATURE_BYTES = 64
ALG_EDDSA = -8
COSE_SIGN1_TAG = 18

# COSE header labels (RFC 9052) and CWT claim keys (RFC 8392).
HDR_ALG = 1
HDR_KID = 4
CLAIM_ISS = 1
CLAIM_EXP = 4
CLAIM_NBF = 5
CLAIM_IAT = 6
CLAIM_CTI = 7
CLAIM_TICKET = -70001
"""GT1 ticket claims; integers below -65536 are private use in the IANA CWT registry."""

_CWT_KEYS = frozenset({CLAIM_ISS, CLAIM_EXP, CLAIM_NBF, CLAIM_IAT, CLAIM_CTI, CLAIM_TICKET})
_TICKET_KEYS = frozenset({"p", "z", "ch", "ss", "se", "md", "mt", "h"})
_MAX_TEXT_CLAIM = 64
_MAX_ZONES = 16
_MAX_COUNT = 1_000_000
_MAX_TIME = 2**40
"""Epoch seconds beyond year 36812 are a malformed claim, not a date."""
_HEX = frozenset("0123456789abcdef")

BASE45_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
_B45_TABLE = bytes(
    BASE45_ALPHABET.index(chr(b)) if chr(b) in BASE45_ALPHABET else 0xFF for b in range(256)
)


class _Reject(Exception):
    """A token refused with a reason code (internal: verify_token returns it as a value)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def b45encode(data: bytes) -> str:
    """Base45-encode bytes (RFC 9285)."""
    out: list[str] = []
    for i in range(0, len(data) - 1, 2):
        n = data[i] * 256 + data[i + 1]
        c, rest = divmod(n, 45 * 45)
        b, a = divmod(rest, 45)
        out += (BASE45_ALPHABET[a], BASE45_ALPHABET[b], BASE45_ALPHABET[c])
    if len(data) % 2:
        b, a = divmod(data[-1], 45)
        out += (BASE45_ALPHABET[a], BASE45_ALPHABET[b])
    return "".join(out)


def b45decode(text: str) -> bytes:
    """Decode RFC 9285 Base45 strictly: alphabet only, no dangling char, no overflowing group."""
    if len(text) % 3 == 1:
        raise ValueError("base45 length leaves a single character")
    if not text.isascii():
        raise ValueError("character outside the base45 alphabet")
    # One C-level pass maps every character to its value (0xFF: not in the alphabet); this
    # keeps decoding near 15 µs for a typical token instead of 40 µs with a dict lookup.
    values = text.encode("ascii").translate(_B45_TABLE)
    if b"\xff" in values:
        raise ValueError("character outside the base45 alphabet")
    out = bytearray()
    full = len(values) - len(values) % 3
    for i in range(0, full, 3):
        n = values[i] + values[i + 1] * 45 + values[i + 2] * 2025
        if n > 0xFFFF:
            raise ValueError("base45 triple above 65535")
        out += n.to_bytes(2, "big")
    if full < len(values):
        n = values[full] + values[full + 1] * 45
        if n > 0xFF:
            raise ValueError("base45 pair above 255")
        out.append(n)
    return bytes(out)


def kid_for(public_key: bytes) -> bytes:
    """Key id of an Ed25519 public key: the first 8 bytes of SHA-256 of its 32 raw bytes."""
    return hashlib.sha256(public_key).digest()[:KID_BYTES]


def public_key_for(seed: bytes) -> bytes:
    """The raw 32-byte Ed25519 public key of a 32-byte private seed."""
    return bytes(SigningKey(seed).verify_key)


@dataclass(frozen=True)
class TrustedKey:
    """An issuer's Ed25519 public key, trusted for tokens verified inside its window."""

    kid: bytes
    public_key: bytes
    issuer: str
    not_before: float | None = None
    not_after: float | None = None

    def __post_init__(self) -> None:
        if len(self.public_key) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        if len(self.kid) != KID_BYTES:
            raise ValueError(f"a kid is {KID_BYTES} bytes")

    def active(self, now: float) -> bool:
        """Whether the key may verify a token at ``now``."""
        if self.not_before is not None and now < self.not_before:
            return False
        return not (self.not_after is not None and now > self.not_after)


class KeyRing:
    """The trusted issuer keys, looked up by kid; several may be active at once (rotation)."""

    def __init__(self, keys: Iterable[TrustedKey] = ()) -> None:
        self._by_kid: dict[bytes, list[tuple[TrustedKey, VerifyKey]]] = {}
        for key in keys:
            self._by_kid.setdefault(key.kid, []).append((key, VerifyKey(key.public_key)))

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_kid.values())

    def lookup(self, kid: bytes) -> list[TrustedKey]:
        """Every key with this kid (a kid is a hash prefix: collisions are tried in turn)."""
        return [key for key, _ in self._by_kid.get(kid, [])]

    def _candidates(self, kid: bytes) -> list[tuple[TrustedKey, VerifyKey]]:
        return self._by_kid.get(kid, [])


@dataclass(frozen=True)
class TokenClaims:
    """What a GT1 token says about one ticket (the issuer's side of the spec)."""

    issuer: str
    ticket_id: str
    product: str
    zones: Mapping[str, int | None]
    not_before: int
    expires: int
    issued_at: int
    channel: str
    slot_start: int | None = None
    slot_end: int | None = None
    max_entries_per_day: int | None = None
    max_entries_total: int | None = None
    holder_hash: str | None = None


@dataclass(frozen=True)
class TokenResult:
    """The verdict on one token text; ``reason`` is set exactly when ``ok`` is false."""

    ok: bool
    reason: Reason | None = None
    detail: str = ""
    ticket: Ticket | None = None
    product: Product | None = None
    claims: dict[str, Any] = field(default_factory=dict)
    kid: bytes | None = None


def looks_like_token(text: str) -> bool:
    """Whether a scanned code claims to be a GT1 token (never look it up as a plain code)."""
    return text.startswith(PREFIX)


def verify_token(text: str, keys: KeyRing, now: float) -> TokenResult:
    """Check a scanned GT1 token's envelope and signature; never raises."""
    kid: bytes | None = None
    signed = False
    try:
        protected, payload, signature, kid = _open_envelope(text)
        issuer = _check_signature(protected, payload, signature, kid, keys, now)
        signed = True
        claims = _decode_claims(payload)
        if claims.issuer != issuer:
            raise _Reject(Reason.BAD_SIGNATURE, f"iss {claims.issuer!r} is not this key's issuer")
        ticket, product = _to_ticket(claims)
        return TokenResult(True, None, "", ticket, product, describe_claims(claims), kid)
    except _Reject as rej:
        return TokenResult(False, rej.reason, rej.detail, kid=kid)
    except Exception as exc:  # boundary: a scanned code must never take the lane down
        reason = Reason.BAD_SIGNATURE if signed or kid is not None else Reason.BAD_CODE
        return TokenResult(False, reason, f"unexpected {type(exc).__name__}", kid=kid)


def _open_envelope(text: str) -> tuple[bytes, bytes, bytes, bytes]:
    """Prefix, size bounds, Base45, bounded zlib, COSE_Sign1 shape and protected header."""
    if not text.startswith(PREFIX):
        raise _Reject(Reason.BAD_CODE, "not a GT1 token")
    # Scanners end a code with CR or LF; the Base45 alphabet has no such characters.
    body = text[len(PREFIX) :].rstrip("\r\n")
    if len(body) > MAX_TEXT_CHARS:
        raise _Reject(Reason.BAD_CODE, f"token longer than {MAX_TEXT_CHARS} characters")
    try:
        compressed = b45decode(body)
    except ValueError as exc:
        raise _Reject(Reason.BAD_CODE, f"base45: {exc}") from None
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(compressed, MAX_CBOR_BYTES)
    except zlib.error:
        raise _Reject(Reason.BAD_CODE, "not zlib data") from None
    if inflater.unconsumed_tail:
        raise _Reject(Reason.BAD_CODE, f"decompresses beyond {MAX_CBOR_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise _Reject(Reason.BAD_CODE, "truncated or trailing zlib data")
    if not raw or raw[0] != 0xC0 | COSE_SIGN1_TAG:
        raise _Reject(Reason.BAD_CODE, "not a COSE_Sign1 (tag 18)")
    try:
        envelope = _strict_cbor(raw[1:], max_depth=2)
    except Exception:
        raise _Reject(Reason.BAD_CODE, "COSE_Sign1 is not valid CBOR") from None
    if not isinstance(envelope, list) or len(envelope) != 4:
        raise _Reject(Reason.BAD_CODE, "COSE_Sign1 is not a 4-element array")
    protected, unprotected, payload, signature = envelope
    if not isinstance(protected, bytes) or not 0 < len(protected) <= MAX_PROTECTED_BYTES:
        raise _Reject(Reason.BAD_CODE, "protected header is not a short bstr")
    # Everything that matters is in the signed (protected) header; an unsigned header could
    # only be used to steer a verifier, so GT1 requires it empty.
    if unprotected != {}:
        raise _Reject(Reason.BAD_CODE, "unprotected header is not empty")
    if not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise _Reject(Reason.BAD_CODE, "payload or signature is not a bstr")
    try:
        header = _strict_cbor(protected, max_depth=1)
    except Exception:
        raise _Reject(Reason.BAD_CODE, "protected header is not valid CBOR") from None
    if not isinstance(header, dict) or set(header) != {HDR_ALG, HDR_KID}:
        raise _Reject(Reason.BAD_CODE, "protected header must hold exactly alg and kid")
    kid = header[HDR_KID]
    if not isinstance(kid, bytes) or len(kid) != KID_BYTES:
        raise _Reject(Reason.BAD_CODE, f"kid is not a {KID_BYTES}-byte bstr")
    if header[HDR_ALG] != ALG_EDDSA:
        raise _Reject(Reason.BAD_SIGNATURE, f"alg {header[HDR_ALG]!r} is not EdDSA (-8)")
    if len(signature) != SIGNATURE_BYTES:
        raise _Reject(Reason.BAD_SIGNATURE, "signature is not 64 bytes")
    return protected, payload, signature, kid


def _check_signature(
    protected: bytes, payload: bytes, signature: bytes, kid: bytes, keys: KeyRing, now: float
) -> str:
    """Verify Ed25519 over the Sig_structure with a trusted, active key; return its issuer."""
    candidates = keys._candidates(kid)
    if not candidates:
        raise _Reject(Reason.BAD_SIGNATURE, f"unknown kid {kid.hex()}")
    active = [(key, vk) for key, vk in candidates if key.active(now)]
    if not active:
        raise _Reject(Reason.BAD_SIGNATURE, f"key {kid.hex()} outside its validity window")
    to_be_signed = sig_structure(protected, payload)
    for key, vk in active:
        try:
            vk.verify(to_be_signed, signature)
        except BadSignatureError:
            continue
        return key.issuer
    raise _Reject(Reason.BAD_SIGNATURE, "signature does not verify")


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """The bytes an Ed25519 COSE_Sign1 signature covers (RFC 9052 section 4.4)."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def _refuse_tag(tag: Any, immutable: bool) -> Any:
    raise ValueError("CBOR tags are not allowed here")


def _refuse_semantic(decoder: Any, immutable: bool) -> Any:
    raise ValueError("CBOR tags are not allowed here")


# cbor2 6.2.1 decodes tags 0-5, 25, 28-30, 35-37, 52, 54, 100, 256, 258, 260, 261, 1004, 43000
# and 55799 itself (dates, bignums, decimals, shared and string references, sets, regexes,
# UUIDs, addresses ...; measured by probing every tag below 70000): refuse them all, so an
# attacker cannot make the decoder build objects or reference cycles. Other tags reach
# _refuse_tag, and _check_plain catches anything a later cbor2 might add.
_NO_SEMANTIC_TAGS = {t: _refuse_semantic for t in (*range(0, 400), 1004, 43000, 55799)}


def _strict_cbor(data: bytes, max_depth: int) -> Any:
    """Decode one CBOR item: definite lengths, unique keys, no tags, no trailing bytes."""
    fp = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(
        fp,
        tag_hook=_refuse_tag,
        semantic_decoders=_NO_SEMANTIC_TAGS,
        max_depth=max_depth + 1,
        allow_indefinite=False,
        allow_duplicate_keys=False,
    )
    item = decoder.decode()
    if fp.tell() != len(data):
        raise ValueError("trailing bytes after the CBOR item")
    _check_plain(item, max_depth)
    return item


def _check_plain(item: Any, depth: int) -> None:
    """Only ints, strings, byte strings, arrays, maps, booleans and null, nested at most depth."""
    if isinstance(item, (bool, int, str, bytes)) or item is None:
        return
    if depth <= 0:
        raise ValueError("CBOR nested too deeply")
    if isinstance(item, list):
        for x in item:
            _check_plain(x, depth - 1)
        return
    if isinstance(item, dict):
        for k, v in item.items():
            _check_plain(k, 0)
            _check_plain(v, depth - 1)
        return
    raise ValueError(f"CBOR {type(item).__name__} not allowed")


def _uint(value: Any, name: str, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= upper:
        raise _Reject(Reason.BAD_SIGNATURE, f"claim {name} is not an integer in 0..{upper}")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_TEXT_CLAIM:
        raise _Reject(Reason.BAD_SIGNATURE, f"claim {name} is not text of 1..{_MAX_TEXT_CLAIM}")
    if not value.isprintable():
        raise _Reject(Reason.BAD_SIGNATURE, f"claim {name} has control characters")
    return value


def _opt_uint(m: Mapping[Any, Any], key: str, upper: int) -> int | None:
    return None if key not in m else _uint(m[key], key, upper)


def _decode_claims(payload: bytes) -> TokenClaims:
    """Decode and type-check the signed claims (only ever called on an authentic payload)."""
    try:
        m = _strict_cbor(payload, max_depth=3)
    except Exception:
        raise _Reject(Reason.BAD_SIGNATURE, "signed payload is not valid CBOR") from None
    if not isinstance(m, dict):
        raise _Reject(Reason.BAD_SIGNATURE, "claims are not a map")
    # Unknown claims are refused, not ignored: a newer issuer may have added a restriction
    # this gate would otherwise silently drop.
    if set(m) != _CWT_KEYS:
        raise _Reject(Reason.BAD_SIGNATURE, "claims must be exactly iss, exp, nbf, iat, cti, gt1")
    t = m[CLAIM_TICKET]
    if not isinstance(t, dict) or not set(t) <= _TICKET_KEYS or not {"p", "z", "ch"} <= set(t):
        raise _Reject(Reason.BAD_SIGNATURE, "ticket claims malformed or missing p, z, ch")
    cti = m[CLAIM_CTI]
    if isinstance(cti, bytes):
        if not 0 < len(cti) <= 32:
            raise _Reject(Reason.BAD_SIGNATURE, "claim cti is not 1..32 bytes")
        ticket_id = cti.hex()
    else:
        ticket_id = _text(cti, "cti")
    zones_raw = t["z"]
    if not isinstance(zones_raw, dict) or not 0 < len(zones_raw) <= _MAX_ZONES:
        raise _Reject(Reason.BAD_SIGNATURE, f"claim z is not a map of 1..{_MAX_ZONES} zones")
    zones: dict[str, int | None] = {}
    for zone, entries in zones_raw.items():
        zones[_text(zone, "z")] = None if entries is None else _uint(entries, "z", _MAX_COUNT)
    holder = t.get("h")
    if holder is not None and (
        not isinstance(holder, str) or len(holder) != 64 or not set(holder) <= _HEX
    ):
        raise _Reject(Reason.BAD_SIGNATURE, "claim h is not 64 lowercase hex characters")
    claims = TokenClaims(
        issuer=_text(m[CLAIM_ISS], "iss"),
        ticket_id=ticket_id,
        product=_text(t["p"], "p"),
        zones=zones,
        not_before=_uint(m[CLAIM_NBF], "nbf", _MAX_TIME),
        expires=_uint(m[CLAIM_EXP], "exp", _MAX_TIME),
        issued_at=_uint(m[CLAIM_IAT], "iat", _MAX_TIME),
        channel=_text(t["ch"], "ch"),
        slot_start=_opt_uint(t, "ss", _MAX_TIME),
        slot_end=_opt_uint(t, "se", _MAX_TIME),
        max_entries_per_day=_opt_uint(t, "md", _MAX_COUNT),
        max_entries_total=_opt_uint(t, "mt", _MAX_COUNT),
        holder_hash=holder,
    )
    if claims.expires <= claims.not_before:
        raise _Reject(Reason.BAD_SIGNATURE, "exp is not after nbf")
    if (claims.slot_start is None) != (claims.slot_end is None) or (
        claims.slot_start is not None
        and claims.slot_end is not None
        and claims.slot_end <= claims.slot_start
    ):
        raise _Reject(Reason.BAD_SIGNATURE, "slot needs both ss and se, se after ss")
    return claims


def product_id_for(product: str) -> str:
    """The Product id a token's product claim maps to (kept apart from cached products)."""
    return "gt1:" + product


def _to_ticket(c: TokenClaims) -> tuple[Ticket, Product]:
    product = Product(id=product_id_for(c.product), name=c.product, zones=dict(c.zones))
    ticket = Ticket(
        id=c.ticket_id,
        code=PREFIX + c.ticket_id,
        channel=c.channel,
        product_id=product.id,
        valid_from=float(c.not_before),
        valid_to=float(c.expires),
        slot_start=None if c.slot_start is None else float(c.slot_start),
        slot_end=None if c.slot_end is None else float(c.slot_end),
        max_entries_per_day=c.max_entries_per_day,
        max_entries_total=c.max_entries_total,
        holder_hash=c.holder_hash,
    )
    return ticket, product


def describe_claims(c: TokenClaims) -> dict[str, Any]:
    """The claims as plain JSON-able values, for ``gatectl token inspect`` and test vectors."""
    out: dict[str, Any] = {
        "iss": c.issuer,
        "cti": c.ticket_id,
        "nbf": c.not_before,
        "exp": c.expires,
        "iat": c.issued_at,
        "product": c.product,
        "zones": dict(c.zones),
        "channel": c.channel,
    }
    optional = {
        "slot_start": c.slot_start,
        "slot_end": c.slot_end,
        "max_entries_per_day": c.max_entries_per_day,
        "max_entries_total": c.max_entries_total,
        "holder_hash": c.holder_hash,
    }
    out.update({k: v for k, v in optional.items() if v is not None})
    return out


def claims_payload(c: TokenClaims) -> bytes:
    """The CBOR CWT claims map of a token (deterministic encoding)."""
    ticket: dict[str, Any] = {"p": c.product, "z": dict(c.zones), "ch": c.channel}
    for key, value in (
        ("ss", c.slot_start),
        ("se", c.slot_end),
        ("md", c.max_entries_per_day),
        ("mt", c.max_entries_total),
        ("h", c.holder_hash),
    ):
        if value is not None:
            ticket[key] = value
    claims = {
        CLAIM_ISS: c.issuer,
        CLAIM_EXP: c.expires,
        CLAIM_NBF: c.not_before,
        CLAIM_IAT: c.issued_at,
        CLAIM_CTI: c.ticket_id,
        CLAIM_TICKET: ticket,
    }
    return cbor2.dumps(claims, canonical=True)


def sign1(
    payload: bytes, private_key: bytes, kid: bytes | None = None, alg: int = ALG_EDDSA
) -> bytes:
    """A tagged COSE_Sign1 over ``payload`` (``alg`` other than -8 only for test vectors)."""
    signer = SigningKey(private_key)
    if kid is None:
        kid = kid_for(bytes(signer.verify_key))
    protected = cbor2.dumps({HDR_ALG: alg, HDR_KID: kid}, canonical=True)
    signature = signer.sign(sig_structure(protected, payload)).signature
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))


def wrap(cose: bytes) -> str:
    """COSE bytes to token text: zlib (level 9), Base45, prefix."""
    return PREFIX + b45encode(zlib.compress(cose, 9))


def mint_token(claims: TokenClaims, private_key: bytes, kid: bytes | None = None) -> str:
    """Issue a GT1 token signed with a 32-byte Ed25519 seed (kid defaults to kid_for)."""
    return wrap(sign1(claims_payload(claims), private_key, kid))


def read_unverified(text: str) -> tuple[bytes | None, dict[str, Any] | None, str]:
    """Kid and claims of a token WITHOUT checking its signature: for display only, never admit."""
    try:
        _, payload, _, kid = _open_envelope(text)
    except _Reject as rej:
        return None, None, rej.detail
    except Exception as exc:  # boundary: inspecting a broken code must not crash the CLI
        return None, None, f"unexpected {type(exc).__name__}"
    try:
        return kid, describe_claims(_decode_claims(payload)), ""
    except _Reject as rej:
        return kid, None, rej.detail
    except Exception as exc:  # boundary, as above
        return kid, None, f"unexpected {type(exc).__name__}"
