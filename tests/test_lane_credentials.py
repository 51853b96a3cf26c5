"""Issue 4's acceptance through the real daemon: what each credential does at a lane.

The daemon runs against the simulated board with a pty QR scanner on L1 and a pty SAM reader
on L2 (and, in the last test, a camera on L1 playing a folder of rendered frames). Every
refusal is checked three ways: the reason on the event log, the reason on status, and no
unlock output at the board.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.testbed import Testbed, wait_for
from drivers.sim.camera import blank_frame, qr_frame, write_folder, write_image
from drivers.sim.sam import SamReaderThread, SimCard, synthetic_card, synthetic_id_number
from drivers.sim.scanner import SimScanner
from verify.token import (
    PREFIX,
    TokenClaims,
    b45decode,
    mint_token,
    public_key_for,
    wrap,
)

SEED = bytes(range(32))
ROGUE = bytes(range(1, 33))
BLOCKED_SEQ = 3


def token(seed: bytes = SEED, **over: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "issuer": "demo-park",
        "ticket_id": "TK-1",
        "product": "web-day",
        "zones": {"park": 1},
        "not_before": now - 60,
        "expires": now + 3600,
        "issued_at": now - 60,
        "channel": "web",
    }
    claims.update(over)
    return mint_token(TokenClaims(**claims), seed)


def tampered(text: str, old: bytes, new: bytes) -> str:
    """The token with bytes of its signed payload changed after signing."""
    cose = zlib.decompress(b45decode(text[len(PREFIX) :]))
    assert cose.count(old) == 1 and len(old) == len(new)
    return wrap(cose.replace(old, new))


@dataclass
class Gate:
    tb: Testbed
    scanner: SimScanner
    sam: SamReaderThread

    def unlocks(self, since: float) -> list[dict[str, Any]]:
        return [
            h for h in self.tb.sim.history(since) if h["what"].startswith("unlock") and h["value"]
        ]

    def refused(self, lane: str, reason: str) -> None:
        """The lane's last decision is a refusal for ``reason`` and a denied event says so."""
        wait_for(
            lambda: self.tb.status()["last_decisions"].get(lane, {}).get("reason") == reason,
            5,
            f"{lane} refusing with {reason}",
        )
        last = self.tb.status()["last_decisions"][lane]
        assert last["outcome"] == "refused" and last["prompt_zh"] and last["prompt_en"]
        wait_for(
            lambda: any(
                e.lane == lane and e.data.get("reason") == reason for e in self.tb.events("denied")
            ),
            5,
            f"a denied event for {reason}",
        )


def _records(now: float) -> list[dict[str, Any]]:
    day = {"product_id": "day", "valid_from": now - 60, "valid_to": now + 3600}
    return [
        {"type": "product", "id": "day", "zones": {"park": 1}},
        {"type": "ticket", "id": "qr1", "code": "OTA-0001", **day},
        {
            "type": "ticket",
            "id": "rn1",
            "code": "RN-0001",
            "holder_id": synthetic_id_number(seq=1),
            **day,
        },
        {
            "type": "ticket",
            "id": "rn3",
            "code": "RN-0003",
            "holder_id": synthetic_id_number(seq=BLOCKED_SEQ),
            **day,
        },
        {
            "type": "block",
            "kind": "holder",
            "holder_id": synthetic_id_number(seq=BLOCKED_SEQ),
            "reason": "fraud",
        },
        {"type": "block", "kind": "ticket", "value": "TK-BLOCKED"},
    ]


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    site_key = tmp_path / "site.key"
    site_key.write_bytes(os.urandom(32))
    site_key.chmod(0o600)
    public = public_key_for(SEED).hex()
    scanner = SimScanner(tmp_path / "scanner")
    sam = SamReaderThread(tmp_path / "sam")
    extra = (
        f'[admission]\nholder_key_file = "{site_key}"\n\n'
        f'[[trusted_keys]]\nissuer = "demo-park"\npublic_key = "{public}"\n'
    )
    try:
        with Testbed(
            tmp_path / "gate",
            lane={"zone": "park"},
            lane_readers={
                1: [{"type": "qr-serial", "port": scanner.path, "debounce_s": 0.2}],
                2: [{"type": "idcard", "port": str(tmp_path / "sam")}],
            },
            extra_toml=extra,
        ) as tb:
            tb.start_sim()
            tb.start_daemon()
            path = tmp_path / "tickets.jsonl"
            path.write_text("\n".join(json.dumps(r) for r in _records(time.time())))
            assert tb.gatectl("cache", "import", str(path)).returncode == 0
            yield Gate(tb, scanner, sam)
    finally:
        sam.close()
        scanner.close()


