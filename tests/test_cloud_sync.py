"""Cloud sync with a real Mosquitto: commands, forged downlink, tickets, keys, TLS.

One broker serves the whole module (plain and TLS listeners, a password file); each test
gets a site id of its own, so retained messages and persistent sessions never cross tests.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cloudkit import (
    CLOUD_SEED,
    ROGUE_SEED,
    gate_with_cloud,
    public_hex,
    sync_status,
)

from agent.cloud.contract import down_topics
from agent.cloud.signing import CONTEXT, Anchor, DownlinkVerifier, Rejected, sign_message
from agent.localbroker import LocalBroker
from agent.testbed import wait_for
from verify.token import TokenClaims, mint_token, public_key_for

NOW = 1_800_000_000.0
TOPICS = down_topics("park", "g1")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    with LocalBroker(tmp_path_factory.mktemp("broker"), tls=True) as b:
        yield b


# --- the signed envelope, without a broker ----------------------------------------------------


def _verifier(**kw: Any) -> DownlinkVerifier:
    anchors = [
        Anchor(bytes.fromhex(public_hex(CLOUD_SEED)), kw.pop("nb", None), kw.pop("na", None))
    ]
    return DownlinkVerifier(anchors, TOPICS, max_bytes=1 << 20, max_lifetime_s=3600, **kw)


def _signed(topic: str = TOPICS["cmd"], body: dict[str, Any] | None = None, **kw: Any) -> bytes:
    body = body if body is not None else {"cmd": "open", "lane": "L1"}
    seed = kw.pop("seed", CLOUD_SEED)
    return sign_message(topic, body, seed, now=kw.pop("now", NOW), **kw)


def _resign(raw: bytes, edit: Any) -> bytes:
    """The envelope with its payload edited and signed again by the cloud key."""
    from nacl.signing import SigningKey

    env = json.loads(raw)
    payload = json.loads(env["payload"])
    edit(payload)
    env["payload"] = json.dumps(payload)
    sig = SigningKey(CLOUD_SEED).sign(CONTEXT + env["payload"].encode()).signature
    env["sig"] = base64.b64encode(sig).decode()
    return json.dumps(env).encode()


def _tamper(raw: bytes) -> bytes:
    env = json.loads(raw)
    env["payload"] = env["payload"].replace('"L1"', '"L2"')
    return json.dumps(env).encode()


def _rogue_kid(raw: bytes) -> bytes:
    """Signed by a rogue key that claims the cloud key's kid."""
    good = json.loads(raw)
    env = json.loads(_signed(seed=ROGUE_SEED))
    env["kid"] = good["kid"]
    return json.dumps(env).encode()


REJECTIONS: list[tuple[str, Any, str]] = [
    ("unsigned JSON", lambda: b'{"cmd": "open", "lane": "L1"}', "malformed"),
    ("not JSON", lambda: b"\xff\xfe open sesame", "malformed"),
    ("empty", lambda: b"", "malformed"),
    (
        "wrong types",
        lambda: json.dumps({"v": 1, "kid": 7, "payload": [], "sig": {}}).encode(),
        "malformed",
    ),
    ("unknown key", lambda: _signed(seed=ROGUE_SEED), "unknown_key"),
    ("rogue key, spoofed kid", lambda: _rogue_kid(_signed()), "bad_signature"),
    ("payload edited", lambda: _tamper(_signed()), "bad_signature"),
    ("expired", lambda: _signed(now=NOW - 400, ttl_s=300), "expired"),
    ("issued in the future", lambda: _signed(now=NOW + 3600, ttl_s=60), "not_yet_valid"),
    ("lifetime too long", lambda: _signed(ttl_s=86400), "bad_lifetime"),
    ("for another gate", lambda: _signed(topic="gate/v1/park/g2/cmd"), "wrong_target"),
    (
        "cmd replayed as all_cmd",
        lambda: _resign(_signed(), lambda p: p.update(topic=TOPICS["all_cmd"])),
        "wrong_target",
    ),
    ("body of wrong type", lambda: _signed(body={"cmd": "open", "lane": 5}), "invalid_body"),
    ("unknown command", lambda: _signed(body={"cmd": "format_disk"}), "invalid_body"),
    (
        "extra field",
        lambda: _signed(body={"cmd": "open", "lane": "L1", "force": True}),
        "invalid_body",
    ),
    ("too large", lambda: b"{" + b" " * (2 << 20) + b"}", "too_large"),
]


