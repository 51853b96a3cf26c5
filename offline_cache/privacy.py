"""Holder identifiers (ID numbers and the like) only ever as keyed hashes.

The site key lives in a file that only its owner (root, or the daemon's own user) can read.
The cloud hashes with the same key, so a ticket bound to an ID number and the number read
from the card at the lane meet as the same hash; the number itself is never stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
import unicodedata
from pathlib import Path

from offline_cache.errors import SiteKeyError

MIN_KEY_BYTES = 32
_HEX = re.compile(rb"[0-9a-fA-F]+")
_HASH = re.compile(r"[0-9a-f]{64}")


def _key_bytes(raw: bytes) -> bytes:
    """Hex text (e.g. ``openssl rand -hex 32``, newline allowed) is decoded; else raw bytes."""
    text = raw.strip()
    if len(text) >= 2 * MIN_KEY_BYTES and len(text) % 2 == 0 and _HEX.fullmatch(text):
        return bytes.fromhex(text.decode("ascii"))
    return raw


def load_site_key(path: Path) -> bytes:
    """Read the site key, refusing a file that others can read or a key under 32 bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SiteKeyError(f"site key {path}: cannot open ({exc.strerror})") from None
    try:
        # fstat of the open file, not stat of the path: nothing can swap it in between.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SiteKeyError(f"site key {path}: not a regular file")
        if st.st_mode & 0o077:
            raise SiteKeyError(
                f"site key {path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others "
                f"read or write it; run: chmod 600 {path}"
            )
        if st.st_uid not in (0, os.geteuid()):
            raise SiteKeyError(
                f"site key {path}: owned by uid {st.st_uid}; it must belong to root "
                "or to the user the daemon runs as"
            )
        chunks = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(fd)
    key = _key_bytes(b"".join(chunks))
    if len(key) < MIN_KEY_BYTES:
        raise SiteKeyError(
            f"site key {path}: {len(key)} bytes; at least {MIN_KEY_BYTES} are needed "
            "(create one with: head -c 32 /dev/urandom > FILE)"
        )
    return key


def normalise_identifier(identifier: str) -> str:
    """NFKC, no whitespace, upper case: '11010519491231002x ' and the card's form agree."""
    return "".join(unicodedata.normalize("NFKC", identifier).split()).upper()


def holder_hash(key: bytes, identifier: str) -> str:
    """HMAC-SHA256 (hex) of the normalised identifier with the site key."""
    if not isinstance(identifier, str):
        raise ValueError("holder identifier must be text")
    normalised = normalise_identifier(identifier)
    if not normalised:
        raise ValueError("holder identifier is empty")
    return hmac.new(key, normalised.encode("utf-8"), hashlib.sha256).hexdigest()


def is_holder_hash(value: object) -> bool:
    """True for a lowercase 64-digit hex string, the only form a holder binding is kept in."""
    return isinstance(value, str) and _HASH.fullmatch(value) is not None
