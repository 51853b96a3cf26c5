"""``make demo``: a simulated gate plays a short day at the park and says what each lane did.

It starts a local Mosquitto and the site's reference cloud, the simulated gt-io4 board (Modbus
TCP on 127.0.0.1:15020) and the real daemon with ``config/demo.toml`` plus this run's readers
(a QR scanner on L1 and an ID-card (SAM) reader on L2, both simulated on ptys), a ticket issuer
key made with ``gatectl token keygen`` and a ``[cloud]`` section that trusts this run's cloud
key. Visitors scan codes and lay cards on the readers, technicians use ``gatectl``, the cloud
sends tickets and signed commands, and people walk through the simulated board's beams. Only
synthetic identities; no ID number is shown.

With cloud sync on, the gate deletes an event from its outbox once the broker has it, so the
demo looks for each event in both places: the gate's outbox and what the cloud has received.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.cloud.mqtt import LinkSettings
from agent.cloud.reference import GateLog, ReferenceCloud
from agent.cloud.signing import sign_message
from agent.config import ConfigError, ModbusTcpBusConfig, load_config
from agent.localbroker import LocalBroker
from agent.testbed import Testbed, cloud_toml, wait_for
from drivers.sim.client import SimClient
from drivers.sim.sam import SamReaderThread, synthetic_card, synthetic_id_number
from drivers.sim.scanner import SimScanner
from verify.token import PREFIX, b45decode, public_key_for, wrap

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "demo.toml"
ISSUER = "demo-park"
E_TICKET = "ET-2026-0001"
# What a decision at a lane leaves in the event store.
DECISIONS = ("unlocked", "denied", "unlock_refused")
CLOUD_TICKET = {"id": "c-501", "code": "CLOUD-2026-000501"}
# The tour group that walks through while the broker is down: per lane, and how fast. At the
# demo's 100 Hz poll each beam state lasts 2.5 polls, enough to be seen on a loaded machine.
GROUP_PER_LANE = 100
CROWD_STEP_S = 0.025

WHAT = {
    "denied": "REFUSED",
    "unlocked": "unlocked",
    "unlock_refused": "REFUSED",
    "passage": "passage counted",
    "not_passed": "relocked, nobody passed, entry given back",
    "free_passage": "free passage",
    "tailgating": "ALARM tailgating",
    "forced_passage": "ALARM forced passage",
    "obstruction": "ALARM obstruction, flaps reopened",
    "obstruction_cleared": "cleared, closing",
    "loitering": "ALARM loitering",
    "emergency_open": "EMERGENCY OPEN",
    "emergency_reset": "emergency reset",
    "link_lost": "FAULT: link to the board lost",
    "link_restored": "link restored: fail state first, then normal service",
    "held_open": "held open (maintenance)",
    "hold_released": "hold released",
    "locked_out": "locked out (maintenance)",
    "lockout_released": "lockout released",
}


def describe(kind: str, data: dict[str, Any]) -> str:
    """One lane event in a few words: what happened and why."""
    text = WHAT.get(kind, kind)
    extra = [str(data["reason"])] if data.get("reason") else []
    if kind == "passage" and data.get("ticket_id"):
        extra.append(str(data["ticket_id"]))  # which ticket the entry was counted on
    if data.get("direction") == "exit":
        extra.append("exit")
    return text + (f" ({', '.join(extra)})" if extra else "")


@dataclass(frozen=True)
class Seen:
    """One of the gate's events, wherever it is now: in its outbox or at the cloud."""

    seq: int
    kind: str
    lane: str | None
    data: dict[str, Any]


