"""The reference cloud: the other side of docs/mqtt.md, for tests, the demo and integrators.

It signs and sends commands, ticket and blocklist deltas, snapshots and issuer keys, and it
collects the gates' events, de-duplicating by id and checking each gate's sequence and hash
chain exactly as a production cloud must. It speaks through the same broker as the gates.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.cloud.contract import down_topics, parse_up_topic
from agent.cloud.mqtt import Incoming, LinkListener, LinkSettings, MqttLink
from agent.cloud.signing import sign_message
from offline_cache.outbox import GENESIS, canonical_json, chain_hash, event_canonical

log = logging.getLogger(__name__)


@dataclass
class GateLog:
    """What the cloud holds of one gate's events."""

    events: dict[int, dict[str, Any]] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)
    received: int = 0
    duplicates: int = 0
    conflicts: list[str] = field(default_factory=list)
    """Same seq with a different id or hash: never acceptable."""

    def check(self) -> tuple[bool, str]:
        """Sequence gap-free from the first seq held, every hash recomputed and linked."""
        if not self.events:
            return True, "no events"
        seqs = sorted(self.events)
        if seqs[-1] - seqs[0] + 1 != len(seqs):
            missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
            return False, f"{len(missing)} seqs missing, first {missing[0]}"
        prev = self.events[seqs[0]]["prev_hash"]
        if seqs[0] == 1 and prev != GENESIS:
            return False, "seq 1 does not start from the genesis hash"
        for seq in seqs:
            e = self.events[seq]
            if e["prev_hash"] != prev:
                return False, f"seq {seq}: prev_hash does not link"
            data = canonical_json(e["data"])
            canonical = event_canonical(e["id"], seq, e["ts"], e["kind"], e["lane"], data)
            if chain_hash(prev, canonical) != e["hash"]:
                return False, f"seq {seq}: hash does not match its content"
            prev = e["hash"]
        if self.conflicts:
            return False, self.conflicts[0]
        return True, f"{len(seqs)} events, seq {seqs[0]}..{seqs[-1]}, chain intact"


