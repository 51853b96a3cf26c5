"""``gatectl token``: mint, inspect and make keys for GT1 signed tickets (docs/ticket-token.md).

These commands work locally, without the daemon: installers mint test and demo tickets with a
site's issuer key, technicians inspect a scanned code. No command prints private key material.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from verify.token import (
    KeyRing,
    TokenClaims,
    TrustedKey,
    kid_for,
    mint_token,
    public_key_for,
    read_unverified,
    verify_token,
)

EXIT_REFUSED = 1


class KeyFileError(ValueError):
    """A key or trusted-keys file that cannot be used; the message names file and field."""


def load_seed(path: str | Path) -> bytes:
    """A 32-byte Ed25519 private seed from a file of 32 raw bytes or 64 hex characters."""
    data = Path(path).read_bytes()
    if len(data) == 32:
        return data
    text = data.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise KeyFileError(f"{path}: expected 32 raw bytes or 64 hex characters")


def parse_time(text: str) -> float:
    """Epoch seconds from an ISO 8601 time with an offset (``Z``, ``+08:00``) or a number."""
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        # A site's local time and UTC differ by 8 hours: guessing would mint tickets valid
        # at the wrong time of day, so the offset must be written.
        raise ValueError(f"time {text!r} needs an offset, e.g. {text}+08:00 or {text}Z")
    return moment.timestamp()


def _key_time(entry: dict[str, Any], name: str, where: str) -> float | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise KeyFileError(f"{where}.{name}: a time needs an offset")
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return parse_time(value)
        except ValueError as exc:
            raise KeyFileError(f"{where}.{name}: {exc}") from None
    raise KeyFileError(f"{where}.{name}: expected a time, got {value!r}")


def load_trusted_keys(path: str | Path) -> KeyRing:
    """Trusted issuer public keys from a TOML or JSON file with a ``keys`` list."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        doc = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(
            f"{path}: not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}"
        ) from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise KeyFileError(f"{path}: expected a list named keys")
    keys: list[TrustedKey] = []
    for i, entry in enumerate(entries):
        where = f"{path}: keys[{i}]"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{where}: expected a table")
        unknown = set(entry) - {"issuer", "public_key", "kid", "not_before", "not_after"}
        if unknown:
            raise KeyFileError(f"{where}: unknown field(s) {sorted(unknown)}")
        try:
            public = bytes.fromhex(str(entry["public_key"]))
            issuer = str(entry["issuer"])
        except KeyError as exc:
            raise KeyFileError(f"{where}: missing {exc.args[0]}") from None
        except ValueError:
            raise KeyFileError(f"{where}.public_key: expected 64 hex characters") from None
        if len(public) != 32:
            raise KeyFileError(f"{where}.public_key: expected 64 hex characters")
        kid = kid_for(public)
        if "kid" in entry and str(entry["kid"]).lower() != kid.hex():
            # A kid that does not match its key is a copy-paste mistake; trusting it would
            # make the key unreachable (or, worse, shadow another one).
            raise KeyFileError(f"{where}.kid: {entry['kid']} is not the kid of this key")
        keys.append(
            TrustedKey(
                kid=kid,
                public_key=public,
                issuer=issuer,
                not_before=_key_time(entry, "not_before", where),
                not_after=_key_time(entry, "not_after", where),
            )
        )
    return KeyRing(keys)


def _zone(text: str) -> tuple[str, int | None]:
    name, sep, count = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError("expected ZONE=ENTRIES, e.g. park=1 (or park=* for any)")
    if not sep or count == "*":
        return name, None
    try:
        n = int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"entries for {name!r} must be a number or *") from None
    if n < 0:
        raise argparse.ArgumentTypeError("entries cannot be negative")
    return name, n


def add_token_commands(subparsers: Any) -> None:
    """Register ``token mint|inspect|keygen`` on gatectl's sub-command parsers."""
    token = subparsers.add_parser("token", help="GT1 signed tickets: mint, inspect, keygen")
    tsub = token.add_subparsers(dest="action", required=True)

    mint = tsub.add_parser("mint", help="issue a signed GT1 ticket (prints the QR text)")
    mint.add_argument("--key", required=True, help="issuer private seed file (32 B or 64 hex)")
    mint.add_argument("--kid", help="key id in hex (default: from the public key)")
    mint.add_argument("--issuer", default="demo-park", help="site id (iss) (default: demo-park)")
    mint.add_argument("--ticket", required=True, help="ticket id (cti), unique at the site")
    mint.add_argument("--product", required=True, help="product name")
    mint.add_argument(
        "--zone",
        action="append",
        type=_zone,
        required=True,
        metavar="ZONE=N",
        help="zone and entries allowed in it (N or *); repeat for a combo ticket",
    )
    mint.add_argument("--valid-from", required=True, help="ISO time with offset, or epoch s")
    mint.add_argument("--valid-to", required=True, help="ISO time with offset, or epoch s")
    mint.add_argument("--slot-start", help="booked slot start (ISO with offset or epoch s)")
    mint.add_argument("--slot-end", help="booked slot end (ISO with offset or epoch s)")
    mint.add_argument("--max-per-day", type=int, help="entries per local day, all zones")
    mint.add_argument("--max-total", type=int, help="entries in total, all zones")
    mint.add_argument("--channel", default="installer", help="sales channel (default: installer)")
    mint.add_argument("--holder-hash", help="HMAC-SHA256 hex of the holder's ID number")

    inspect = tsub.add_parser("inspect", help="show a GT1 code's claims and verdict")
    inspect.add_argument("code")
    inspect.add_argument("--keys", help="trusted keys file (TOML or JSON with a keys list)")
    inspect.add_argument("--now", help="judge at this time (default: now)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")

    keygen = tsub.add_parser("keygen", help="make an issuer key (seed file mode 0600)")
    keygen.add_argument("--out", required=True, help="seed file to create (never overwritten)")