class Scene:
    """Numbered steps: what people do, then one line of what the gate did."""

    def __init__(self, tb: Testbed, cloud: ReferenceCloud, gate: str) -> None:
        self.tb = tb
        self.cloud = cloud
        self.gate = gate
        self.seq = self.last_seq()
        self.n = 0
        self.notes: list[str] = []

    def last_seq(self) -> int:
        """The newest seq the gate has written."""
        return int(self.tb.status()["cache"]["outbox"]["last_seq"])

    def sync(self) -> dict[str, Any]:
        """What ``gatectl sync status`` shows: the link, the outbox, versions, counters."""
        sync: dict[str, Any] = self.tb.ctl({"cmd": "sync_status"})["sync"]
        return sync

    def events(self, after: int) -> list[Seen]:
        """The gate's events after seq ``after``: still in its outbox, or already at the cloud."""
        # The outbox first: an event sent between the two reads is acked by the broker before
        # the cloud holds it, so it may be missing from both for a moment; callers wait.
        held = {
            e.seq: Seen(e.seq, e.kind, e.lane, e.data) for e in self.tb.events() if e.seq > after
        }
        for e in self.cloud.events(self.gate):
            if e["seq"] > after:
                held.setdefault(e["seq"], Seen(e["seq"], e["kind"], e["lane"], e["data"]))
        return [held[seq] for seq in sorted(held)]

    def news(self) -> list[Seen]:
        """Every event written since the last look, in order, none missing."""
        top = self.last_seq()
        wanted = set(range(self.seq + 1, top + 1))

        def complete() -> list[Seen] | None:
            seen = self.events(self.seq)
            return seen if wanted <= {e.seq for e in seen} else None

        news: list[Seen] = (
            wait_for(complete, 10, f"events up to seq {top}", poll_s=0.05) if wanted else []
        )
        self.seq = max([top, *(e.seq for e in news)])
        return news

    def section(self, title: str) -> None:
        print(f"\n{title}")

    def step(
        self, title: str, action: Callable[[], object], settle_s: float = 0.6, board: bool = False
    ) -> None:
        self.n += 1
        print(f"{self.n:3}. {title}", flush=True)
        self.notes = []
        action()
        time.sleep(settle_s)
        print(f"     → {self.outcome(board)}", flush=True)

    def outcome(self, board: bool) -> str:
        by_lane: dict[str, list[str]] = {}
        refused: list[str] = []
        for ev in self.news():
            if ev.kind == "audit":
                if not ev.data.get("ok"):
                    refused.append(str(ev.data.get("error")))
            elif ev.lane is not None:
                by_lane.setdefault(ev.lane, []).append(describe(ev.kind, ev.data))
        # Lanes that did the same thing (an emergency, a link cut) share one entry.
        merged: dict[str, list[str]] = {}
        for lane, texts in by_lane.items():
            merged.setdefault("; ".join(runs(texts)), []).append(lane)
        parts = [f"{'+'.join(lanes)} {texts}" for texts, lanes in merged.items()]
        shown = " ".join(parts)
        parts += [f"gatectl refused ({r})" for r in refused if r not in shown]
        parts += self.notes
        if board:
            parts.append("board: " + self.board())
        return " · ".join(parts) or "nothing happened"

    def board(self) -> str:
        lanes = self.tb.sim.state(1)["lanes"]
        shown = []
        for ch, lane in sorted(lanes.items()):
            o = lane["outputs"]
            flap = "OPEN" if o["unlock_entry"] or o["unlock_exit"] else "closed"
            shown.append(f"L{ch} {flap}{' +alarm' if o['alarm'] else ''}")
        return ", ".join(shown)

    def gatectl(self, *args: str) -> Callable[[], None]:
        def run() -> None:
            r = self.tb.gatectl(*args)
            if r.returncode not in (0, 1):
                raise RuntimeError(r.stderr)

        return run

    def decision(self, lane: str, since: int, expect: str) -> dict[str, Any]:
        """Wait for the lane to decide a credential read after event ``since``; note its screen."""
        wait_for(
            lambda: any(e.lane == lane and e.kind in DECISIONS for e in self.events(since)),
            5,
            f"{lane} to decide",
            poll_s=0.05,
        )
        last: dict[str, Any] = self.tb.status()["last_decisions"][lane]
        if last["reason"] != expect:
            raise RuntimeError(f"{lane} decided {last['reason']}, the demo expected {expect}")
        self.notes.append(f"screen: {last['prompt_zh']} / {last['prompt_en']}")
        return last

    def wait_passage(self, since: int) -> Seen:
        """The passage counted after event ``since``."""
        found: list[Seen] = wait_for(
            lambda: [e for e in self.events(since) if e.kind == "passage"],
            5,
            "the passage to be counted",
            poll_s=0.05,
        )
        return found[0]

    def counts(self, kind: str) -> int:
        """How many ``kind`` events the lanes have counted since the daemon started."""
        return sum(lane["counts"].get(kind, 0) for lane in self.tb.status()["lanes"])