class ReferenceCloud(LinkListener):
    """A site cloud on one MQTT connection."""

    def __init__(
        self,
        settings: LinkSettings,
        site: str,
        seed: bytes,
        *,
        ttl_s: float = 300.0,
    ) -> None:
        self.site = site
        self.seed = seed
        self.ttl_s = ttl_s
        self.gates: dict[str, GateLog] = {}
        self.status: dict[str, dict[str, Any]] = {}
        self.telemetry: list[dict[str, Any]] = []
        self.acks: dict[str, dict[str, Any]] = {}
        self.resync: list[dict[str, Any]] = []
        self.messages = 0
        self.received_at: list[tuple[float, int]] = []
        """(monotonic time, highest seq in the message) per events message, for latency."""
        self._cv = threading.Condition()
        self._ready = threading.Event()
        subs = [f"gate/v1/{site}/+/{kind}" for kind in ("events", "status", "telemetry", "resync")]
        subs.append(f"gate/v1/{site}/+/cmd/ack")
        self.link = MqttLink(settings, self, subs)

    def __enter__(self) -> ReferenceCloud:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 10.0) -> None:
        self.link.start()
        if not self._ready.wait(timeout_s):
            self.link.stop()
            raise TimeoutError(f"reference cloud: no connection ({self.link.last_error})")

    def stop(self) -> None:
        self.link.stop()

    # --- link listener (link thread) ------------------------------------------------------

    def connected(self, conn: int, session_present: bool) -> None:
        self._ready.set()

    def message(self, conn: int, msg: Incoming) -> None:
        where = parse_up_topic(msg.topic)
        if where is None:
            return
        gate, kind = where
        try:
            body = json.loads(msg.payload)
        except ValueError:
            log.warning("reference cloud: unreadable message on %s", msg.topic)
            return
        with self._cv:
            if kind == "events":
                self._events(gate, body)
            elif kind == "status":
                self.status[gate] = body
            elif kind == "telemetry":
                self.telemetry.append(body)
            elif kind == "cmd/ack":
                self.acks[body.get("nonce", "")] = body
            elif kind == "resync":
                self.resync.append(body)
            self._cv.notify_all()

    def _events(self, gate: str, body: dict[str, Any]) -> None:
        log_ = self.gates.setdefault(gate, GateLog())
        self.messages += 1
        top = 0
        for e in body.get("events", []):
            if not (isinstance(e, dict) and isinstance(e.get("seq"), int) and "id" in e):
                log_.conflicts.append("an event without seq or id")
                continue
            log_.received += 1
            seq = e["seq"]
            top = max(top, seq)
            held = log_.events.get(seq)
            if held is not None:
                log_.duplicates += 1
                if held["id"] != e["id"] or held["hash"] != e["hash"]:
                    log_.conflicts.append(f"seq {seq} arrived with a different id or hash")
                continue
            if e["id"] in log_.ids or "hash" not in e:
                log_.conflicts.append(f"id {e['id']} arrived under a second seq")
                continue
            log_.ids.add(e["id"])
            log_.events[seq] = e
        self.received_at.append((time.monotonic(), top))

    # --- waiting --------------------------------------------------------------------------

    def wait(self, predicate: Any, timeout_s: float, what: str) -> None:
        """Wait until ``predicate(self)`` holds (under the lock)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"reference cloud: timed out waiting for {what}")
                self._cv.wait(min(left, 0.2))

    def count(self, gate: str, kind: str | None = None) -> int:
        with self._cv:
            events = self.gates.get(gate, GateLog()).events.values()
            return sum(1 for e in events if kind is None or e["kind"] == kind)

    def events(self, gate: str, kind: str | None = None) -> list[dict[str, Any]]:
        """A gate's events held, in seq order."""
        with self._cv:
            held = self.gates.get(gate, GateLog()).events
            return [held[s] for s in sorted(held) if kind is None or held[s]["kind"] == kind]

    def wait_events(self, gate: str, count: int, timeout_s: float, kind: str | None = None) -> None:
        self.wait(
            lambda c: (
                sum(
                    1
                    for e in c.gates.get(gate, GateLog()).events.values()
                    if kind is None or e["kind"] == kind
                )
                >= count
            ),
            timeout_s,
            f"{count} {kind or 'events'} from {gate}",
        )

    # --- sending --------------------------------------------------------------------------

    def send(self, topic: str, body: dict[str, Any], *, retain: bool = False, **sign: Any) -> str:
        """Sign ``body`` for ``topic`` and publish it (QoS 1); returns the nonce."""
        nonce = sign.pop("nonce", None) or secrets.token_urlsafe(18)
        payload = sign_message(topic, body, self.seed, ttl_s=self.ttl_s, nonce=nonce, **sign)
        self.publish_raw(topic, payload, retain=retain)
        return nonce

    def publish_raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish bytes as they are (tests use this for forged and malformed messages)."""
        deadline = time.monotonic() + 10
        while self.link.publish(topic, payload, qos=1, retain=retain) < 0:
            if time.monotonic() > deadline:
                raise TimeoutError("reference cloud: not connected")
            time.sleep(0.05)

    def topics(self, gate: str) -> dict[str, str]:
        return down_topics(self.site, gate)

    def command(self, gate: str, cmd: dict[str, Any]) -> str:
        """A command to one gate (or to every gate when ``gate`` is ``all``); the nonce."""
        topic = self.topics(gate)["all_cmd" if gate == "all" else "cmd"]
        return self.send(topic, cmd)

    def wait_ack(self, nonce: str, timeout_s: float = 10.0) -> dict[str, Any]:
        self.wait(lambda c: nonce in c.acks, timeout_s, "the command's ack")
        with self._cv:
            return self.acks[nonce]

    def tickets_delta(
        self,
        from_version: int,
        to_version: int,
        upserts: Sequence[dict[str, Any]] = (),
        deletes: Sequence[str] = (),
        *,
        kind: str = "tickets",
    ) -> str:
        body = {
            "op": "delta",
            "kind": kind,
            "from_version": from_version,
            "to_version": to_version,
            "upserts": list(upserts),
            "deletes": list(deletes),
        }
        return self.send(self.topics("all")["tickets"], body)

    def snapshot(
        self,
        version: int,
        tickets: Iterable[dict[str, Any]],
        *,
        products: Sequence[dict[str, Any]] | None = None,
        products_version: int | None = None,
        chunk: int = 5000,
        pause_s: float = 0.0,
    ) -> int:
        """Send a ticket snapshot in chunks; returns the number of chunks."""
        records = list(tickets)
        count = max(1, -(-len(records) // chunk))
        snap = uuid.uuid4().hex
        for index in range(count):
            body: dict[str, Any] = {
                "op": "snapshot",
                "snapshot": snap,
                "version": version,
                "index": index,
                "count": count,
                "tickets": records[index * chunk : (index + 1) * chunk],
            }
            if index == 0 and products is not None:
                body["products"] = list(products)
                body["products_version"] = products_version
            self.send(self.topics("all")["tickets"], body)
            if pause_s:
                time.sleep(pause_s)
        return count

    def blocklist_delta(
        self,
        from_version: int,
        to_version: int,
        upserts: Sequence[dict[str, Any]] = (),
        deletes: Sequence[dict[str, Any]] = (),
    ) -> str:
        body = {
            "op": "delta",
            "from_version": from_version,
            "to_version": to_version,
            "upserts": list(upserts),
            "deletes": list(deletes),
        }
        return self.send(self.topics("all")["blocklist"], body)

    def issuer_keys(
        self, version: int, keys: Sequence[dict[str, Any]], *, ttl_s: float = 6 * 86400
    ) -> str:
        """Publish the issuer keys for signed tickets (retained, as gates expect).

        A retained message is handed to every gate that connects until it expires, so it is
        signed for days (under the gates' 7-day max_lifetime_s), not for minutes; re-publish
        it before then."""
        topic = self.topics("all")["keys"]
        nonce = secrets.token_urlsafe(18)
        payload = sign_message(
            topic, {"version": version, "keys": list(keys)}, self.seed, ttl_s=ttl_s, nonce=nonce
        )
        self.publish_raw(topic, payload, retain=True)
        return nonce
