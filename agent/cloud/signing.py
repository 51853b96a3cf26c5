"""Signed downlink messages: the envelope a site cloud signs and the checks a gate makes.

Order of the checks matters: size first (a 10 MB payload costs nothing), then the envelope,
then the key and the signature, and only then is the signed payload parsed. Nothing that has
not passed the signature reaches a parser beyond the envelope's four fields.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from pydantic import ValidationError

from agent.cloud.contract import DOWN_BODIES, Envelope, SignedPayload
from verify.token import kid_for

CONTEXT = b"gate/v1 downlink\n"
"""Signed bytes start with this, so a signature made for anything else never verifies here."""


class Rejected(Exception):
    """A downlink message refused; ``reason`` is a stable code (docs/mqtt.md)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[Rejected], tuple[str, str]]:
        # Raised in the verification worker process and re-raised here: keep both fields.
        return (Rejected, (self.reason, self.detail))


@dataclass(frozen=True)
class Anchor:
    """A cloud signing key the gate trusts, with its validity window."""

    public_key: bytes
    not_before: float | None = None
    not_after: float | None = None

    @property
    def kid(self) -> str:
        return kid_for(self.public_key).hex()


@dataclass(frozen=True)
class Verified:
    """A downlink message that passed every check but the nonce (which needs the cache)."""

    kind: str
    topic: str
    nonce: str
    iat: float
    exp: float
    kid: str
    body: Any


def sign_message(
    topic: str,
    body: dict[str, Any],
    seed: bytes,
    *,
    ttl_s: float = 300.0,
    now: float | None = None,
    nonce: str | None = None,
) -> bytes:
    """The envelope for ``body`` on ``topic``, signed with a 32-byte Ed25519 seed."""
    now = time.time() if now is None else now
    signed = SignedPayload(
        topic=topic,
        nonce=nonce or secrets.token_urlsafe(18),
        iat=round(now, 3),
        exp=round(now + ttl_s, 3),
        body=body,
    )
    payload = signed.model_dump_json()
    key = SigningKey(seed)
    sig = key.sign(CONTEXT + payload.encode()).signature
    envelope = Envelope(
        v=1,
        kid=kid_for(bytes(key.verify_key)).hex(),
        payload=payload,
        sig=base64.b64encode(sig).decode(),
    )
    return envelope.model_dump_json().encode()


class DownlinkVerifier:
    """Checks signature, topic, time and body of downlink messages for one gate."""

    def __init__(
        self,
        anchors: list[Anchor],
        topics: dict[str, str],
        *,
        max_bytes: int,
        max_lifetime_s: float,
        clock_skew_s: float = 300.0,
    ) -> None:
        self.anchors: dict[str, list[Anchor]] = {}
        for a in anchors:
            self.anchors.setdefault(a.kid, []).append(a)
        self.topics = dict(topics)
        self.kinds = {topic: kind for kind, topic in topics.items()}
        self.max_bytes = max_bytes
        self.max_lifetime_s = max_lifetime_s
        self.clock_skew_s = clock_skew_s

    def anchor_list(self) -> list[Anchor]:
        return [a for group in self.anchors.values() for a in group]

    def verify(self, topic: str, raw: bytes, now: float) -> Verified:
        """The checked message, or Rejected with the reason."""
        kind = self.kinds.get(topic)
        if kind is None:
            raise Rejected("wrong_topic", "not a topic this gate subscribes to")
        if len(raw) > self.max_bytes:
            raise Rejected("too_large", f"{len(raw)} bytes")
        try:
            envelope = Envelope.model_validate_json(raw)
        except ValidationError as exc:
            raise Rejected("malformed", _first_error(exc)) from None
        candidates = self.anchors.get(envelope.kid)
        if not candidates:
            raise Rejected("unknown_key", f"kid {envelope.kid}")
        try:
            sig = base64.b64decode(envelope.sig, validate=True)
        except (binascii.Error, ValueError):
            raise Rejected("malformed", "sig is not base64") from None
        signed = CONTEXT + envelope.payload.encode()
        anchor = next((a for a in candidates if _verifies(a.public_key, signed, sig)), None)
        if anchor is None:
            raise Rejected("bad_signature")
        if (anchor.not_before is not None and now < anchor.not_before) or (
            anchor.not_after is not None and now > anchor.not_after
        ):
            raise Rejected("key_not_valid_now", f"kid {envelope.kid}")
        try:
            payload = SignedPayload.model_validate_json(envelope.payload)
        except ValidationError as exc:
            raise Rejected("malformed", _first_error(exc)) from None
        if payload.topic != topic:
            # Signed for another gate, site or topic: the one check that stops a command for
            # one gate being replayed at every other gate of the site.
            raise Rejected("wrong_target", "signed for another topic")
        if payload.exp < payload.iat or payload.exp - payload.iat > self.max_lifetime_s:
            raise Rejected("bad_lifetime", f"exp - iat = {payload.exp - payload.iat:.0f} s")
        if now > payload.exp:
            raise Rejected("expired")
        if payload.iat > now + self.clock_skew_s:
            raise Rejected("not_yet_valid", "issued in the future (check the gate's clock)")
        try:
            body = DOWN_BODIES[kind].validate_python(payload.body)
        except ValidationError as exc:
            raise Rejected("invalid_body", _first_error(exc)) from None
        return Verified(kind, topic, payload.nonce, payload.iat, payload.exp, envelope.kid, body)


def _verifies(public_key: bytes, signed: bytes, sig: bytes) -> bool:
    try:
        VerifyKey(public_key).verify(signed, sig)
    except (BadSignatureError, ValueError):
        return False
    return True


def _first_error(exc: ValidationError) -> str:
    """Where and what, never the offending value (it may be anything an attacker sent)."""
    err = exc.errors(include_input=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "message"
    return f"{where}: {err['msg']}"[:200]