def runs(texts: list[str]) -> list[str]:
    """Repeats shown once with a count: 100 free passages are one entry, not a hundred."""
    out: list[tuple[str, int]] = []
    for text in texts:
        if out and out[-1][0] == text:
            out[-1] = (text, out[-1][1] + 1)
        else:
            out.append((text, 1))
    return [f"{text} ×{n}" if n > 1 else text for text, n in out]


def demo_tickets(now: float) -> list[dict[str, object]]:
    """What a site would import before its cloud is connected: products and tickets."""
    day = 86400
    valid = {"product_id": "day", "valid_from": now - day, "valid_to": now + day}
    return [
        {"type": "product", "id": "day", "name": "Day ticket", "zones": {"park": 1}},
        {"type": "ticket", "id": "t-123", "code": "OTA-2026-000123", "channel": "ota", **valid},
        {"type": "ticket", "id": "t-124", "code": "OTA-2026-000124", "channel": "ota", **valid},
        {
            "type": "ticket",
            "id": "t-007",
            "code": "WIN-2026-000007",
            "channel": "window",
            "product_id": "day",
            "valid_from": now - 3 * day,
            "valid_to": now - day,
        },
        {
            "type": "ticket",
            "id": "t-4242",
            "code": "MINI-2026-004242",
            "channel": "miniapp",
            "status": "refunded",
            **valid,
        },
        # Real-name tickets: the holder's ID number is hashed with the site key on import.
        {
            "type": "ticket",
            "id": "rn-1",
            "code": "RN-2026-000001",
            "channel": "miniapp",
            "holder_id": synthetic_id_number(seq=1),
            **valid,
        },
        {
            "type": "ticket",
            "id": "rn-2",
            "code": "RN-2026-000002",
            "channel": "miniapp",
            "holder_id": synthetic_id_number(seq=2),
            **valid,
        },
    ]


def with_readers(base: str, readers: dict[str, dict[str, Any]], extra: str) -> str:
    """``base`` (config/demo.toml) with a reader added to lanes and ``extra`` tables appended."""
    text = base
    for lane, reader in readers.items():
        fields = ", ".join(f"{k} = {json.dumps(v)}" for k, v in reader.items())
        text, n = re.subn(
            rf'^id = "{lane}"$', f'id = "{lane}"\nreaders = [{{{fields}}}]', text, flags=re.M
        )
        if n != 1:
            raise RuntimeError(f"{CONFIG}: expected one lane {lane}, found {n}")
    return text.rstrip() + "\n\n" + extra