def test_signed_ticket_never_synced_opens_once_and_bad_tokens_stay_locked(gate: Gate) -> None:
    tb = gate.tb
    good = token()
    assert tb.status()["cache"]["tickets"] == 3, "the token's ticket is not in the cache"
    gate.scanner.scan(good)
    assert tb.sim.walk(1, "entry")
    [passage] = tb.wait_event("passage")
    assert passage.data["ticket_id"] == "TK-1"
    tb.wait_modes("locked")

    since = time.monotonic()
    now = int(time.time())
    refusals = [
        (good, "zone_used_up"),
        (tampered(token(ticket_id="TK-2"), b"TK-2", b"TK-3"), "bad_signature"),
        (token(ROGUE, ticket_id="TK-R"), "bad_signature"),
        (
            token(ticket_id="TK-E", not_before=now - 7200, expires=now - 3600),
            "expired",
        ),
        (token(ticket_id="TK-Z", zones={"museum": 1}), "wrong_zone"),
        (token(ticket_id="TK-BLOCKED"), "blocked"),
        (good[:-7], "bad_code"),
        ("NOT-A-TICKET", "unknown"),
    ]
    for text, reason in refusals:
        gate.scanner.scan(text)
        gate.refused("L1", reason)
        # Between scans the lane's last decision must change, so show a neutral code.
        gate.scanner.scan(f"probe-{reason}")
        gate.refused("L1", "unknown")
    assert gate.unlocks(since) == []
    assert tb.modes() == {"L1": "locked", "L2": "locked"}
    assert len(tb.events("passage")) == 1


def test_id_cards_real_name_opens_blocklisted_and_expired_stay_locked(gate: Gate) -> None:
    tb, sam = gate.tb, gate.sam

    def swap(card: SimCard) -> None:
        sam.remove_card()
        # Visitors take a card away and lay theirs down in far more than one poll (0.2 s).
        time.sleep(0.5)
        sam.put_card(card)

    sam.put_card(synthetic_card(seq=1))
    assert tb.sim.walk(2, "entry")
    [passage] = tb.wait_event("passage")
    assert (passage.lane, passage.data["ticket_id"]) == ("L2", "rn1")
    tb.wait_modes("locked")
    # The card is still on the reader: the same passage is not read again.
    time.sleep(1.0)
    assert tb.modes()["L2"] == "locked" and len(tb.events("passage")) == 1

    since = time.monotonic()
    swap(synthetic_card(seq=BLOCKED_SEQ))
    gate.refused("L2", "blocked")
    swap(synthetic_card(seq=2, expired=True))
    gate.refused("L2", "card_invalid")
    swap(synthetic_card(seq=4))
    gate.refused("L2", "unknown")
    assert gate.unlocks(since) == []
    for seq in (1, 2, BLOCKED_SEQ, 4):
        number = synthetic_id_number(seq=seq)
        assert all(number not in json.dumps(e.data) for e in tb.events())
        assert number not in (tb.dir / "daemon.log").read_text()


def test_camera_frames_are_decoded_and_admitted_once(tmp_path: Path) -> None:
    frames = tmp_path / "frames"
    write_folder(frames, [blank_frame(), blank_frame()])
    with Testbed(
        tmp_path / "gate",
        lane={"zone": "park"},
        lane_readers={1: [{"type": "camera", "source": str(frames), "max_fps": 20}]},
    ) as tb:
        tb.start_sim()
        tb.start_daemon()
        path = tmp_path / "tickets.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in _records(time.time())[:2]))
        assert tb.gatectl("cache", "import", str(path)).returncode == 0
        wait_for(lambda: tb.status()["readers"][0]["connected"], 10, "the camera delivering frames")
        # The visitor holds the phone up: the code is in view for many frames (the folder
        # loops) but opens the lane once.
        write_image(frames / "frame_000001", qr_frame("OTA-0001", noise=12, seed=4))
        assert tb.sim.walk(1, "entry")
        [passage] = tb.wait_event("passage")
        assert passage.data["ticket_id"] == "qr1"
        tb.wait_modes("locked")
        time.sleep(1.0)
        assert tb.modes()["L1"] == "locked" and len(tb.events("passage")) == 1
        reader = tb.status()["readers"][0]
        assert reader["reads"] == 1 and reader["decoded"] > 5, reader
