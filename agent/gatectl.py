"""``gatectl``: the technicians' maintenance CLI, talking to the daemon's control socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent.cloud_tool import add_cloud_commands, run_cloud_command
from agent.control import MAX_LINE, DaemonNotRunning, request
from agent.token_tool import add_token_commands, run_token_command

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
    c = st["cache"]
    o = c["outbox"]
    alarm = "" if o["alarm"] == "none" else f"  OUTBOX {o['alarm'].upper()}"
    print(
        f"events: last seq {o['last_seq']}, outbox {o['depth']} unsent of {o['max_events']}"
        f"{alarm}; writer {c['written']} jobs done, {c['queued']} queued, {c['failed']} failed"
    )
    print(
        f"cache: {c['tickets']} tickets, {c['products']} products, {c['blocks']} blocks, "
        f"{c['reservations']} held; writer {'ok' if c['writer_alive'] else 'STOPPED'}"
    )


def print_decision(reply: dict[str, Any], explain: bool) -> None:
    """A decision as a technician reads it, optionally with every rule the engine saw."""
    d = reply["decision"]
    verdict = "ALLOWED" if d["allowed"] else "REFUSED"
    left = "" if d.get("remaining") is None else f", {d['remaining']} entries left"
    print(f"{verdict}: {d['reason']} (ticket {d.get('ticket_id') or '-'}, zone {d['zone']}{left})")
    print(f"  display: {d['prompt_zh']} / {d['prompt_en']}")
    if explain:
        for i, st in enumerate(d.get("steps", []), 1):
            mark = "ok  " if st["passed"] else "FAIL"
            print(f"  {i:2d}. {mark} {st['rule']:<14} {st['detail']}")
    if "lane" in reply:
        print(f"  lane {reply['lane']}: {reply.get('outcome')}")


def _ago(at: float | None, now: float) -> str:
    return "never" if at is None else f"{max(0.0, now - at):.1f} s ago"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"


def print_sync(s: dict[str, Any]) -> None:
    """Cloud sync on one screen: the link, the outbox, versions, uplink and downlink."""
    now = time.time()
    link = "connected to" if s["connected"] else "NOT CONNECTED to"
    print(
        f"{'cloud sync':<15}{link} {s['broker']} "
        f"({s['connects']} connect(s), {s['disconnects']} disconnect(s))"
    )
    if s.get("last_error"):
        print(f"{'last error':<15}{s['last_error']}")
    since = "connected" if s["connected"] else "last connected"
    print(
        f"{'last contact':<15}{_ago(s['last_contact'], now)} "
        f"({since} {_ago(s['last_connected_at'], now)})"
    )
    oldest = s.get("oldest_unsent_age_s")
    age = f", oldest {oldest:.0f} s old" if s["outbox_depth"] and oldest is not None else ""
    print(f"{'outbox':<15}{s['outbox_depth']} event(s) unsent{age}")
    print(f"{'versions':<15}" + ", ".join(f"{k} {v}" for k, v in s["versions"].items()))
    u = s["uplink"]
    print(
        f"{'uplink':<15}{u['sent_events']} event(s) in {u['sent_messages']} message(s), "
        f"{u['acked_events']} acked, {u['redelivered_events']} resent, "
        f"{u['rejected_acks']} refused by the broker"
    )
    print(
        f"{'':<15}{u['inflight_messages']} message(s) in flight; "
        f"last ack {_ago(u['last_ack_at'], now)}"
    )
    print(f"{'downlink':<15}applied: {_counts(s['downlink_applied'])}")
    rejected = s["downlink_rejected"]
    mark = "REJECTED" if rejected else "rejected"
    print(f"{'':<15}{mark}: {_counts(rejected)}; duplicates {s['downlink_duplicates']}")
    if s.get("snapshot_in_progress"):
        print(f"{'snapshot':<15}{s['snapshot_in_progress']} arriving")


def _synced(s: dict[str, Any]) -> bool:
    return bool(s.get("connected")) and s.get("outbox_depth") == 0


def _wait_synced(path: Path, wait_s: float) -> dict[str, Any]:
    """After ``sync now``: poll until connected with the outbox empty, or ``wait_s`` passes."""
    deadline = time.monotonic() + wait_s
    while True:
        reply = request(path, {"cmd": "sync_status"}, timeout_s=10)
        if not reply.get("ok") or _synced(reply["sync"]) or time.monotonic() > deadline:
            return reply
        time.sleep(0.2)


# A request is one line on the control socket, which takes at most MAX_LINE bytes: chunks are
# cut by size (with room for the envelope and the line numbers), not only by count.
IMPORT_CHUNK_BYTES = MAX_LINE // 2


def _import_requests(path: str, chunk: int = 1000) -> tuple[list[dict[str, Any]], list[str]]:
    """Read a JSON-lines file into import requests; bad lines are reported, not sent."""
    requests: list[dict[str, Any]] = []
    errors: list[str] = []
    batch: list[dict[str, Any]] = []
    lines: list[int] = []
    size = 0
    # Imported here: the other commands start without loading the cache's modules.
    from offline_cache.records import read_json_lines

    for n, record, why in read_json_lines(path):
        if record is None:
            errors.append(f"line {n}: {why}")
            continue
        length = len(json.dumps(record).encode()) + 12
        if length > IMPORT_CHUNK_BYTES:
            errors.append(f"line {n}: record longer than {IMPORT_CHUNK_BYTES} bytes")
            continue
        if batch and (len(batch) >= chunk or size + length > IMPORT_CHUNK_BYTES):
            requests.append({"cmd": "cache_import", "records": batch, "lines": lines})
            batch, lines, size = [], [], 0
        batch.append(record)
        lines.append(n)
        size += length
    if batch:
        requests.append({"cmd": "cache_import", "records": batch, "lines": lines})
    return requests, errors


def _build(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.command == "status":
        return [{"cmd": "status"}]
    if args.command == "open":
        return [{"cmd": "open", "lane": args.lane, "direction": args.direction}]
    if args.command == "emergency":
        return [{"cmd": "emergency", "action": args.action}]
    if args.command == "present":
        return [
            {"cmd": "present", "lane": args.lane, "code": args.code, "direction": args.direction}
        ]
    if args.command == "sync":
        return [{"cmd": f"sync_{args.action}"}]
    if args.command == "cache":
        if args.action == "stats":
            return [{"cmd": "cache_stats"}]
        if args.action == "lookup":
            return [
                {
                    "cmd": "cache_lookup",
                    "code": args.code,
                    "lane": args.lane,
                    "direction": args.direction,
                }
            ]
        return []
    return [{"cmd": args.command.replace("-", "_"), "lane": args.lane, "on": args.state}]


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
    pr = sub.add_parser("present", help="present a ticket code at a lane, as a reader would")
    pr.add_argument("lane")
    pr.add_argument("code")
    pr.add_argument("direction", nargs="?", default="entry", choices=["entry", "exit"])
    cache = sub.add_parser("cache", help="the offline ticket cache")
    csub = cache.add_subparsers(dest="action", required=True)
    cs = csub.add_parser("stats", help="counts, versions, outbox depth, database size")
    cs.add_argument("--json", action="store_true")
    cl = csub.add_parser("lookup", help="decide a code step by step, without admitting anyone")
    cl.add_argument("code")
    cl.add_argument("--lane", help="decide as at this lane (default: the first lane)")
    cl.add_argument("--direction", default="entry", choices=["entry", "exit"])
    ci = csub.add_parser("import", help="import tickets/products/blocks from a JSON-lines file")
    ci.add_argument("file")
    sync = sub.add_parser("sync", help="cloud sync: status, or sync now")
    ssub = sync.add_subparsers(dest="action", required=True)
    ss = ssub.add_parser(
        "status",
        help="link, last contact, outbox, versions, uplink and downlink counters",
        description="Exit 0 with the state (connected or not); 1 if sync is not configured.",
    )
    ss.add_argument("--json", action="store_true", help="machine-readable output")
    sn = ssub.add_parser(
        "now",
        help="reconnect and send at once, then wait until the outbox is empty",
        description="Skip the reconnect back-off, send the outbox and a fresh status. Exit 0 "
        "once connected with the outbox empty, 1 if not within --wait or sync is not "
        "configured.",
    )
    sn.add_argument(
        "--wait",
        type=float,
        default=5.0,
        metavar="S",
        help="wait up to S seconds for the outbox to empty (default 5; 0: do not wait)",
    )
    add_token_commands(sub)
    add_cloud_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "token":
        # Minting and inspecting tokens is local work: no daemon needed.
        return run_token_command(args)
    if args.command == "cloud":
        # The reference cloud talks to the broker, not to this gate's daemon.
        return run_cloud_command(args)

    local_errors: list[str] = []
    if args.command == "cache" and args.action == "import":
        try:
            reqs, local_errors = _import_requests(args.file)
        except OSError as exc:
            print(f"gatectl: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
            return EXIT_REFUSED
    else:
        reqs = _build(args)

    path = _socket_path(args)
    replies = []
    try:
        for req in reqs:
            replies.append(request(path, req, timeout_s=60))
        if args.command == "sync" and args.action == "now" and replies[0].get("ok"):
            replies.append(_wait_synced(path, args.wait))
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
    return _show(args, replies, local_errors)


def _show(args: argparse.Namespace, replies: list[dict[str, Any]], local_errors: list[str]) -> int:
    if args.command == "cache" and args.action == "import":
        imported = sum(r.get("imported", 0) for r in replies)
        errors = local_errors + [e for r in replies for e in r.get("errors", [])]
        for e in errors[:50]:
            print(f"  skipped {e}", file=sys.stderr)
        if len(errors) > 50:
            print(f"  ... and {len(errors) - 50} more", file=sys.stderr)
        print(f"imported {imported} record(s), skipped {len(errors)}")
        failed = [r for r in replies if not r.get("ok")]
        for r in failed[:1]:
            print(f"refused: {r.get('error')}: {r.get('message', '')}", file=sys.stderr)
        return EXIT_REFUSED if failed else 0
    if args.command == "sync":
        return _show_sync(args, replies)
    reply = replies[0]
    if not reply.get("ok"):
        print(f"refused: {reply.get('error')}: {reply.get('message', '')}", file=sys.stderr)
        return EXIT_REFUSED
    if args.command == "status":
        if args.json:
            print(json.dumps(reply, indent=2))
        else:
            print_status(reply)
        return 0
    if args.command == "cache" and args.action == "stats":
        stats = reply["stats"]
        if args.json:
            print(json.dumps(stats, indent=2))
        else:
            for key, value in stats.items():
                print(f"{key:<28}{value}")
        return 0
    if args.command == "present":
        print_decision(reply, explain=False)
        return 0 if reply.get("outcome") == "unlocked" else EXIT_REFUSED
    if args.command == "cache":
        print_decision(reply, explain=True)
        return 0 if reply["decision"]["allowed"] else EXIT_REFUSED
    print("ok")
    return 0


def _show_sync(args: argparse.Namespace, replies: list[dict[str, Any]]) -> int:
    reply = replies[-1]
    if reply.get("error") == "sync_disabled" or reply.get("sync", {}).get("enabled") is False:
        if args.action == "status" and args.json:
            print(json.dumps(reply["sync"], indent=2))
        print(
            "gatectl: cloud sync is not configured on this gate (no [cloud] section)",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    if not reply.get("ok"):
        print(f"refused: {reply.get('error')}: {reply.get('message', '')}", file=sys.stderr)
        return EXIT_REFUSED
    s = reply["sync"]
    if args.action == "status":
        if args.json:
            print(json.dumps(s, indent=2))
        else:
            print_sync(s)
        return 0
    if _synced(s):
        print(f"synced: connected to {s['broker']}, outbox empty")
        return 0
    if args.wait <= 0:
        print("sync requested")
        return 0
    if not s["connected"]:
        print(
            f"not synced after {args.wait:g} s: NOT CONNECTED to {s['broker']} "
            f"({s.get('last_error') or 'connecting'}); {s['outbox_depth']} event(s) unsent",
            file=sys.stderr,
        )
    else:
        print(
            f"not synced after {args.wait:g} s: {s['outbox_depth']} event(s) still unsent",
            file=sys.stderr,
        )
    return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
