"""Write tests/vectors/gt1-vectors.json: GT1 token test vectors, positive and negative.

Run from the repository root: ``python tests/vectors/make_gt1_vectors.py``. The keys are
derived from fixed, published strings: they are TEST keys, never to be trusted at a site.
Ed25519 signatures are deterministic, so the output changes only if zlib's does.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zlib
from pathlib import Path
from typing import Any

import cbor2
from nacl.signing import SigningKey

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from verify.token import (
    ALG_EDDSA,
    CLAIM_ISS,
    COSE_SIGN1_TAG,
    HDR_ALG,
    HDR_KID,
    PREFIX,
    TokenClaims,
    b45encode,
    claims_payload,
    describe_claims,
    kid_for,
    sig_structure,
    wrap,
)

OUT = Path(__file__).with_name("gt1-vectors.json")
NOW = 1_780_000_000
"""2026-05-28T20:26:40Z: the time every vector is judged at."""
DAY = 86_400
ZONE = "park"


def test_seed(name: str) -> bytes:
    """A fixed, public test seed: SHA-256 of a label that says what it is."""
    return hashlib.sha256(f"gate-agent GT1 TEST KEY {name} - NOT SECRET".encode()).digest()


SEEDS = {name: test_seed(name) for name in ("current", "next", "retired", "other-site", "rogue")}
PUBLIC = {name: bytes(SigningKey(seed).verify_key) for name, seed in SEEDS.items()}

TRUSTED = [
    {"name": "current", "issuer": "demo-park"},
    {"name": "next", "issuer": "demo-park", "not_before": NOW - DAY, "not_after": NOW + 365 * DAY},
    {
        "name": "retired",
        "issuer": "demo-park",
        "not_before": NOW - 400 * DAY,
        "not_after": NOW - DAY,
    },
    {"name": "other-site", "issuer": "other-park"},
]


def claims(**over: Any) -> TokenClaims:
    """A one-day park ticket valid around NOW; keyword arguments override fields."""
    base: dict[str, Any] = {
        "issuer": "demo-park",
        "ticket_id": "T-20260528-0001",
        "product": "park-day",
        "zones": {"park": 1},
        "not_before": NOW - 3600,
        "expires": NOW + 12 * 3600,
        "issued_at": NOW - 7200,
        "channel": "web",
    }
    base.update(over)
    return TokenClaims(**base)


def cose(
    payload: bytes,
    key: str = "current",
    *,
    kid: bytes | None = None,
    alg: int = ALG_EDDSA,
    protected_map: dict[int, Any] | None = None,
    unprotected: dict[int, Any] | None = None,
    tamper: bool = False,
) -> bytes:
    """A COSE_Sign1 with whatever header quirks a negative vector needs."""
    signer = SigningKey(SEEDS[key])
    kid = kid if kid is not None else kid_for(PUBLIC[key])
    header = protected_map if protected_map is not None else {HDR_ALG: alg, HDR_KID: kid}
    protected = cbor2.dumps(header, canonical=True)
    signature = signer.sign(sig_structure(protected, payload)).signature
    if tamper:
        # Change one byte of the signed payload after signing: "T-...0001" becomes "...0002".
        payload = payload.replace(b"0001", b"0002")
    return cbor2.dumps(
        cbor2.CBORTag(COSE_SIGN1_TAG, [protected, unprotected or {}, payload, signature])
    )


def vectors() -> list[dict[str, Any]]:
    """Every vector: name, text, expected verdict, and for good tokens the rules' verdict."""
    good = claims()
    combo = claims(
        ticket_id="T-20260528-0002",
        product="park-cable-combo",
        zones={"park": 1, "cable": 2, "museum": None},
        slot_start=NOW - 1800,
        slot_end=NOW + 1800,
        max_entries_per_day=3,
        max_entries_total=4,
        channel="ota-ctrip",
        holder_hash=hashlib.sha256(b"test holder").hexdigest(),
    )
    good_text = wrap(cose(claims_payload(good)))
    body = good_text[len(PREFIX) :]
    raw_cose = cose(claims_payload(good))
    v: list[dict[str, Any]] = [
        {"name": "valid", "text": good_text, "ok": True, "rules": "ok", "claims": good},
        {
            "name": "valid-combo-slot-holder",
            "text": wrap(cose(claims_payload(combo))),
            "ok": True,
            "rules": "ok",
            "claims": combo,
        },
        {
            "name": "valid-rotated-key",
            "text": wrap(cose(claims_payload(good), "next")),
            "ok": True,
            "rules": "ok",
            "claims": good,
        },
        {
            "name": "expired",
            "text": wrap(
                cose(claims_payload(c := claims(not_before=NOW - 2 * DAY, expires=NOW - DAY)))
            ),
            "ok": True,
            "rules": "expired",
            "claims": c,
        },
        {
            "name": "not-yet-valid",
            "text": wrap(
                cose(claims_payload(c := claims(not_before=NOW + DAY, expires=NOW + 2 * DAY)))
            ),
            "ok": True,
            "rules": "not_yet_valid",
            "claims": c,
        },
        {
            "name": "tampered-payload",
            "text": wrap(cose(claims_payload(good), tamper=True)),
            "reason": "bad_signature",
        },
        {
            "name": "wrong-key",
            "text": wrap(cose(claims_payload(good), "rogue", kid=kid_for(PUBLIC["current"]))),
            "reason": "bad_signature",
        },
        {
            "name": "unknown-kid",
            "text": wrap(cose(claims_payload(good), "rogue")),
            "reason": "bad_signature",
        },
        {
            "name": "key-outside-window",
            "text": wrap(cose(claims_payload(good), "retired")),
            "reason": "bad_signature",
        },
        {
            "name": "wrong-alg-es256",
            "text": wrap(cose(claims_payload(good), alg=-7)),
            "reason": "bad_signature",
        },
        {
            "name": "wrong-issuer-for-kid",
            "text": wrap(cose(claims_payload(good), "other-site")),
            "reason": "bad_signature",
        },
        {
            "name": "signed-bad-cbor-payload",
            "text": wrap(cose(claims_payload(good)[:-3])),
            "reason": "bad_signature",
        },
        {
            "name": "signed-tag-in-payload",
            "text": wrap(cose(cbor2.dumps({CLAIM_ISS: cbor2.CBORTag(1, 0)}))),
            "reason": "bad_signature",
        },
        {
            "name": "signed-unknown-claim",
            "text": wrap(cose(cbor2.dumps({**cbor2.loads(claims_payload(good)), 8: 0}))),
            "reason": "bad_signature",
        },
        {"name": "truncated-base45", "text": good_text[:-2], "reason": "bad_code"},
        {"name": "truncated-base45-one-char", "text": good_text[:-1], "reason": "bad_code"},
        {"name": "truncated-zlib", "text": good_text[:-3], "reason": "bad_code"},
        {"name": "bad-base45-character", "text": PREFIX + body.lower(), "reason": "bad_code"},
        {"name": "bad-cbor-envelope", "text": wrap(b"\xd2\x84\x43\xa1"), "reason": "bad_code"},
        {
            "name": "not-cose-sign1",
            "text": wrap(cbor2.dumps(cbor2.CBORTag(17, [b"", {}, b"", b""]))),
            "reason": "bad_code",
        },
        {
            "name": "trailing-bytes-after-cose",
            "text": wrap(raw_cose + b"\x00"),
            "reason": "bad_code",
        },
        {
            "name": "kid-in-unprotected-header",
            "text": wrap(
                cose(
                    claims_payload(good),
                    protected_map={HDR_ALG: ALG_EDDSA},
                    unprotected={HDR_KID: kid_for(PUBLIC["current"])},
                )
            ),
            "reason": "bad_code",
        },
        {"name": "not-zlib", "text": PREFIX + b45encode(raw_cose), "reason": "bad_code"},
        {
            "name": "zip-bomb",
            "text": PREFIX + b45encode(zlib.compress(b"\xd2" + b"\x00" * 1_000_000, 9)),
            "reason": "bad_code",
        },
        {"name": "too-long", "text": PREFIX + "0" * 4500, "reason": "bad_code"},
        {"name": "wrong-prefix", "text": "HC1:" + body, "reason": "bad_code"},
        {"name": "lowercase-prefix", "text": "gt1:" + body, "reason": "bad_code"},
        {"name": "plain-code", "text": "T-20260528-0001", "reason": "bad_code"},
        {"name": "empty-body", "text": PREFIX, "reason": "bad_code"},
    ]
    for vec in v:
        vec.setdefault("ok", False)
        if "claims" in vec:
            vec["claims"] = describe_claims(vec["claims"])
    return v


