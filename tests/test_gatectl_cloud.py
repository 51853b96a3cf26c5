"""``gatectl sync`` and ``gatectl cloud`` as a technician and an integrator run them: real
processes against a real Mosquitto and a real daemon on a simulated board.

One broker serves the module; each test's gate has a site id of its own (cloudkit), so
retained messages never cross tests.
"""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cloudkit import CLOUD_SEED, gate_with_cloud, public_hex, sync_status, wait_uplink_idle

from agent.localbroker import LocalBroker, free_port
from agent.testbed import Testbed
from agent.token_tool import load_seed

GATE = "gate-01"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    with LocalBroker(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture
def cloud_key(tmp_path: Path) -> Path:
    """The seed the cloudkit gates trust, as a hex seed file."""
    path = tmp_path / "cloud.seed"
    path.write_text(CLOUD_SEED.hex() + "\n")
    return path


def gatectl(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.gatectl", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def on(broker: LocalBroker, site: str) -> list[str]:
    return ["--broker", f"{broker.host}:{broker.port}", "--site", site]


def test_sync_status_and_sync_now_on_a_connected_gate(tmp_path: Path, broker: LocalBroker) -> None:
    with gate_with_cloud(tmp_path, broker) as (tb, _):
        r = tb.gatectl("sync", "status")
        assert r.returncode == 0, r.stderr
        assert f"connected to {broker.host}:{broker.port}" in r.stdout
        assert "tickets 0, products 0, blocks 0, keys 0" in r.stdout
        assert "rejected: none" in r.stdout
        s = json.loads(tb.gatectl("sync", "status", "--json").stdout)
        assert s["connected"] is True
        assert set(s["versions"]) == {"tickets", "products", "blocks", "keys"}
        r = tb.gatectl("sync", "now")
        assert r.returncode == 0, r.stderr
        assert "synced" in r.stdout
        # sync now waited until the outbox drained, its own audit event included.
        assert sync_status(tb)["outbox_depth"] == 0


def test_sync_without_cloud_or_without_daemon_says_so(tmp_path: Path) -> None:
    r = gatectl("--socket", str(tmp_path / "nobody.sock"), "sync", "status")
    assert r.returncode == 3 and "not running" in r.stderr
    with Testbed(tmp_path / "gate") as tb:
        tb.start_sim()
        tb.start_daemon()
        for action in ("status", "now"):
            r = tb.gatectl("sync", action)
            assert r.returncode == 1, r
            assert "not configured" in r.stderr


def test_keygen_makes_a_private_seed_once_and_a_dead_broker_is_reported(tmp_path: Path) -> None:
    seed = tmp_path / "cloud.seed"
    r = gatectl("cloud", "keygen", "--out", str(seed))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(seed.stat().st_mode) == 0o600
    public = public_hex(load_seed(seed))
    assert f"public_key {public}" in r.stdout
    assert f'public_key = "{public}"' in r.stdout  # ready for [[cloud.trust_anchors]]
    before = seed.read_bytes()
    again = gatectl("cloud", "keygen", "--out", str(seed))
    assert again.returncode == 1 and "exists" in again.stderr
    assert seed.read_bytes() == before

    dead = ["--broker", f"127.0.0.1:{free_port()}", "--site", "s", "--connect-timeout", "1"]
    r = gatectl("cloud", "cmd", GATE, "open", "--lane", "L1", *dead, "--key", str(seed))
    assert r.returncode == 3 and "cannot reach the broker" in r.stderr
    r = gatectl("cloud", "cmd", GATE, "open", "--lane", "L/1", *dead, "--key", str(seed))
    assert r.returncode == 1 and "gates would refuse this" in r.stderr


def test_cloud_cmd_opens_a_lane_and_collect_checks_the_chain(
    tmp_path: Path, broker: LocalBroker, cloud_key: Path
) -> None:
    with gate_with_cloud(tmp_path, broker) as (tb, cloud):
        site = on(broker, cloud.site)
        collect = subprocess.Popen(
            [sys.executable, "-m", "agent.gatectl", "cloud", "collect", *site, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert collect.stderr is not None
            assert "collecting from site" in collect.stderr.readline()
            r = gatectl(
                "cloud", "cmd", GATE, "open", "--lane", "L1", *site, "--key", str(cloud_key)
            )
            assert r.returncode == 0, r.stderr
            assert f"{GATE}: open ok" in r.stdout
            assert tb.sim.walk(1, "entry"), "the lane unlocked for the cloud's open"
            refused = gatectl(
                "cloud", "cmd", GATE, "open", "--lane", "L9", *site, "--key", str(cloud_key)
            )
            assert refused.returncode == 1
            assert "REFUSED: unknown_lane" in refused.stdout
            wait_uplink_idle(tb, 10)
            time.sleep(0.5)  # the broker has the events; let them reach the collector
        finally:
            collect.send_signal(signal.SIGINT)  # Ctrl-C ends collecting with the report
            out, err = collect.communicate(timeout=10)
        assert collect.returncode == 0, err
        report = json.loads(out)["gates"][GATE]
        assert report["chain_ok"], report["chain"]
        assert "chain intact" in report["chain"]
        assert report["kinds"].get("passage") == 1
        assert report["kinds"].get("audit", 0) >= 2
        assert report["unique"] == report["received"] and report["conflicts"] == []
        assert report["acks"] == 2
        assert report["status"]["state"] == "online"


def test_cloud_tickets_delta_reaches_the_cache(
    tmp_path: Path, broker: LocalBroker, cloud_key: Path
) -> None:
    now = time.time()
    product = {"type": "product", "id": "day", "zones": {"park": 1}}
    ticket = {
        "type": "ticket",
        "id": "t1",
        "code": "CLOUD-1",
        "product_id": "day",
        "valid_from": now - 60,
        "valid_to": now + 3600,
    }
    records = tmp_path / "tickets.jsonl"
    records.write_text(f"{json.dumps(product)}\n{json.dumps(ticket)}\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**ticket, "valid_to": "soon"}) + "\n{oops\n")
    with gate_with_cloud(tmp_path / "gate", broker) as (tb, cloud):
        site = [*on(broker, cloud.site), "--key", str(cloud_key)]
        r = gatectl("cloud", "tickets", "delta", "--from", "0", "--to", "1", *site, str(bad))
        assert r.returncode == 1
        assert "line 1: valid_to" in r.stderr and "line 2: not JSON" in r.stderr
        assert "nothing sent" in r.stderr
        r = gatectl("cloud", "tickets", "delta", "--from", "0", "--to", "1", *site, str(records))
        assert r.returncode == 1 and "--products-from" in r.stderr
        r = gatectl(
            "cloud",
            "tickets",
            "delta",
            "--from",
            "0",
            "--to",
            "1",
            "--products-from",
            "0",
            "--products-to",
            "1",
            "--wait",
            "10",
            *site,
            str(records),
        )
        assert r.returncode == 0, r.stderr
        assert f"{GATE}: products 1, tickets 1" in r.stdout
        lookup = tb.gatectl("cache", "lookup", "CLOUD-1")
        assert lookup.returncode == 0, lookup.stdout + lookup.stderr
        assert lookup.stdout.startswith("ALLOWED: ok (ticket t1")
