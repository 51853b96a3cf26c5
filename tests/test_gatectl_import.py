"""gatectl cache import cuts a big file into requests the control socket accepts."""

from __future__ import annotations

import json
from pathlib import Path

from agent.control import MAX_LINE
from agent.gatectl import _import_requests


def test_requests_fit_the_socket_line_and_keep_every_record(tmp_path: Path) -> None:
    path = tmp_path / "tickets.jsonl"
    records = [
        {
            "type": "ticket",
            "id": f"t{i}",
            "code": f"OTA-{i:012d}",
            "product_id": "day",
            "valid_from": "2026-11-25T00:00:00+08:00",
            "valid_to": "2026-11-26T00:00:00+08:00",
            "holder_hash": "ab" * 32,
        }
        for i in range(5000)
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    requests, errors = _import_requests(str(path))
    assert errors == ["line 5001: not JSON (Expecting value)"]
    assert all(len(json.dumps(r).encode()) + 1 < MAX_LINE for r in requests)
    assert [rec for r in requests for rec in r["records"]] == records
    assert [n for r in requests for n in r["lines"]] == list(range(1, 5001))