def stages() -> dict[str, str]:
    """Every encoding stage of the "valid" vector, in hex, for the worked example in the spec."""
    payload = claims_payload(claims())
    kid = kid_for(PUBLIC["current"])
    protected = cbor2.dumps({HDR_ALG: ALG_EDDSA, HDR_KID: kid}, canonical=True)
    raw = cose(payload)
    return {
        "claims_cbor": payload.hex(),
        "protected": protected.hex(),
        "sig_structure": sig_structure(protected, payload).hex(),
        "signature": cbor2.loads(raw).value[3].hex(),
        "cose_sign1": raw.hex(),
        "zlib": zlib.compress(raw, 9).hex(),
        "text": wrap(raw),
    }


def main() -> None:
    """Write the vectors file."""
    doc = {
        "about": "GT1 test vectors (docs/ticket-token.md). TEST KEYS ONLY: never trust at a site.",
        "now": NOW,
        "zone": ZONE,
        "keys": [
            {
                "issuer": k["issuer"],
                "public_key": PUBLIC[k["name"]].hex(),
                "kid": kid_for(PUBLIC[k["name"]]).hex(),
                **{f: k[f] for f in ("not_before", "not_after") if f in k},
            }
            for k in TRUSTED
        ],
        "test_seeds": {name: seed.hex() for name, seed in SEEDS.items()},
        "vectors": vectors(),
        "stages_of_valid": stages(),
    }
    OUT.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {len(doc['vectors'])} vectors to {OUT.name}")


if __name__ == "__main__":
    main()
