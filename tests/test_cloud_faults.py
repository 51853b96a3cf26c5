"""Nothing lost: the broker stopped, the daemon killed, the link cut and silenced.

Every test ends the same way: the cloud holds every event the gate issued, each seq once
after de-duplication by id, the hash chain intact, and no seq ever arrived with a different
id (redeliveries carry the same id).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cloudkit import gate_with_cloud, sync_status, wait_uplink_idle
from relay import Relay

from agent.cloud.reference import ReferenceCloud
from agent.localbroker import LocalBroker
from agent.testbed import Testbed, wait_for
from drivers.sim.client import SimClient

STEP_S = 0.005
PASSAGES = int(os.environ.get("GATE_OUTAGE_PASSAGES", "10000"))
KILLS = int(os.environ.get("GATE_SYNC_KILLS", "30"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    with LocalBroker(tmp_path / "broker") as b:
        yield b


def issued(tb: Testbed) -> int:
    """The newest seq the gate has written."""
    return int(tb.status()["cache"]["outbox"]["last_seq"])


def hold_open(tb: Testbed) -> None:
    for lane in tb.modes():
        tb.ctl({"cmd": "hold_open", "lane": lane, "on": True})
    tb.wait_modes("held_open")


def crowd(tb: Testbed, per_lane: int, lanes: int) -> None:
    """People stream through every held-open lane at once."""

    def walk(channel: int) -> None:
        with SimClient(str(tb.sim_socket)) as client:
            client.crowd(channel, per_lane, step_s=STEP_S, gap_s=STEP_S)

    threads = [threading.Thread(target=walk, args=(ch,)) for ch in range(1, lanes + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def assert_all_delivered(tb: Testbed, cloud: ReferenceCloud, timeout_s: float) -> int:
    gate = tb.status()["gate"]
    last = wait_uplink_idle(tb, timeout_s)["uplink"]["acked_upto"]
    cloud.wait(lambda c: max(c.gates[gate].events, default=0) >= last, 30, f"seq {last}")
    log = cloud.gates[gate]
    ok, detail = log.check()
    assert ok, detail
    assert min(log.events) == 1 and max(log.events) == last == issued(tb)
    assert not log.conflicts
    return int(last)


@pytest.mark.timeout(PASSAGES // 40 + 120)
def test_broker_outage_every_passage_arrives_once_in_order(
    tmp_path: Path, broker: LocalBroker
) -> None:
    lanes = 4
    with gate_with_cloud(tmp_path / "gate", broker, lanes=lanes, bus={"poll_hz": 1000}) as (
        tb,
        cloud,
    ):
        gate = tb.status()["gate"]
        hold_open(tb)
        wait_uplink_idle(tb, 10)
        broker.stop()
        wait_for(lambda: not sync_status(tb)["connected"], 10, "the gate noticing")
        before = issued(tb)
        while (
            sum(lane["counts"].get("free_passage", 0) for lane in tb.status()["lanes"]) < PASSAGES
        ):
            crowd(tb, per_lane=PASSAGES // lanes // 4 + 1, lanes=lanes)
        passages = sum(lane["counts"].get("free_passage", 0) for lane in tb.status()["lanes"])
        wait_for(lambda: issued(tb) >= before + passages, 30, "every passage written")
        assert sync_status(tb)["outbox_depth"] >= passages
        broker.start()
        last = assert_all_delivered(tb, cloud, 120)
        assert cloud.count(gate, "free_passage") == passages >= PASSAGES
        assert last >= passages
        # Redelivery is allowed, loss is not: the counters say how many came twice.
        log = cloud.gates[gate]
        assert log.received - log.duplicates == last


@pytest.mark.timeout(KILLS * 5 + 60)
def test_daemon_killed_during_traffic_loses_nothing(tmp_path: Path, broker: LocalBroker) -> None:
    rng = random.Random(4)
    with gate_with_cloud(tmp_path / "gate", broker, lanes=2, bus={"poll_hz": 500}) as (
        tb,
        cloud,
    ):
        stop, flowing = threading.Event(), threading.Event()

        def traffic() -> None:
            with SimClient(str(tb.sim_socket)) as client:
                while not stop.is_set():
                    if flowing.wait(0.1):
                        for channel in (1, 2):
                            client.crowd(channel, 3, step_s=0.01, gap_s=0.01)

        walker = threading.Thread(target=traffic)
        walker.start()
        try:
            for _ in range(KILLS):
                hold_open(tb)
                flowing.set()
                # Killed at a random point: mid-passage, mid-commit, mid-batch, mid-PUBACK.
                time.sleep(rng.uniform(0.1, 0.8))
                tb.stop_daemon(signal.SIGKILL)
                flowing.clear()
                time.sleep(0.2)  # the walker finishes its people; the lanes settle
                tb.start_daemon()
        finally:
            stop.set()
            walker.join()
        wait_for(lambda: sync_status(tb).get("connected"), 15, "the gate reconnecting")
        last = assert_all_delivered(tb, cloud, 60)
        assert last > KILLS * 5, "traffic produced events between the kills"
        log = cloud.gates[tb.status()["gate"]]
        assert log.received >= last


@pytest.mark.timeout(180)
def test_link_cut_mid_batch_and_silent_link_lose_nothing(
    tmp_path: Path, broker: LocalBroker
) -> None:
    with Relay(broker.host, broker.port) as relay, gate_with_cloud(
        tmp_path / "gate",
        broker,
        port=relay.port,
        lanes=2,
        bus={"poll_hz": 1000},
        cloud_options={"keepalive_s": 2, "batch_events": 100},
        backlog=30_000,
    ) as (tb, cloud):
        # The gate comes back after a long time offline and drains its backlog: the link is
        # cut 30 ms into the drain, with batches in flight, and is back after 3 s.
        wait_for(lambda: relay.bytes_up > 20_000, 20, "the drain starting", 0.001)
        time.sleep(0.03)
        relay.cut()
        assert sync_status(tb)["outbox_depth"] > 0, "the cut came before the drain ended"
        time.sleep(3)
        relay.restore()
        wait_uplink_idle(tb, 60)
        hold_open(tb)

        # The link goes silent (bytes vanish, nothing closes) for 20 s, then is cut.
        relay.silence()
        crowd(tb, per_lane=400, lanes=2)
        time.sleep(max(0.0, 20 - 400 * 4 * STEP_S))
        relay.cut()
        time.sleep(0.5)
        relay.restore()
        assert_all_delivered(tb, cloud, 60)
