"""``gatectl``: the technicians' maintenance CLI, talking to the daemon's control socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.control import DaemonNotRunning, request

DEFAULT_SOCKET = Path("/run/gate-agent/control.sock")
EXIT_REFUSED = 1
EXIT_NOT_RUNNING = 3


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    if args.config:
        from agent.config import ConfigError, load_config

        try:
            return load_config(args.config).config.daemon.control_socket
        except ConfigError as exc:
            sys.exit(f"gatectl: {exc.path}: {exc.errors[0]}")
    env = os.environ.get("GATECTL_SOCKET")
    return Path(env) if env else DEFAULT_SOCKET


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError("expected on or off")
    return text == "on"


def _yes(flag: bool) -> str:
    return "on" if flag else "-"


def print_status(st: dict[str, Any]) -> None:
    """Human-readable status for a technician at the controller."""
    em = st["emergency"]
    print(
        f"gate {st['site']}/{st['gate']}  version {st['version']}  pid {st['pid']}  "
        f"up {st['uptime_s']} s"
    )
    if em["latched"]:
        active = ", ".join(em["active_inputs"]) or "none (reset allowed)"
        print(f"EMERGENCY OPEN (latched by {em['tripped_by']}; inputs active: {active})")
    else:
        print("emergency: not latched")
    print(
        f"{'lane':<8}{'mode':<16}{'dir':<7}{'entry':<7}{'exit':<7}{'alarm':<7}"
        f"{'beams':<7}{'obstr':<7}{'fail':<8}maintenance"
    )
    for lane in st["lanes"]:
        o, s = lane["outputs"], lane["sensors"]
        beams = ("E" if s["entry_side"] else ".") + ("X" if s["exit_side"] else ".")
        print(
            f"{lane['lane']:<8}{lane['mode']:<16}{lane['direction'] or '-':<7}"
            f"{_yes(o['unlock_entry']):<7}{_yes(o['unlock_exit']):<7}{_yes(o['alarm']):<7}"
            f"{beams:<7}{_yes(s['obstruction']):<7}{lane['fail_state']:<8}"
            f"{lane['maintenance']}"
        )
    for bus in st["buses"]:
        for name, b in bus["boards"].items():
            link = "up" if b["link_up"] else "DOWN"
            faults = ", ".join(f"{k} {v}" for k, v in b["faults"].items()) or "no faults"
            print(
                f"bus {bus['bus']} board {name} (unit {b['unit_id']}): link {link}, "
                f"{b['outages']} outage(s), {faults}"
            )
    ev = st["events"]
    print(f"events: {ev['written']} written, {ev['queued']} queued, {ev['failed']} failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatectl", description=__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--socket", help=f"control socket (default $GATECTL_SOCKET or {DEFAULT_SOCKET})"
    )
    where.add_argument("--config", help="read the socket path from this configuration file")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="lanes, emergency latch, buses")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    op = sub.add_parser("open", help="open one lane once in one direction (an authorised passage)")
    op.add_argument("lane")
    op.add_argument("direction", choices=["entry", "exit"])
    em = sub.add_parser("emergency", help="open every lane (on) or release the latch (reset)")
    em.add_argument("action", choices=["on", "reset"])
    for name, what in (
        ("hold-open", "keep a lane open"),
        ("lockout", "take a lane out of service"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("lane")
        p.add_argument("state", type=_on_off, metavar="on|off")
    args = parser.parse_args(argv)

    req: dict[str, Any]
    if args.command == "status":
        req = {"cmd": "status"}
    elif args.command == "open":
        req = {"cmd": "open", "lane": args.lane, "direction": args.direction}
    elif args.command == "emergency":
        req = {"cmd": "emergency", "action": args.action}
    else:
        req = {"cmd": args.command.replace("-", "_"), "lane": args.lane, "on": args.state}

    path = _socket_path(args)
    try:
        reply = request(path, req)
    except DaemonNotRunning:
        print(f"gatectl: gate-agent is not running (no answer on {path})", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except PermissionError:
        print(
            f"gatectl: permission denied on {path} (are you in the technicians' group?)",
            file=sys.stderr,
        )
        return EXIT_NOT_RUNNING
    except TimeoutError:
        print(f"gatectl: gate-agent did not answer on {path} in time", file=sys.stderr)
        return EXIT_NOT_RUNNING
    if args.command == "status":
        if args.json:
            print(json.dumps(reply, indent=2))
        else:
            print_status(reply)
        return 0
    if reply.get("ok"):
        print("ok")
        return 0
    print(f"refused: {reply.get('error')}: {reply.get('message', '')}", file=sys.stderr)
    return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
