"""The uplink's message building, without a broker: batches cut by bytes, valid JSON."""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path

from agent.cloud.contract import EventsMessage
from agent.cloud.uplink import Uplink
from offline_cache.outbox import GENESIS, chain_hash, data_json, event_canonical


def _uplink(batch_bytes: int) -> Uplink:
    def mark(_: int) -> Future[int]:
        return Future()

    return Uplink(
        Path("unused.db"),
        "gate/v1/s/g/events",
        {"site": "s", "gate": "g"},
        lambda topic, payload: 1,
        mark,
        lambda: (0, 0),
        batch_events=500,
        batch_bytes=batch_bytes,
    )


def _rows(n: int) -> list[tuple[int, str, float, str, str | None, str, str, str]]:
    rows = []
    prev = GENESIS
    for seq in range(1, n + 1):
        data = data_json({"ticket_id": f"票-{seq:04d}", "reason": "已入园", "n": seq})
        eid = f"0194a3b2-fd40-7abc-9b22-{seq:012d}"
        ts = 1767225634.25 + seq
        digest = chain_hash(prev, event_canonical(eid, seq, ts, "denied", "L1", data))
        rows.append((seq, eid, ts, "denied", "L1", data, prev, digest))
        prev = digest
    return rows


def test_messages_are_cut_by_bytes_and_carry_the_chain_as_stored() -> None:
    up, rows = _uplink(4096), _rows(200)
    sent = 0
    while sent < len(rows):
        payload, last, count = up._message(rows[sent:])
        assert len(payload) <= 4096 and count >= 1
        msg = EventsMessage.model_validate_json(payload)
        assert [e.seq for e in msg.events] == list(range(sent + 1, last + 1))
        for e, row in zip(msg.events, rows[sent:], strict=False):
            assert (
                json.dumps(e.data, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
                == row[5]
            )
            assert (e.prev_hash, e.hash) == (row[6], row[7])
        sent += count


def test_one_event_larger_than_a_batch_is_still_sent_alone() -> None:
    seq, eid, ts, kind, lane, _, prev, digest = _rows(1)[0]
    huge = data_json({"note": "x" * 10_000})
    payload, last, count = _uplink(4096)._message([(seq, eid, ts, kind, lane, huge, prev, digest)])
    assert count == 1 and last == 1 and len(payload) > 4096
