"""SIGKILL the daemon at random moments while visitors pass; after every restart the ticket
usage and the outbox must agree, the sequence must be gap-free and the hash chain intact.

``make test`` kills it 50 times; ``make soak`` 500 times (GATE_CRASH_KILLS).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from agent.control import DaemonNotRunning, request
from agent.testbed import Testbed
from drivers.sim.client import SimClient, SimError
from offline_cache import verify_chain

KILLS = int(os.environ.get("GATE_CRASH_KILLS", "50"))
TICKETS = 30


def traffic(tb: Testbed, lane: int, stop: threading.Event, seed: int) -> None:
    """Visitors at one lane: present a ticket, walk through when it opens, again and again."""
    rng = random.Random(seed)
    try:
        with SimClient(str(tb.sim_socket)) as sim:
            while not stop.is_set():
                code = f"CODE-c{rng.randrange(TICKETS)}"
                try:
                    reply = request(
                        tb.ctl_socket,
                        {"cmd": "present", "lane": f"L{lane}", "code": code},
                        timeout_s=2,
                    )
                except (DaemonNotRunning, OSError, ValueError):
                    return
                if reply.get("outcome") == "unlocked":
                    sim.walk(lane, "entry", wait_timeout_s=1.0, step_s=0.01)
    except (SimError, OSError):
        return


def check_consistency(db_path: Path) -> int:
    """Usage equals the passages in the outbox, per ticket; returns the passage count."""
    report = verify_chain(db_path)
    assert report.ok, report
    con = sqlite3.connect(db_path)
    try:
        usage = dict(con.execute("SELECT ticket_id, entries FROM usage WHERE zone = 'park'"))
        counted: dict[str, int] = {}
        for (data,) in con.execute("SELECT data FROM outbox WHERE kind = 'passage'"):
            tid = json.loads(data)["ticket_id"]
            counted[tid] = counted.get(tid, 0) + 1
    finally:
        con.close()
    assert {k: v for k, v in usage.items() if v} == counted
    return sum(counted.values())


@pytest.mark.timeout(KILLS * 4 + 60)
def test_sigkill_during_passages_loses_nothing(tmp_path: Path) -> None:
    now = time.time()
    records = [
        {"type": "product", "id": "season", "zones": {"park": None}, "reentry": {"mode": "always"}}
    ]
    records += [
        {
            "type": "ticket",
            "id": f"c{i}",
            "code": f"CODE-c{i}",
            "product_id": "season",
            "valid_from": now - 3600,
            "valid_to": now + 86400,
        }
        for i in range(TICKETS)
    ]
    tickets = tmp_path / "tickets.jsonl"
    tickets.write_text("\n".join(json.dumps(r) for r in records))
    rng = random.Random(20261125)
    with Testbed(
        tmp_path / "gate",
        fail_states=("locked", "locked"),
        lane={"zone": "park", "close_time_s": 0.1, "unlock_timeout_s": 1.5},
        extra_toml="[admission]\nanti_passback = false\n",
    ) as tb:
        tb.start_sim()
        tb.start_daemon()
        assert tb.gatectl("cache", "import", str(tickets)).returncode == 0
        for k in range(KILLS):
            stop = threading.Event()
            walkers = [
                threading.Thread(target=traffic, args=(tb, lane, stop, k * 2 + lane))
                for lane in (1, 2)
            ]
            for w in walkers:
                w.start()
            time.sleep(rng.uniform(0.05, 0.5))
            assert tb.daemon_proc is not None
            tb.daemon_proc.kill()
            tb.daemon_proc.wait()
            tb.daemon_proc = None
            stop.set()
            for w in walkers:
                w.join(10)
            check_consistency(tb.state_dir / "gate.db")
            tb.start_daemon()
            stats = tb.ctl({"cmd": "cache_stats"})["stats"]
            assert stats["reservations"] == 0
        assert tb.stop_daemon() == 0
        passages = check_consistency(tb.state_dir / "gate.db")
    assert passages >= KILLS // 2, f"only {passages} passages in {KILLS} kills"
    print(f"{KILLS} kills, {passages} passages, usage and outbox agree")