@pytest.mark.parametrize(("what", "make", "reason"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_envelope_rejections(what: str, make: Any, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        _verifier().verify(TOPICS["cmd"], make(), NOW)
    assert info.value.reason == reason


def test_envelope_accepts_the_cloud_and_a_rotated_key() -> None:
    v = _verifier().verify(TOPICS["cmd"], _signed(), NOW)
    assert (v.kind, v.body.cmd, v.body.lane) == ("cmd", "open", "L1")
    anchors = [
        Anchor(bytes.fromhex(public_hex(CLOUD_SEED)), None, NOW - 1),
        Anchor(bytes.fromhex(public_hex(ROGUE_SEED)), NOW - 10, None),
    ]
    rotated = DownlinkVerifier(anchors, TOPICS, max_bytes=1 << 20, max_lifetime_s=3600)
    assert rotated.verify(TOPICS["cmd"], _signed(seed=ROGUE_SEED), NOW).body.cmd == "open"
    with pytest.raises(Rejected, match="key_not_valid_now"):
        rotated.verify(TOPICS["cmd"], _signed(), NOW)


def test_a_topic_the_gate_does_not_subscribe_to_is_refused() -> None:
    with pytest.raises(Rejected, match="wrong_topic"):
        _verifier().verify("gate/v1/park/g1/events", _signed(), NOW)


# --- with the broker and the daemon ------------------------------------------------------------


def test_commands_are_applied_acknowledged_and_audited(tmp_path: Path, broker: LocalBroker) -> None:
    with gate_with_cloud(tmp_path, broker) as (tb, cloud):
        gate = tb.status()["gate"]
        ack = cloud.wait_ack(cloud.command(gate, {"cmd": "open", "lane": "L1"}))
        assert ack["ok"] and ack["cmd"] == "open"
        assert tb.sim.walk(1, "entry")
        # With sync on, acknowledged events leave the gate: the cloud is where they are.
        cloud.wait_events(gate, 1, 10, kind="passage")
        assert cloud.wait_ack(cloud.command(gate, {"cmd": "lockout", "lane": "*", "on": True}))[
            "ok"
        ]
        tb.wait_modes("locked_out")
        assert cloud.wait_ack(cloud.command(gate, {"cmd": "lockout", "lane": "*", "on": False}))[
            "ok"
        ]
        tb.wait_modes("locked")
        assert cloud.wait_ack(cloud.command("all", {"cmd": "emergency", "action": "on"}))["ok"]
        tb.wait_modes("emergency_open")
        assert cloud.wait_ack(cloud.command(gate, {"cmd": "emergency", "action": "reset"}))["ok"]
        tb.wait_modes("locked", timeout_s=10)
        refused = cloud.wait_ack(cloud.command(gate, {"cmd": "open", "lane": "L9"}))
        assert not refused["ok"] and refused["error"] == "unknown_lane"
        reload = cloud.wait_ack(cloud.command(gate, {"cmd": "config_reload"}))
        assert reload["error"] == "not_supervised"
        cap = cloud.wait_ack(
            cloud.command(gate, {"cmd": "zone_capacity", "zone": "park", "capacity": 5})
        )
        assert cap["ok"]

        def cloud_audits() -> list[str]:
            audits = [e["data"] for e in cloud.events(gate, "audit")]
            return [a["cmd"] for a in audits if str(a.get("origin", "")).startswith("cloud:")]

        # The ack can overtake the audit event, which is written and sent after it.
        wait_for(lambda: len(cloud_audits()) >= 8, 10, "every command's audit event")
        assert cloud_audits() == [
            "open",
            "lockout",
            "lockout",
            "emergency",
            "emergency",
            "open",
            "config_reload",
            "zone_capacity",
        ]
        ok, detail = cloud.gates[gate].check()
        assert ok, detail
        assert cloud.status[gate]["state"] == "online"
        assert cloud.telemetry, "telemetry published"


def _forgeries(cloud: Any, gate: str) -> list[tuple[str, bytes]]:
    topics = cloud.topics(gate)
    other = down_topics(cloud.site, "other-gate")["cmd"]
    bodies = {
        "cmd": {"cmd": "open", "lane": "L1"},
        "all_cmd": {"cmd": "open", "lane": "L1"},
        "tickets": {
            "op": "delta",
            "kind": "tickets",
            "from_version": 0,
            "to_version": 1,
            "upserts": [{"id": "evil", "code": "EVIL", "product_id": "p"}],
        },
        "blocklist": {"op": "delta", "from_version": 0, "to_version": 1},
        "keys": {"version": 9, "keys": [{"issuer": "evil", "public_key": public_hex(ROGUE_SEED)}]},
        "faces": {"op": "delta", "from_version": 0, "to_version": 1},
    }
    out: list[tuple[str, bytes]] = []
    for kind, body in bodies.items():
        topic = topics[kind]
        out += [
            (topic, json.dumps(body).encode()),
            (topic, sign_message(topic, body, ROGUE_SEED)),
            (topic, sign_message(topic, body, CLOUD_SEED, now=time.time() - 4000, ttl_s=60)),
            (topic, sign_message(other, body, CLOUD_SEED)),
            (topic, b"{not json"),
            (topic, json.dumps({"v": 1, "kid": "00", "payload": 1, "sig": None}).encode()),
            (topic, b"x" * (10 * 1024 * 1024)),
        ]
    return out


def test_forged_downlink_is_refused_counted_and_applies_nothing(
    tmp_path: Path, broker: LocalBroker
) -> None:
    with gate_with_cloud(tmp_path, broker) as (tb, cloud):
        gate = tb.status()["gate"]
        before = sync_status(tb)["versions"]
        forgeries = _forgeries(cloud, gate)
        for topic, payload in forgeries:
            cloud.publish_raw(topic, payload)
        # A genuine command, sent twice: the copy is a replay.
        genuine = sign_message(
            cloud.topics(gate)["cmd"], {"cmd": "resync", "kinds": ["keys"]}, CLOUD_SEED
        )
        cloud.publish_raw(cloud.topics(gate)["cmd"], genuine)
        cloud.publish_raw(cloud.topics(gate)["cmd"], genuine)
        expected = len(forgeries) + 1
        wait_for(
            lambda: sum(sync_status(tb)["downlink_rejected"].values()) >= expected,
            30,
            "every forgery counted",
        )
        status = sync_status(tb)
        rejected = status["downlink_rejected"]
        assert rejected["replayed"] == 1, rejected
        assert {"malformed", "unknown_key", "expired", "wrong_target", "too_large"} <= set(rejected)
        assert sum(rejected.values()) == expected, rejected
        assert status["versions"] == before
        assert status["downlink_applied"] == {"cmd": 1}
        assert tb.modes() == {"L1": "locked", "L2": "locked"}
        assert tb.ctl({"cmd": "cache_lookup", "code": "EVIL"})["decision"]["reason"] == "unknown"
        assert tb.daemon_proc is not None and tb.daemon_proc.poll() is None
        log = (tb.dir / "daemon.log").read_text()
        assert "EVIL" not in log and "not json" not in log


def test_tickets_blocklist_snapshot_and_issuer_keys_from_the_cloud(
    tmp_path: Path, broker: LocalBroker
) -> None:
    now = time.time()
    day = {"valid_from": now - 60, "valid_to": now + 3600}
    with gate_with_cloud(tmp_path, broker) as (tb, cloud):
        gate = tb.status()["gate"]
        cloud.tickets_delta(0, 1, [{"id": "day", "zones": {"park": 1}}], kind="products")
        cloud.tickets_delta(0, 1, [{"id": "t1", "code": "C-1", "product_id": "day", **day}])
        wait_for(lambda: sync_status(tb)["versions"]["tickets"] == 1, 10, "the delta applied")
        assert tb.ctl({"cmd": "present", "lane": "L1", "code": "C-1"})["outcome"] == "unlocked"
        assert tb.sim.walk(1, "entry")
        # The same delta again: idempotent. A delta from version 5: a gap, resync asked.
        cloud.tickets_delta(0, 1, [{"id": "t1", "code": "C-1", "product_id": "day", **day}])
        cloud.tickets_delta(5, 6, [{"id": "t6", "code": "C-6", "product_id": "day", **day}])
        cloud.wait(lambda c: any(r["reason"] == "gap" for r in c.resync), 10, "a resync request")
        [req] = [r for r in cloud.resync if r["reason"] == "gap"]
        assert (req["gate"], req["kind"], req["have"]) == (gate, "tickets", 1)
        assert sync_status(tb)["versions"]["tickets"] == 1

        tickets = [
            {"id": f"s{i}", "code": f"S-{i}", "product_id": "day", **day} for i in range(12000)
        ]
        chunks = cloud.snapshot(
            10,
            tickets,
            products=[{"id": "day", "zones": {"park": 2}}],
            products_version=2,
            chunk=5000,
        )
        assert chunks == 3
        # A delta built on the snapshot, arriving while it is still being written: held and
        # applied after the swap, not lost and not a gap.
        cloud.tickets_delta(10, 11, [{"id": "d11", "code": "D-11", "product_id": "day", **day}])
        wait_for(lambda: sync_status(tb)["versions"]["tickets"] == 11, 60, "snapshot + delta")
        assert tb.status()["cache"]["tickets"] == 12001
        assert tb.ctl({"cmd": "cache_lookup", "code": "C-1"})["decision"]["reason"] == "unknown"
        assert tb.ctl({"cmd": "cache_lookup", "code": "D-11"})["decision"]["reason"] == "ok"
        assert [r["reason"] for r in cloud.resync] == ["gap"]

        cloud.blocklist_delta(0, 1, [{"kind": "ticket", "value": "s7"}])
        wait_for(lambda: sync_status(tb)["versions"]["blocks"] == 1, 10, "the block applied")
        assert tb.ctl({"cmd": "cache_lookup", "code": "S-7"})["decision"]["reason"] == "blocked"

        issuer = bytes(range(50, 82))
        claims = TokenClaims(
            "web-shop", "W-1", "day", {"park": 1}, int(now) - 60, int(now) + 3600, int(now), "web"
        )
        token = mint_token(claims, issuer)
        assert (
            tb.ctl({"cmd": "cache_lookup", "code": token})["decision"]["reason"] == "bad_signature"
        )
        cloud.issuer_keys(1, [{"issuer": "web-shop", "public_key": public_key_for(issuer).hex()}])
        wait_for(lambda: sync_status(tb)["versions"]["keys"] == 1, 10, "the keys applied")
        assert tb.ctl({"cmd": "cache_lookup", "code": token})["decision"]["reason"] == "ok"

        # After a restart the gate keeps the cloud's keys, and the retained keys message it
        # is handed again is a duplicate, not an attack.
        tb.stop_daemon()
        tb.start_daemon()
        wait_for(lambda: sync_status(tb).get("connected"), 15, "the gate reconnecting")
        assert tb.ctl({"cmd": "cache_lookup", "code": token})["decision"]["reason"] == "ok"
        time.sleep(1)
        assert sync_status(tb)["downlink_rejected"] == {}


def test_tls_with_client_certificate_and_password(tmp_path: Path, broker: LocalBroker) -> None:
    password = tmp_path / "mqtt.pass"
    password.write_text(broker.password + "\n")
    options = {
        "tls": True,
        "ca_file": broker.ca_file,
        "cert_file": broker.client_cert,
        "key_file": broker.client_key,
        "username": broker.username,
        "password_file": password,
    }
    with gate_with_cloud(tmp_path / "ok", broker, port=broker.tls_port, cloud_options=options) as (
        tb,
        cloud,
    ):
        gate = tb.status()["gate"]
        assert cloud.wait_ack(cloud.command(gate, {"cmd": "open", "lane": "L2"}))["ok"]
    password.write_text("wrong\n")
    with gate_with_cloud(
        tmp_path / "bad", broker, port=broker.tls_port, cloud_options=options, connected=False
    ) as (tb, _):
        wait_for(lambda: "refused" in str(sync_status(tb).get("last_error")), 10, "the refusal")
        assert not sync_status(tb)["connected"]
        assert tb.modes() == {"L1": "locked", "L2": "locked"}, "the gate works on offline"


def test_status_online_last_will_and_clean_offline(tmp_path: Path, broker: LocalBroker) -> None:
    with gate_with_cloud(tmp_path, broker) as (tb, cloud):
        gate = tb.status()["gate"]
        cloud.wait(lambda c: c.status.get(gate, {}).get("state") == "online", 10, "online")
        online = cloud.status[gate]
        assert online["outbox"]["depth"] >= 0 and {"L1", "L2"} == {x["id"] for x in online["lanes"]}
        # The daemon dies without a word: the broker publishes its Last Will.
        tb.stop_daemon(signal.SIGKILL)
        cloud.wait(
            lambda c: c.status[gate].get("state") == "offline", 15, "the Last Will (keepalive 3 s)"
        )
        assert cloud.status[gate]["reason"] == "lost"
        tb.start_daemon()
        cloud.wait(lambda c: c.status[gate].get("state") == "online", 15, "online again")
        # A clean stop says so itself, retained, before it disconnects.
        tb.stop_daemon()
        cloud.wait(lambda c: c.status[gate].get("state") == "offline", 10, "offline")
        assert cloud.status[gate]["reason"] == "shutdown"


def test_mqtt_3_1_1_fallback(tmp_path: Path, broker: LocalBroker) -> None:
    with gate_with_cloud(tmp_path, broker, cloud_options={"protocol": "3.1.1"}) as (tb, cloud):
        gate = tb.status()["gate"]
        assert cloud.wait_ack(cloud.command(gate, {"cmd": "open", "lane": "L1"}))["ok"]
        assert tb.sim.walk(1, "entry")
        cloud.wait_events(gate, 1, 10, kind="passage")
        ok, detail = cloud.gates[gate].check()
        assert ok, detail


def _workers(pid: int) -> list[int]:
    """The daemon's verification worker processes (multiprocessing spawn children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if fields[1] == str(pid) and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_a_dead_verification_worker_is_replaced_and_nothing_is_lost(
    tmp_path: Path, broker: LocalBroker
) -> None:
    now = time.time()
    day = {"product_id": "day", "valid_from": now - 60, "valid_to": now + 3600}
    with gate_with_cloud(tmp_path, broker) as (tb, cloud):
        assert tb.daemon_proc is not None
        [worker] = wait_for(lambda: _workers(tb.daemon_proc.pid), 10, "the worker process")
        os.kill(worker, signal.SIGKILL)
        cloud.tickets_delta(0, 1, [{"id": "day", "zones": {"park": 1}}], kind="products")
        cloud.tickets_delta(0, 1, [{"id": "t1", "code": "C-1", **day}])
        wait_for(lambda: sync_status(tb)["versions"]["tickets"] == 1, 15, "the delta applied")
        tickets = [{"id": f"s{i}", "code": f"S-{i}", **day} for i in range(3000)]
        cloud.snapshot(2, tickets, chunk=1000)
        wait_for(lambda: sync_status(tb)["versions"]["tickets"] == 2, 30, "the snapshot applied")
        assert tb.ctl({"cmd": "cache_lookup", "code": "S-2999"})["decision"]["reason"] == "ok"
        assert len(_workers(tb.daemon_proc.pid)) == 1, "a new worker took over"
