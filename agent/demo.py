"""``make demo``: a simulated gate plays a short day at the park and says what each lane did.

It starts the simulated gt-io4 board (Modbus TCP on 127.0.0.1:15020) and the real daemon
with ``config/demo.toml``, then drives both the way a visitor and a technician would:
``gatectl`` commands to the daemon, people walking through the simulated board's beams.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.testbed import Testbed, wait_for

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "demo.toml"

WHAT = {
    "denied": "REFUSED",
    "unlocked": "unlocked",
    "unlock_refused": "REFUSED",
    "passage": "passage counted",
    "not_passed": "relocked, nobody passed (entry given back)",
    "free_passage": "free passage",
    "tailgating": "ALARM tailgating",
    "forced_passage": "ALARM forced passage",
    "obstruction": "ALARM obstruction: stopped closing, reopened",
    "obstruction_cleared": "obstruction cleared, closing",
    "loitering": "ALARM loitering",
    "emergency_open": "EMERGENCY OPEN",
    "emergency_reset": "emergency reset",
    "link_lost": "FAULT: link to the board lost",
    "link_restored": "link restored: fail state commanded, then normal service",
    "held_open": "held open (maintenance)",
    "hold_released": "hold released",
    "locked_out": "locked out (maintenance)",
    "lockout_released": "lockout released",
}


def command_line(audit: dict[str, Any]) -> str:
    """The gatectl command line an audit event records."""
    args = audit.get("args", {})
    words = [
        audit["cmd"].replace("_", "-"),
        args.get("lane"),
        args.get("direction"),
        args.get("action"),
    ]
    if "on" in args:
        words.append("on" if args["on"] else "off")
    return " ".join(str(w) for w in words if w is not None)


class Scene:
    def __init__(self, tb: Testbed) -> None:
        self.tb = tb
        self.seq = max((e.seq for e in tb.events()), default=0)
        self.n = 0

    def step(self, title: str, action: Callable[[], object], settle_s: float = 0.6) -> None:
        self.n += 1
        print(f"\n{self.n}. {title}")
        action()
        time.sleep(settle_s)
        self.report()

    def report(self) -> None:
        for ev in self.tb.events():
            if ev.seq <= self.seq:
                continue
            self.seq = ev.seq
            if ev.kind == "audit" and ev.data.get("cmd") == "present":
                continue  # the scan itself is shown with the lane's screen
            if ev.kind == "audit":
                result = "ok" if ev.data.get("ok") else f"refused: {ev.data.get('error')}"
                print(f"   gatectl {command_line(ev.data)} (uid {ev.data['uid']}) -> {result}")
                continue
            if ev.lane is None:
                continue
            text = WHAT.get(ev.kind, ev.kind)
            extra = [ev.data[k] for k in ("direction", "reason") if k in ev.data]
            print(f"   lane {ev.lane}: {text}" + (f" ({', '.join(extra)})" if extra else ""))
        lanes = self.tb.sim.state(1)["lanes"]
        shown = []
        for ch, lane in sorted(lanes.items()):
            o = lane["outputs"]
            flap = "OPEN" if o["unlock_entry"] or o["unlock_exit"] else "closed"
            shown.append(f"L{ch} {flap}{' +alarm' if o['alarm'] else ''}")
        print(f"   board now: {', '.join(shown)}")

    def gatectl(self, *args: str) -> Callable[[], None]:
        def run() -> None:
            r = self.tb.gatectl(*args)
            if r.returncode not in (0, 1):
                raise RuntimeError(r.stderr)

        return run


def demo_tickets(now: float) -> list[dict[str, object]]:
    """What a site would import before its cloud is connected: products and tickets."""
    day = 86400
    return [
        {"type": "product", "id": "day", "name": "Day ticket", "zones": {"park": 1}},
        {
            "type": "ticket",
            "id": "t-123",
            "code": "OTA-2026-000123",
            "channel": "ota",
            "product_id": "day",
            "valid_from": now - day,
            "valid_to": now + day,
        },
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
            "product_id": "day",
            "valid_from": now - day,
            "valid_to": now + day,
            "status": "refunded",
        },
    ]


def play(tb: Testbed) -> None:
    sim = tb.sim
    s = Scene(tb)
    s.report()

    tickets = tb.dir / "tickets.jsonl"
    tickets.write_text("\n".join(json.dumps(r) for r in demo_tickets(time.time())) + "\n")
    s.step(
        "The installer loads tickets without a cloud (gatectl cache import)",
        lambda: print("   " + tb.gatectl("cache", "import", str(tickets)).stdout.strip()),
    )

    def scan(lane: str, code: str) -> None:
        reply = tb.ctl({"cmd": "present", "lane": lane, "code": code, "direction": "entry"})
        d = reply["decision"]
        print(f"   {lane} screen: {d['prompt_zh']} / {d['prompt_en']}  [{d['reason']}]")

    def ticket_entry() -> None:
        scan("L1", "OTA-2026-000123")
        sim.walk(1, "entry")

    s.step("A visitor scans a valid one-entry e-ticket at L1 and walks through", ticket_entry)
    s.step("The same ticket is scanned again at L2", lambda: scan("L2", "OTA-2026-000123"))
    s.step(
        "An expired ticket and a refunded one",
        lambda: (scan("L1", "WIN-2026-000007"), scan("L2", "MINI-2026-004242")),
    )
    s.step("A code the gate has never seen", lambda: scan("L1", "NOT-A-TICKET"))

    def staff_entry() -> None:
        s.gatectl("open", "L1", "entry")()
        sim.walk(1, "entry")

    s.step("A technician lets a guest in through L1 (gatectl open)", staff_entry)

    def leaving() -> None:
        s.gatectl("open", "L2", "exit")()
        sim.walk(2, "exit")

    s.step("A visitor leaves through L2", leaving)
    s.step(
        "A visitor is let in at L2 but turns away (unlock timeout 4 s)",
        s.gatectl("open", "L2", "entry"),
        settle_s=5.0,
    )

    def tailgate() -> None:
        s.gatectl("open", "L1", "entry")()
        sim.tailgate(1, "entry")

    s.step("Two people squeeze through L1 on one ticket", tailgate, settle_s=2.0)
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
        "The lane L2 is locked out for cleaning; a visitor is refused",
        lambda: (s.gatectl("lockout", "L2", "on")(), s.gatectl("open", "L2", "entry")()),
    )
    s.step("Cleaning done", s.gatectl("lockout", "L2", "off"))

    s.step("Someone presses the EMERGENCY button", lambda: sim.emergency(True))
    s.step(
        "A technician tries to reset while the button is still pressed",
        s.gatectl("emergency", "reset"),
    )
    s.step("The button is released: the lanes stay open (latched)", lambda: sim.emergency(False))
    s.step("The technician resets the emergency", s.gatectl("emergency", "reset"))

    def cut() -> None:
        sim.link("mute")
        wait_for(lambda: set(tb.modes().values()) == {"fault"}, 3, "fault")

    s.step(
        "The link to the board is cut (the board's watchdog takes over: L1 open, L2 locked)",
        cut,
        settle_s=1.5,
    )
    s.step(
        "The link comes back (L1 fails open, L2 fails locked)",
        lambda: (sim.link("up"), tb.wait_modes("locked", timeout_s=5)),
        settle_s=0.3,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gate-agent demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the logs and event store")
    args = parser.parse_args(argv)
    site = load_config(CONFIG)
    port = site.config.buses[0].port  # type: ignore[union-attr]
    workdir = Path(tempfile.mkdtemp(prefix="gate-demo-"))
    print(f"gate-agent demo: simulated board on 127.0.0.1:{port}, daemon with {CONFIG.name}")
    print(f"logs and event store in {workdir}")
    try:
        with Testbed(workdir, config_file=CONFIG, tcp_port=port) as tb:
            tb.start_sim()
            tb.start_daemon()
            print("\nLanes are up:")
            print(tb.gatectl("status").stdout.rstrip())
            play(tb)
            print("\nFinal status (gatectl status):")
            print(tb.gatectl("status").stdout.rstrip())
            counts: dict[str, int] = {}
            for ev in tb.events():
                counts[ev.kind] = counts.get(ev.kind, 0) + 1
            print("\nEvents stored: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    except Exception as exc:
        print(f"\ndemo failed: {exc}\nsee the logs in {workdir}", file=sys.stderr)
        return 1
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\ndemo finished: every lane was driven over Modbus by the real daemon.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