def token_cli(*args: str) -> str:
    """Run ``gatectl token ...`` as an installer would; its output."""
    r = subprocess.run(
        [sys.executable, "-m", "agent.gatectl", "token", *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"gatectl token {args[0]}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def tampered(code: str, old: str, new: str) -> str:
    """A signed ticket with its ticket id edited after signing, as a forger would."""
    cose = zlib.decompress(b45decode(code[len(PREFIX) :]))
    if cose.count(old.encode()) != 1 or len(old) != len(new):
        raise RuntimeError("cannot find the ticket id in the signed ticket")
    return wrap(cose.replace(old.encode(), new.encode()))


def short(code: str) -> str:
    return f"{code[:14]}… ({len(code)} characters)"


def cloud_scenes(s: Scene, broker: LocalBroker, scan: Callable[..., Callable[[], None]]) -> None:
    """Tickets and commands from the cloud, a forgery, and the broker unplugged and back."""
    tb, cloud, gate, sim = s.tb, s.cloud, s.gate, s.tb.sim
    s.section("Cloud sync (the site cloud reaches the gate through the local Mosquitto)")

    tickets_v = int(s.sync()["versions"]["tickets"])

    def delta() -> None:
        now = time.time()
        ticket = {
            **CLOUD_TICKET,
            "product_id": "day",
            "valid_from": now - 60,
            "valid_to": now + 86400,
        }
        cloud.tickets_delta(tickets_v, tickets_v + 1, [ticket])
        wait_for(lambda: s.sync()["versions"]["tickets"] == tickets_v + 1, 10, "the delta applied")
        s.notes.append(f"gate's tickets v{tickets_v} → v{tickets_v + 1} (signed delta applied)")

    s.step(
        f"A ticket sold online: the cloud sends it as a signed delta ({CLOUD_TICKET['code']})",
        delta,
        settle_s=0.2,
    )

    def visitor() -> None:
        since = s.last_seq()
        scan(CLOUD_TICKET["code"], "ok", walk=True)()
        seq = s.wait_passage(since).seq
        cloud.wait(lambda c: seq in c.gates.get(gate, GateLog()).events, 10, f"seq {seq}")
        log = cloud.gates[gate]
        ok, detail = log.check()
        if not ok:
            raise RuntimeError(f"the cloud's copy of the event chain is broken: {detail}")
        s.notes.append(f"cloud got it as seq {seq}, chain {min(log.events)}..{seq} verifies")

    s.step(f'A visitor scans QR "{CLOUD_TICKET["code"]}" at L1 and walks through', visitor, 0.2)

    def wheelchair() -> None:
        ack = cloud.wait_ack(cloud.command(gate, {"cmd": "open", "lane": "L2"}))
        if not ack["ok"]:
            raise RuntimeError(f"the gate refused the cloud's command: {ack.get('error')}")
        s.notes.append("cloud: ack ok")
        since = s.last_seq()
        sim.walk(2, "entry")
        s.wait_passage(since)
        tb.wait_modes("locked")

    s.step(
        "The ticket office asks the cloud to open L2 for a wheelchair user (signed command)",
        wheelchair,
        settle_s=0.2,
    )

    def forged() -> None:
        topic = cloud.topics(gate)["cmd"]
        body = {"cmd": "hold_open", "lane": "*", "on": True}
        tb.wait_modes("locked")
        before = sum(s.sync()["downlink_rejected"].values())
        cloud.publish_raw(topic, sign_message(topic, body, os.urandom(32)))
        wait_for(lambda: sum(s.sync()["downlink_rejected"].values()) > before, 10, "the refusal")
        if set(tb.modes().values()) != {"locked"}:
            raise RuntimeError(f"a forged command changed the lanes: {tb.modes()}")
        refused = ", ".join(f"{k} {n}" for k, n in s.sync()["downlink_rejected"].items())
        s.notes.append(f"gate refused it (sync status: downlink_rejected {refused})")

    s.step(
        "Someone on the network sends 'hold every lane open', signed with a key of their own",
        forged,
        settle_s=0.3,
        board=True,
    )

    s.step(
        f"A tour group of {2 * GROUP_PER_LANE} arrives: a technician holds L1 and L2 open"
        " (gatectl hold-open)",
        lambda: (s.gatectl("hold-open", "L1", "on")(), s.gatectl("hold-open", "L2", "on")()),
        settle_s=0.3,
    )
    wait_for(lambda: s.sync()["outbox_depth"] == 0, 10, "the outbox to drain")
    plugged_at = s.last_seq()
    counted = s.counts("free_passage")

    def unplug() -> None:
        broker.stop()
        sync = wait_for(lambda: (st := s.sync()) and not st["connected"] and st, 10, "offline")
        s.notes.append(f"gate offline: sync not connected, outbox {sync['outbox_depth']} unsent")

    # A clean stop (SIGTERM): Mosquitto saves the cloud's session and the messages queued for it.
    s.step("Pull the plug: the broker shuts down", unplug, settle_s=0.2)

    def group() -> None:
        def walk(channel: int) -> None:
            with SimClient(str(tb.sim_socket)) as client:
                client.crowd(channel, GROUP_PER_LANE, step_s=CROWD_STEP_S, gap_s=CROWD_STEP_S)

        walkers = [threading.Thread(target=walk, args=(ch,)) for ch in (1, 2)]
        depths = [s.sync()["outbox_depth"]]
        for w in walkers:
            w.start()
        while any(w.is_alive() for w in walkers):
            time.sleep(2.0)
            depths.append(s.sync()["outbox_depth"])
        for w in walkers:
            w.join()
        passed = settled(lambda: s.counts("free_passage") - counted)
        wait_for(lambda: s.last_seq() - plugged_at >= passed, 5, "every passage written")
        depths.append(s.sync()["outbox_depth"])
        growth = [str(d) for i, d in enumerate(depths) if i == 0 or d != depths[i - 1]]
        s.notes.append(
            f"{passed} of {2 * GROUP_PER_LANE} counted; sync status: outbox "
            + " → ".join(growth)
            + " unsent"
        )
        s.gatectl("hold-open", "L1", "off")()
        s.gatectl("hold-open", "L2", "off")()

    s.step(
        "The group walks through while the gate is offline; then the holds are released",
        group,
        settle_s=0.3,
    )

    def plug_in() -> None:
        depth = s.sync()["outbox_depth"]
        started = time.monotonic()
        broker.start()
        last = wait_drained(s)
        took = time.monotonic() - started
        cloud.wait(lambda c: max(c.gates[gate].events, default=0) >= last, 30, f"seq {last}")
        log = cloud.gates[gate]
        ok, detail = log.check()  # gap-free, every hash recomputed, no seq with two ids
        top = max(log.events)
        if not (ok and min(log.events) == 1 and len(log.events) == top >= last):
            raise RuntimeError(f"the cloud's copy is not every event exactly once: {detail}")
        at_cloud = sum(1 for e in cloud.events(gate, "free_passage") if e["seq"] > plugged_at)
        at_lanes = s.counts("free_passage") - counted
        if at_cloud != at_lanes:
            raise RuntimeError(f"{at_lanes} passages counted, {at_cloud} at the cloud")
        again = f", {log.duplicates} resent copies recognised by id" if log.duplicates else ""
        s.notes += [
            f"outbox {depth} → 0 in {took:.1f} s",
            f"cloud holds seq 1..{top}, each once{again}, chain intact",
            f"free passages: {at_cloud} at the cloud = {at_lanes} counted by the lanes",
        ]

    s.step("The broker is back", plug_in, settle_s=0.2)


def settled(read: Callable[[], int], quiet_s: float = 1.0, timeout_s: float = 10.0) -> int:
    """A number once it has stopped changing for ``quiet_s``."""
    value, since = read(), time.monotonic()
    deadline = since + timeout_s
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
    return value


def wait_drained(s: Scene, timeout_s: float = 60.0) -> int:
    """Wait until the broker has acknowledged every event (outbox empty); the last seq."""
    sync: dict[str, Any] = wait_for(
        lambda: (
            (st := s.sync())["outbox_depth"] == 0 and st["uplink"]["inflight_messages"] == 0 and st
        ),
        timeout_s,
        "the outbox to drain",
        poll_s=0.05,
    )
    return int(sync["uplink"]["acked_upto"])


def play(
    s: Scene, broker: LocalBroker, scanner: SimScanner, sam: SamReaderThread, issuer_seed: Path
) -> None:
    tb, sim = s.tb, s.tb.sim

    def scan(code: str, expect: str, walk: bool = False) -> Callable[[], None]:
        def run() -> None:
            since = s.last_seq()
            scanner.scan(code)
            s.decision("L1", since, expect)
            if walk:
                sim.walk(1, "entry")
                s.wait_passage(since)

        return run

    def card(seq: int, expect: str, expired: bool = False, walk: bool = False) -> None:
        since = s.last_seq()
        sam.put_card(synthetic_card(seq=seq, expired=expired))
        s.decision("L2", since, expect)
        if walk:
            sim.walk(2, "entry")
            s.wait_passage(since)
        # The visitor takes the card back (left on, the reader would read it again later).
        sam.remove_card()

    s.section("Tickets and readers (visitors scan at L1's QR scanner, lay ID cards on L2's reader)")
    tickets = tb.dir / "tickets.jsonl"
    tickets.write_text("\n".join(json.dumps(r) for r in demo_tickets(time.time())) + "\n")

    def load() -> None:
        s.notes.append(tb.gatectl("cache", "import", str(tickets)).stdout.strip())
        # The file holds (synthetic) ID numbers; the cache keeps only their keyed hashes.
        tickets.unlink()

    s.step("The installer loads tickets without a cloud (gatectl cache import)", load)
    s.step(
        'A visitor scans QR "OTA-2026-000123" at L1 and walks through',
        scan("OTA-2026-000123", "ok", walk=True),
    )
    s.step("The same QR code is scanned again at L1", scan("OTA-2026-000123", "zone_used_up"))
    s.step('An expired ticket, QR "WIN-2026-000007"', scan("WIN-2026-000007", "expired"))
    s.step('A refunded ticket, QR "MINI-2026-004242"', scan("MINI-2026-004242", "refunded"))
    s.step('A code the gate has never seen, "NOT-A-TICKET"', scan("NOT-A-TICKET", "unknown"))

    now = int(time.time())
    e_ticket = token_cli(
        "mint",
        "--key",
        str(issuer_seed),
        "--issuer",
        ISSUER,
        "--ticket",
        E_TICKET,
        "--product",
        "web-day",
        "--zone",
        "park=1",
        "--valid-from",
        str(now - 60),
        "--valid-to",
        str(now + 86400),
        "--channel",
        "web",
    ).strip()
    s.n += 1
    print(
        f"{s.n:3}. The web shop sells an e-ticket"
        f" (gatectl token mint --key issuer.seed --ticket {E_TICKET} ...)"
    )
    print(f"     → {short(e_ticket)}; gatectl token inspect --keys trusted.toml says:")
    inspect = token_cli("inspect", e_ticket, "--keys", str(tb.dir / "trusted.toml"))
    for line in inspect.splitlines():
        if line.split()[:1] in (["verdict"], ["claims:"], ["iss"], ["cti"], ["zones"], ["exp"]):
            print(f"       | {line.rstrip()}")
    tickets_known = tb.status()["cache"]["tickets"]
    s.step(
        f"The visitor scans the e-ticket at L1 (not among the cache's {tickets_known} tickets)"
        " and walks through",
        scan(e_ticket, "ok", walk=True),
    )
    forged = tampered(e_ticket, E_TICKET, E_TICKET[:-1] + "2")
    s.step(
        f"A copy with the ticket id edited to {E_TICKET[:-1]}2 after signing",
        scan(forged, "bad_signature"),
    )
    s.step(
        "A visitor lays ID card #1 (real-name ticket) on L2's reader and walks through",
        lambda: card(1, "ok", walk=True),
    )
    s.step(
        "ID card #2 (has a real-name ticket, but the card expired) on L2's reader",
        lambda: card(2, "card_invalid", expired=True),
    )

    s.section("Passages, alarms and maintenance")

    def staff_entry() -> None:
        s.gatectl("open", "L1", "entry")()
        sim.walk(1, "entry")

    s.step("A technician lets a guest in through L1 (gatectl open L1 entry)", staff_entry)

    def leaving() -> None:
        s.gatectl("open", "L2", "exit")()
        sim.walk(2, "exit")

    s.step("A visitor leaves through L2 (gatectl open L2 exit)", leaving)
    s.step(
        "A visitor is let in at L2 but turns away (unlock timeout 4 s)",
        s.gatectl("open", "L2", "entry"),
        settle_s=5.0,
    )

    def tailgate() -> None:
        scan("OTA-2026-000124", "ok")()
        sim.tailgate(1, "entry")

    s.step('Two people squeeze through L1 on one ticket, QR "OTA-2026-000124"', tailgate, 2.0)
    s.step(
        "Someone jumps over the locked L2",
        lambda: sim.walk(2, "entry", wait_unlock=False),
        settle_s=2.0,
    )

    def child() -> None:
        s.gatectl("open", "L1", "entry")()
        sim.walk(1, "entry")
        sim.obstruction(1, True)
        time.sleep(1.0)
        sim.obstruction(1, False)

    s.step("A child steps into L1's flaps as they close behind a visitor", child, settle_s=1.0)
    s.step(
        "L2 is locked out for cleaning (gatectl lockout L2 on); a guest is let in there",
        lambda: (s.gatectl("lockout", "L2", "on")(), s.gatectl("open", "L2", "entry")()),
    )
    s.step("Cleaning done (gatectl lockout L2 off)", s.gatectl("lockout", "L2", "off"))

    cloud_scenes(s, broker, scan)

    s.section("Safety")
    s.step("Someone presses the EMERGENCY button", lambda: sim.emergency(True), board=True)
    s.step(
        "A technician tries to reset while the button is still pressed (gatectl emergency reset)",
        s.gatectl("emergency", "reset"),
        board=True,
    )
    s.step(
        "The button is released: the lanes stay open (latched)",
        lambda: sim.emergency(False),
        board=True,
    )
    s.step(
        "The technician resets the emergency (gatectl emergency reset)",
        s.gatectl("emergency", "reset"),
        board=True,
    )

    def cut() -> None:
        sim.link("mute")
        wait_for(lambda: set(tb.modes().values()) == {"fault"}, 3, "fault")

    s.step(
        "The link to the board is cut (the board's watchdog: L1 fails open, L2 locked)",
        cut,
        settle_s=1.5,
        board=True,
    )

    def back() -> None:
        sim.link("up")
        tb.wait_modes("locked", timeout_s=5)

    s.step("The link comes back", back, settle_s=0.3, board=True)


def secret(path: Path) -> bytes:
    """32 random bytes in a new file only its owner can read."""
    value = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(value)
    return value


def prepare(
    workdir: Path, scanner: SimScanner, sam: SamReaderThread, broker: LocalBroker, cloud_seed: bytes
) -> Path:
    """This run's config, site key and issuer key; returns the issuer's private seed file."""
    site_key = workdir / "site.key"
    secret(site_key)
    issuer_seed = workdir / "issuer.seed"
    public = token_cli("keygen", "--out", str(issuer_seed)).split()[1]
    (workdir / "trusted.toml").write_text(
        f'[[keys]]\nissuer = "{ISSUER}"\npublic_key = "{public}"\n'
    )
    cloud_public = public_key_for(cloud_seed).hex()
    extra = (
        f"[admission]\nholder_key_file = {json.dumps(str(site_key))}\n\n"
        f'[[trusted_keys]]\nissuer = "{ISSUER}"\npublic_key = "{public}"\n\n'
        + cloud_toml(broker.host, broker.port, cloud_public)
    )
    readers: dict[str, dict[str, Any]] = {
        "L1": {"type": "qr-serial", "port": scanner.path, "debounce_s": 0.5},
        "L2": {"type": "idcard", "port": sam.path},
    }
    (workdir / "gate.toml").write_text(with_readers(CONFIG.read_text(), readers, extra))
    print("readers added to the lanes: L1 a QR scanner, L2 an ID-card (SAM) reader, both on ptys")
    print(f"site key for ID numbers: {site_key.name} (32 random bytes, mode 0600)")
    print(f"ticket issuer key (gatectl token keygen): public {public[:16]}…, in [[trusted_keys]]")
    print(
        f"[cloud]: broker {broker.host}:{broker.port}, trust anchor = the site cloud's key"
        f" {cloud_public[:16]}…"
    )
    return issuer_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gate-agent demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the logs and event store")
    args = parser.parse_args(argv)
    demo = load_config(CONFIG).config
    bus = demo.buses[0]
    assert isinstance(bus, ModbusTcpBusConfig), "config/demo.toml: the demo board is on TCP"
    port = bus.port
    workdir = Path(tempfile.mkdtemp(prefix="gate-demo-"))
    started = time.monotonic()
    print(f"gate-agent demo: simulated board on 127.0.0.1:{port}, daemon with config/{CONFIG.name}")
    print(f"work folder (this run's config, keys, logs, event store): {workdir}")
    # The broker's and the cloud's own log lines (a lost link is expected here) go to a file.
    logging.basicConfig(
        filename=workdir / "demo.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    scanner = SimScanner(workdir / "scanner-L1")
    sam = SamReaderThread(workdir / "sam-L2")
    try:
        # The cloud's signing key is this run's: the gate trusts it and nothing else.
        cloud_seed = secret(workdir / "cloud.seed")
        with LocalBroker(workdir / "broker") as broker:
            link = LinkSettings(broker.host, broker.port, "demo-cloud", reconnect_max_s=1.0)
            with ReferenceCloud(link, demo.site.id, cloud_seed) as cloud:
                print(
                    f"a local Mosquitto (pid {broker.pid}) listens on {broker.host}:{broker.port};"
                    f" the site cloud of {demo.site.id} is connected to it"
                )
                issuer_seed = prepare(workdir, scanner, sam, broker, cloud_seed)
                config = workdir / "gate.toml"
                load_config(config)  # a mistake in what the demo added is named here, key by key
                with Testbed(workdir, config_file=config, tcp_port=port) as tb:
                    run(tb, cloud, broker, scanner, sam, issuer_seed)
    except ConfigError as exc:
        print(f"\ndemo failed: {exc}\n" + "\n".join(exc.errors), file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"\ndemo failed: {exc}\nsee the logs in {workdir}", file=sys.stderr)
        return 1
    finally:
        sam.close()
        scanner.close()
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\ndemo finished in {time.monotonic() - started:.0f} s: every lane was driven over"
        " Modbus by the real daemon, every credential read by its reader, every event"
        " delivered to the cloud."
    )
    return 0


def run(
    tb: Testbed,
    cloud: ReferenceCloud,
    broker: LocalBroker,
    scanner: SimScanner,
    sam: SamReaderThread,
    issuer_seed: Path,
) -> None:
    """Start the board and the daemon, play the scenes, show where every event ended up."""
    tb.start_sim()
    tb.start_daemon()
    gate = str(tb.status()["gate"])
    wait_for(lambda: all(r["connected"] for r in tb.status()["readers"]), 10, "the readers")
    s = Scene(tb, cloud, gate)
    wait_for(lambda: s.sync()["connected"], 15, "the gate to connect to the broker")
    print("\nLanes are up:")
    print(tb.gatectl("status").stdout.rstrip())
    readers = tb.status()["readers"]
    print("readers: " + ", ".join(f"{r['reader']} connected" for r in readers))
    print(f"cloud sync: {gate} connected to {s.sync()['broker']}")
    play(s, broker, scanner, sam, issuer_seed)
    print("\nFinal status (gatectl status):")
    print(tb.gatectl("status").stdout.rstrip())
    last = wait_drained(s)
    cloud.wait(lambda c: max(c.gates[gate].events, default=0) >= last, 30, f"seq {last}")
    _, detail = cloud.gates[gate].check()
    counts: dict[str, int] = {}
    for e in cloud.events(gate):
        counts[e["kind"]] = counts.get(e["kind"], 0) + 1
    print(f"\nThe cloud holds every event of {gate} ({detail}), the gate's outbox is empty:")
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    sys.exit(main())