def run_token_command(args: argparse.Namespace) -> int:
    """Run a parsed ``gatectl token ...`` command; returns the exit code."""
    try:
        if args.action == "mint":
            return _mint(args)
        if args.action == "inspect":
            return _inspect(args)
        if args.action == "keygen":
            return _keygen(args)
    except (KeyFileError, ValueError, OSError) as exc:
        print(f"gatectl token {args.action}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    raise AssertionError(f"unknown token action {args.action!r}")


def _mint(args: argparse.Namespace) -> int:
    seed = load_seed(args.key)
    kid = bytes.fromhex(args.kid) if args.kid else None
    if (args.slot_start is None) != (args.slot_end is None):
        raise ValueError("--slot-start and --slot-end go together")
    zones = dict(args.zone)
    claims = TokenClaims(
        issuer=args.issuer,
        ticket_id=args.ticket,
        product=args.product,
        zones=zones,
        not_before=int(parse_time(args.valid_from)),
        expires=int(parse_time(args.valid_to)),
        issued_at=int(time.time()),
        channel=args.channel,
        slot_start=None if args.slot_start is None else int(parse_time(args.slot_start)),
        slot_end=None if args.slot_end is None else int(parse_time(args.slot_end)),
        max_entries_per_day=args.max_per_day,
        max_entries_total=args.max_total,
        holder_hash=args.holder_hash,
    )
    text = mint_token(claims, seed, kid)
    # Mint only what this gate would accept: a typo in a claim fails here, not at the lane.
    public = public_key_for(seed)
    ring = KeyRing([TrustedKey(kid or kid_for(public), public, args.issuer)])
    check = verify_token(text, ring, float(claims.not_before))
    if not check.ok:
        raise ValueError(f"minted token does not verify: {check.detail}")
    print(text)
    return 0


def _validity(claims: dict[str, Any], now: float) -> str:
    if now < claims["nbf"]:
        return "not_yet_valid"
    if now > claims["exp"]:
        return "expired"
    return "valid now"


def _inspect(args: argparse.Namespace) -> int:
    now = parse_time(args.now) if args.now else time.time()
    out: dict[str, Any]
    if args.keys:
        result = verify_token(args.code, load_trusted_keys(args.keys), now)
        verdict = "ok" if result.ok else (result.reason.value if result.reason else "error")
        out = {
            "verified": result.ok,
            "verdict": verdict,
            "detail": result.detail,
            "kid": result.kid.hex() if result.kid else None,
            "claims": result.claims or None,
        }
        if result.ok:
            out["validity"] = _validity(result.claims, now)
    else:
        kid, claims, detail = read_unverified(args.code)
        out = {
            "verified": False,
            "verdict": "unverified (no --keys given)" if claims else "bad_code",
            "detail": detail,
            "kid": kid.hex() if kid else None,
            "claims": claims,
        }
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        for key, value in out.items():
            if key == "claims" and value:
                print("claims:")
                for name, claim in value.items():
                    print(f"  {name:<22}{_show_claim(name, claim)}")
            elif value not in (None, ""):
                print(f"{key:<24}{value}")
    return 0 if out["verified"] else EXIT_REFUSED


def _show_claim(name: str, value: Any) -> str:
    if name in ("nbf", "exp", "iat", "slot_start", "slot_end"):
        return f"{value} ({datetime.fromtimestamp(value, tz=UTC).isoformat()})"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else str(value)


def _keygen(args: argparse.Namespace) -> int:
    signer = SigningKey.generate()
    # O_EXCL: never overwrite an existing issuer key; 0600 from the start, not chmod after.
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(bytes(signer).hex() + "\n")
    public = bytes(signer.verify_key)
    print(f"public_key {public.hex()}")
    print(f"kid        {kid_for(public).hex()}")
    print(f"seed written to {args.out} (mode 0600); keep it off the gates")
    return 0
