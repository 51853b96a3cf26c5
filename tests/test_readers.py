"""Readers at the lanes of the real daemon: a pty QR scanner and a pty SAM ID-card reader.

A code scanned at L1 and an ID card laid on L2's reader each open their lane for one
passage that is counted against the right ticket; an expired card and a bad code stay
locked with their reasons.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.testbed import Testbed, wait_for
from drivers.sim.sam import SamReaderThread, synthetic_card, synthetic_id_number
from drivers.sim.scanner import SimScanner


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[tuple[Testbed, SimScanner, SamReaderThread]]:
    key = tmp_path / "site.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    scanner = SimScanner(tmp_path / "scanner")
    sam = SamReaderThread(tmp_path / "sam")
    try:
        with Testbed(
            tmp_path / "gate",
            lane={"zone": "park"},
            lane_readers={
                1: [
                    {
                        "type": "qr-serial",
                        "port": scanner.path,
                        "terminator": "CR",
                        "debounce_s": 0.2,
                    }
                ],
                2: [{"type": "idcard", "port": str(tmp_path / "sam")}],
            },
            extra_toml=f'[admission]\nholder_key_file = "{key}"\n',
        ) as tb:
            tb.start_sim()
            tb.start_daemon()
            now = time.time()
            records = [
                {"type": "product", "id": "day", "zones": {"park": 1}},
                {
                    "type": "ticket",
                    "id": "qr1",
                    "code": "OTA-0001",
                    "product_id": "day",
                    "valid_from": now - 60,
                    "valid_to": now + 3600,
                },
                {
                    "type": "ticket",
                    "id": "rn1",
                    "code": "RN-0001",
                    "product_id": "day",
                    "valid_from": now - 60,
                    "valid_to": now + 3600,
                    "holder_id": synthetic_id_number(seq=1),
                },
            ]
            path = tmp_path / "tickets.jsonl"
            path.write_text("\n".join(json.dumps(r) for r in records))
            assert tb.gatectl("cache", "import", str(path)).returncode == 0
            yield tb, scanner, sam
    finally:
        sam.close()
        scanner.close()


def test_scanned_code_and_id_card_each_open_their_lane_once(
    gate: tuple[Testbed, SimScanner, SamReaderThread],
) -> None:
    tb, scanner, sam = gate
    scanner.scan("OTA-0001")
    assert tb.sim.walk(1, "entry")
    [p1] = tb.wait_event("passage")
    assert (p1.lane, p1.data["ticket_id"]) == ("L1", "qr1")

    sam.put_card(synthetic_card(seq=1))
    assert tb.sim.walk(2, "entry")
    passages = tb.wait_event("passage", count=2)
    assert (passages[1].lane, passages[1].data["ticket_id"]) == ("L2", "rn1")
    sam.remove_card()

    tb.wait_modes("locked")
    scanner.scan("OTA-0001")
    wait_for(
        lambda: tb.status()["last_decisions"]["L1"]["reason"] == "zone_used_up",
        5,
        "the second scan refused",
    )
    sam.put_card(synthetic_card(seq=2, expired=True))
    wait_for(
        lambda: tb.status()["last_decisions"].get("L2", {}).get("reason") == "card_invalid",
        5,
        "the expired card refused",
    )
    readers = {r["reader"]: r for r in tb.status()["readers"]}
    assert readers["L1-qr-serial-1"]["connected"] and readers["L2-idcard-1"]["connected"]
    number = synthetic_id_number(seq=1)
    assert all(number not in json.dumps(e.data) for e in tb.events())
    assert number not in (tb.dir / "daemon.log").read_text()
