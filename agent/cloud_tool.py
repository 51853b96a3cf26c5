"""``gatectl cloud``: the reference site cloud on the command line, for tests, the demo and
integrators.

It signs and sends commands and waits for the gates' acks, issues ticket and blocklist deltas
and snapshots, publishes issuer keys, and collects the gates' events, checking each gate's
sequence and hash chain as a production cloud must. It talks only to the broker the gates use,
never to a daemon's control socket. Record files use the JSON-lines format of
``gatectl cache import`` (a "type" field on every line).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.token_tool import KeyFileError, load_seed

# The cloud modules load pydantic and paho (most of a second): imported when a cloud command
# runs, so that every other gatectl command stays quick at the controller.
if TYPE_CHECKING:
    from agent.cloud.mqtt import Incoming, LinkSettings
    from agent.cloud.reference import ReferenceCloud

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

COMMAND_TTL_S = 300.0
"""A command that reaches a gate late (queued while it was offline) must not act late."""
DATA_TTL_S = 86400.0
"""Deltas and snapshots wait in an offline gate's session for up to a day."""
KEYS_TTL_S = 6 * 86400.0
"""Under the gates' default max_lifetime_s (7 days): republish the retained keys before then,
or a gate that connects later refuses them as expired."""
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""The gates' default max_message_bytes: a bigger message is refused there, so not sent."""

TICKET_TYPES = {"ticket": "tickets", "product": "products"}
KINDS = ("tickets", "products", "blocks", "keys")

FILE_FORMAT = """\
FILE is JSON lines as for `gatectl cache import`: one record per line with a "type" field
(ticket or product; block for the blocklist, where it may be left out). A line with
"delete": true removes the record instead: a ticket or product by "id", a block by "kind"
and "value". Records are checked here as a gate checks them; one bad line and nothing is sent.
Send holder_hash, never holder_id: a raw ID number does not travel over MQTT."""


class CloudToolError(Exception):
    """A cloud command that cannot go ahead; the message says why and what to do."""


class BrokerUnreachable(CloudToolError):
    """No connection to the broker."""


# --- argument types ------------------------------------------------------------------------


def _version(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError("versions are >= 0")
    return n


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError("expected on or off")
    return text == "on"


def _capacity(text: str) -> int | None:
    if text == "none":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number >= 1, or none") from None
    if n < 1:
        raise argparse.ArgumentTypeError("expected a number >= 1, or none")
    return n


def _issuer(text: str) -> dict[str, Any]:
    name, sep, public = text.partition("=")
    if not name or not sep:
        raise argparse.ArgumentTypeError("expected NAME=PUBHEX")
    try:
        ok = len(bytes.fromhex(public)) == 32
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{name}: the public key must be 64 hex characters")
    return {"issuer": name, "public_key": public.lower()}


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError("expected seconds >= 0")
    return value


def _broker_address(text: str, tls: bool) -> tuple[str, int]:
    """HOST, HOST:PORT or [IPV6]:PORT; the port defaults to 1883 (8883 with TLS)."""
    default = 8883 if tls else 1883
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise CloudToolError(f"--broker {text}: no host")
    if not port_text:
        return host, default
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise CloudToolError(f"--broker {text}: the port must be 1..65535")
    return host, int(port_text)


# --- the parsers ---------------------------------------------------------------------------


def _connection_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("broker connection")
    g.add_argument(
        "--broker",
        default=os.environ.get("GATECTL_CLOUD_BROKER", "localhost"),
        metavar="HOST:PORT",
        help="the site's broker (default $GATECTL_CLOUD_BROKER or localhost; port 1883, "
        "8883 with TLS; [::1]:1883 for IPv6)",
    )
    g.add_argument(
        "--site",
        default=os.environ.get("GATECTL_CLOUD_SITE"),
        help="site id, as in the gates' [site] id (default $GATECTL_CLOUD_SITE)",
    )
    g.add_argument("--tls", action="store_true", help="connect with TLS (implied by --ca, --cert)")
    g.add_argument("--ca", metavar="FILE", help="CA bundle that signed the broker's certificate")
    g.add_argument("--cert", metavar="FILE", help="client certificate (PEM)")
    g.add_argument(
        "--cert-key",
        metavar="FILE",
        help="the client certificate's private key (PEM); --key is the signing key",
    )
    g.add_argument("--username", metavar="U", help="MQTT user name")
    g.add_argument("--password-file", metavar="F", help="file whose first line is the password")
    g.add_argument("--client-id", help="MQTT client id (default cloud-ref-<random>)")
    g.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="give up connecting after S seconds (default 10)",
    )
    return p


def _signing_options(ttl_s: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("signing")
    g.add_argument(
        "--key",
        default=os.environ.get("GATECTL_CLOUD_KEY"),
        metavar="SEEDFILE",
        help="the cloud's signing seed, 32 raw bytes or 64 hex (from `gatectl cloud keygen`; "
        "default $GATECTL_CLOUD_KEY); its public key is in the gates' [[cloud.trust_anchors]]",
    )
    g.add_argument(
        "--ttl",
        type=_seconds,
        default=ttl_s,
        metavar="S",
        help=f"the message is refused after S seconds (default {ttl_s:.0f})",
    )
    return p


def _wait_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="then wait up to S seconds for every online gate to report the new version "
        "(exit 1 if one does not); default: do not wait",
    )


def add_cloud_commands(subparsers: Any) -> None:
    """Register ``cloud keygen|cmd|tickets|blocklist|keys|collect`` on gatectl's parsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    cloud = subparsers.add_parser(
        "cloud",
        help="the reference site cloud over MQTT: commands, tickets, keys, collect events",
        description=__doc__,
        formatter_class=fmt,
    )
    csub = cloud.add_subparsers(dest="action", required=True)
    conn = _connection_options()
    cmd_sign = _signing_options(COMMAND_TTL_S)
    data_sign = _signing_options(DATA_TTL_S)

    keygen = csub.add_parser(
        "keygen", help="make the cloud's signing key (seed file 0600, prints the public key)"
    )
    keygen.add_argument("--out", required=True, help="seed file to create (never overwritten)")

    cmd = csub.add_parser(
        "cmd",
        help="sign and send a command to one gate (or all) and wait for its ack",
        description="Sign and send a command; exit 0 only if every ack says ok. A gate sends "
        "no ack for a message it refuses (unknown key, expired, wrong clock): see "
        "`gatectl sync status` on the gate.",
    )
    cmd.add_argument("gate", metavar="GATE|all", help="gate id, or all for every gate of the site")
    cmd_sub = cmd.add_subparsers(dest="command_name", required=True, metavar="COMMAND")
    leaf = [conn, cmd_sign]

    def command(name: str, what: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = cmd_sub.add_parser(name, help=what, parents=leaf)
        p.add_argument(
            "--timeout",
            type=_seconds,
            default=10.0,
            metavar="S",
            help="wait S seconds for one gate's ack (default 10)",
        )
        p.add_argument(
            "--wait",
            type=_seconds,
            default=5.0,
            metavar="S",
            help="with all: collect acks for S seconds (default 5)",
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    op = command("open", "open a lane once (an authorised passage)")
    op.add_argument("--lane", required=True)
    op.add_argument("--direction", default="entry", choices=["entry", "exit"])
    em = command("emergency", "open every lane (on) or release the latch (reset)")
    em.add_argument("state", choices=["on", "reset"])
    for name, what in (("lockout", "take a lane out of service"), ("hold-open", "keep it open")):
        p = command(name, what)
        p.add_argument("lane", metavar="LANE|*")
        p.add_argument("on", type=_on_off, metavar="on|off")
    zc = command("zone-capacity", "cap the people inside a zone (none lifts the cap)")
    zc.add_argument("zone")
    zc.add_argument("capacity", type=_capacity, metavar="N|none")
    rs = command("resync", "ask the gate to request the newest data (the requests are shown)")
    rs.add_argument(
        "--kind",
        action="append",
        choices=KINDS,
        help="what to resync; repeat for several (default: everything)",
    )
    command("config-reload", "reload the gate's configuration (needs systemd supervision)")

    tickets = csub.add_parser("tickets", help="ticket and product deltas and snapshots")
    tsub = tickets.add_subparsers(dest="op", required=True)
    td = tsub.add_parser(
        "delta",
        help="send tickets (and products) changed from one version to the next",
        parents=[conn, data_sign],
        formatter_class=fmt,
        description="Tickets and products have versions of their own on a gate: the ticket "
        "lines of FILE go in a tickets delta --from -> --to, the product lines in a products "
        "delta --products-from -> --products-to, sent first (tickets refer to products). "
        "Versions are needed for each kind the file holds; given without lines they send an "
        "empty delta (a version step). A gate holding another version applies nothing and "
        "asks for a resync.\n\n" + FILE_FORMAT,
    )
    td.add_argument("--from", dest="from_version", type=_version, metavar="N")
    td.add_argument("--to", dest="to_version", type=_version, metavar="M")
    td.add_argument("--products-from", type=_version, metavar="N")
    td.add_argument("--products-to", type=_version, metavar="M")
    td.add_argument("file", metavar="FILE.jsonl")
    _wait_option(td)
    ts = tsub.add_parser(
        "snapshot",
        help="replace every ticket (and product) on the gates",
        parents=[conn, data_sign],
        formatter_class=fmt,
        description="Every ticket line of FILE, in chunks; the product lines (if any) replace "
        "all products with version --products-version, applied before the tickets.\n\n"
        + FILE_FORMAT,
    )
    ts.add_argument("--version", required=True, type=_version, metavar="N")
    ts.add_argument("--products-version", type=_version, metavar="N")
    ts.add_argument(
        "--chunk", type=int, default=5000, help="tickets per message (default and most: 5000)"
    )
    ts.add_argument("file", metavar="FILE.jsonl")
    _wait_option(ts)

    blocklist = csub.add_parser("blocklist", help="blocklist deltas and replacements")
    bsub = blocklist.add_subparsers(dest="op", required=True)
    bd = bsub.add_parser(
        "delta",
        help="send blocks changed from one version to the next",
        parents=[conn, data_sign],
        formatter_class=fmt,
        description=FILE_FORMAT,
    )
    bd.add_argument("--from", dest="from_version", required=True, type=_version, metavar="N")
    bd.add_argument("--to", dest="to_version", required=True, type=_version, metavar="M")
    bd.add_argument("file", metavar="FILE.jsonl")
    _wait_option(bd)
    br = bsub.add_parser(
        "replace",
        help="replace the whole blocklist",
        parents=[conn, data_sign],
        formatter_class=fmt,
        description=FILE_FORMAT,
    )
    br.add_argument("--version", required=True, type=_version, metavar="N")
    br.add_argument("file", metavar="FILE.jsonl")
    _wait_option(br)

    keys = csub.add_parser(
        "keys",
        help="publish the issuer keys for signed (GT1) tickets (retained)",
        parents=[conn, _signing_options(KEYS_TTL_S)],
        description="Publish every issuer key in force, retained: a gate that connects later "
        "gets it from the broker. Republish before --ttl runs out.",
    )
    keys.add_argument("--version", required=True, type=_version, metavar="N")
    keys.add_argument(
        "--issuer",
        action="append",
        required=True,
        type=_issuer,
        metavar="NAME=PUBHEX",
        help="an issuer and its public key (from `gatectl token keygen`); repeat for several",
    )
    _wait_option(keys)

    collect = csub.add_parser(
        "collect",
        help="collect events, status, acks and resync requests, and check each gate's chain",
        parents=[conn],
        description="Listen for S seconds (or until Ctrl-C), then show per gate the events "
        "received, duplicates, conflicts, seq range and the hash chain's verdict. Only what "
        "arrives while listening is seen: events the broker acknowledged earlier have left "
        "the gate. Exit 1 if a gate's chain does not check.",
    )
    collect.add_argument("--gate", help="show this gate only")
    collect.add_argument(
        "--seconds", type=_seconds, metavar="S", help="listen this long (default: until Ctrl-C)"
    )
    collect.add_argument("--events", action="store_true", help="print each event as it arrives")
    collect.add_argument("--json", action="store_true", help="machine-readable output")


def run_cloud_command(args: argparse.Namespace) -> int:
    """Run a parsed ``gatectl cloud ...`` command; returns the exit code."""
    try:
        if args.action == "keygen":
            return _keygen(args)
        if args.action == "collect":
            return _collect(args)
        if args.action == "cmd":
            return _command(args)
        if args.action in ("tickets", "blocklist", "keys"):
            return _data(args)
    except BrokerUnreachable as exc:
        print(f"gatectl cloud {args.action}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (CloudToolError, KeyFileError, OSError) as exc:
        print(f"gatectl cloud {args.action}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"gatectl cloud {args.action}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    raise AssertionError(f"unknown cloud action {args.action!r}")


# --- keygen --------------------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    from nacl.signing import SigningKey

    signer = SigningKey.generate()
    # O_EXCL: never overwrite the cloud's key; 0600 from the start, not chmod after.
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(bytes(signer).hex() + "\n")
    public = bytes(signer.verify_key).hex()
    print(f"public_key {public}")
    print(f"seed written to {args.out} (mode 0600); keep it in the site cloud, off the gates")
    print("trust it in each gate's configuration:")
    print("  [[cloud.trust_anchors]]")
    print(f'  public_key = "{public}"')
    return 0


# --- the connection ------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> LinkSettings:
    from agent.cloud.mqtt import LinkSettings

    tls = bool(args.tls or args.ca or args.cert)
    host, port = _broker_address(args.broker, tls)
    if (args.cert is None) != (args.cert_key is None):
        raise CloudToolError("--cert and --cert-key go together")
    if args.password_file and not args.username:
        raise CloudToolError("--password-file needs --username")
    password = None
    if args.password_file:
        lines = Path(args.password_file).read_text(encoding="utf-8").splitlines()
        password = lines[0] if lines else ""
    return LinkSettings(
        host=host,
        port=port,
        client_id=args.client_id or f"cloud-ref-{secrets.token_hex(4)}",
        tls=tls,
        ca_file=Path(args.ca) if args.ca else None,
        cert_file=Path(args.cert) if args.cert else None,
        key_file=Path(args.cert_key) if args.cert_key else None,
        username=args.username,
        password=password,
        # A one-off client: the broker keeps nothing for it after it leaves.
        session_expiry_s=0,
        connect_timeout_s=max(1.0, args.connect_timeout),
        reconnect_min_s=0.2,
        reconnect_max_s=2.0,
    )


def _site(args: argparse.Namespace) -> str:
    from agent.cloud.contract import NAME

    if not args.site:
        raise CloudToolError("which site? give --site (or set $GATECTL_CLOUD_SITE)")
    if not re.match(NAME, args.site):
        raise CloudToolError(f"--site {args.site!r}: letters, digits, _ . - (up to 32)")
    return str(args.site)


class SiteCloud:
    """The reference cloud as this tool drives it, plus what the tool tallies itself: every
    gate's ack (the reference keeps one per nonce), the broker's PUBACKs, statuses."""

    def __init__(
        self,
        args: argparse.Namespace,
        *,
        sign: bool,
        ttl_s: float = COMMAND_TTL_S,
        live_gate: str | None = None,
        live: bool = False,
    ) -> None:
        from agent.cloud.reference import ReferenceCloud

        self.site = _site(args)
        self.settings = _settings(args)
        seed = b""
        if sign:
            if not args.key:
                raise CloudToolError(
                    "no signing key: give --key SEEDFILE (or set $GATECTL_CLOUD_KEY)"
                )
            seed = load_seed(args.key)
        self.live = live
        self.live_gate = live_gate
        self.live_to = sys.stdout
        self.acks: list[dict[str, Any]] = []
        self.status: dict[str, dict[str, Any]] = {}
        self.resync: list[dict[str, Any]] = []
        self.telemetry: Counter[str] = Counter()
        self._cv = threading.Condition()
        self._published: dict[int, str] = {}
        self._pubacks: dict[int, bool] = {}
        tool = self

        class Hooked(ReferenceCloud):
            def message(self, conn: int, msg: Incoming) -> None:
                try:
                    super().message(conn, msg)
                finally:
                    tool._message(msg)

            def acked(self, conn: int, mid: int, ok: bool) -> None:
                tool._puback(mid, ok)

            def publish_raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
                tool._publish(topic, payload, retain)

        self.ref: ReferenceCloud = Hooked(self.settings, self.site, seed, ttl_s=ttl_s)

    @property
    def where(self) -> str:
        s = self.settings
        return f"{s.host}:{s.port}{' (TLS)' if s.tls else ''}"

    def __enter__(self) -> SiteCloud:
        try:
            self.ref.start(self.settings.connect_timeout_s)
        except TimeoutError:
            why = self.ref.link.last_error or "no answer"
            raise BrokerUnreachable(f"cannot reach the broker at {self.where}: {why}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.ref.stop()

    # --- on the link thread -----------------------------------------------------------------

    def _message(self, msg: Incoming) -> None:
        from agent.cloud.contract import parse_up_topic

        where = parse_up_topic(msg.topic)
        if where is None:
            return
        gate, kind = where
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        with self._cv:
            if kind == "cmd/ack":
                self.acks.append({**body, "gate": gate, "received_at": time.time()})
            elif kind == "status":
                self.status[gate] = body
            elif kind == "resync":
                self.resync.append({**body, "gate": gate})
            elif kind == "telemetry":
                self.telemetry[gate] += 1
            self._cv.notify_all()
        if kind == "events" and self.live and self.live_gate in (None, gate):
            for e in body.get("events", []):
                if isinstance(e, dict):
                    print(f"{gate} {_event_line(e)}", file=self.live_to, flush=True)

    def _puback(self, mid: int, ok: bool) -> None:
        with self._cv:
            self._pubacks[mid] = ok
            self._cv.notify_all()

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        if len(payload) > MAX_MESSAGE_BYTES:
            raise CloudToolError(
                f"a message of {len(payload)} bytes: gates refuse more than "
                f"{MAX_MESSAGE_BYTES} (their max_message_bytes); send fewer records at once"
            )
        deadline = time.monotonic() + self.settings.connect_timeout_s
        while True:
            # Not under self._cv: paho calls on_publish holding its own lock, which publish()
            # takes too.
            mid = self.ref.link.publish(topic, payload, qos=1, retain=retain)
            if mid >= 0:
                break
            if time.monotonic() > deadline:
                raise BrokerUnreachable(f"lost the broker at {self.where}")
            time.sleep(0.05)
        with self._cv:
            self._published[mid] = topic

    # --- on the caller's thread -------------------------------------------------------------

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until the broker has acknowledged (PUBACK) everything published."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while any(mid not in self._pubacks for mid in self._published):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CloudToolError(
                        f"the broker at {self.where} did not confirm the message(s) in "
                        f"{timeout_s:.0f} s: the gates may not get them; send again"
                    )
                self._cv.wait(min(left, 0.2))
            refused = sorted({t for mid, t in self._published.items() if not self._pubacks[mid]})
            self._published.clear()
            self._pubacks.clear()
        if refused:
            raise CloudToolError(
                f"the broker refused to take a message on {', '.join(refused)} "
                "(is this user allowed to publish there?)"
            )

    def wait(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``done()`` (called under the lock) holds; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.2))
            return True

    def snapshot(self) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], list[Any]]:
        with self._cv:
            return list(self.acks), dict(self.status), list(self.resync)


# --- commands ------------------------------------------------------------------------------


def _command_body(args: argparse.Namespace) -> dict[str, Any]:
    name = args.command_name
    if name == "open":
        return {"cmd": "open", "lane": args.lane, "direction": args.direction}
    if name == "emergency":
        return {"cmd": "emergency", "action": args.state}
    if name in ("lockout", "hold-open"):
        return {"cmd": name.replace("-", "_"), "lane": args.lane, "on": args.on}
    if name == "zone-capacity":
        return {"cmd": "zone_capacity", "zone": args.zone, "capacity": args.capacity}
    if name == "resync":
        return {"cmd": "resync", **({"kinds": args.kind} if args.kind else {})}
    return {"cmd": "config_reload"}


def _check_body(kind: str, body: dict[str, Any]) -> None:
    """Refuse here what every gate would refuse (invalid_body), with the same reason."""
    from pydantic import ValidationError

    from agent.cloud.contract import DOWN_BODIES

    try:
        DOWN_BODIES[kind].validate_python(body)
    except ValidationError as exc:
        err = exc.errors(include_input=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise CloudToolError(f"gates would refuse this: {where}: {err['msg']}") from None


def _command(args: argparse.Namespace) -> int:
    from agent.cloud.contract import NAME

    gate = args.gate
    if gate != "all" and not re.match(NAME, gate):
        raise CloudToolError(f"gate {gate!r}: letters, digits, _ . - (up to 32), or all")
    body = _command_body(args)
    _check_body("cmd", body)
    with SiteCloud(args, sign=True, ttl_s=args.ttl) as cloud:
        sent_at = time.time()
        nonce = cloud.ref.command(gate, body)
        cloud.flush(args.connect_timeout)

        def mine() -> list[dict[str, Any]]:
            return [a for a in cloud.acks if a.get("nonce") == nonce]

        if gate == "all":
            cloud.wait(lambda: False, args.wait)
        else:
            cloud.wait(lambda: any(a["gate"] == gate for a in mine()), args.timeout)
        acks, status, resync = cloud.snapshot()
    acks = [a for a in acks if a.get("nonce") == nonce]
    acked = {a["gate"] for a in acks}
    if gate == "all":
        online = {g for g, s in status.items() if s.get("state") == "online"}
        missing = sorted(online - acked)
    else:
        missing = [] if gate in acked else [gate]
    asked = [r for r in resync if r["gate"] in acked and r.get("reason") == "command"]
    ok = bool(acks) and all(a.get("ok") for a in acks) and not missing
    if args.json:
        out = {"nonce": nonce, "ok": ok, "acks": acks, "missing": missing, "resync": asked}
        print(json.dumps(out, indent=2))
        return 0 if ok else EXIT_REFUSED
    for a in sorted(acks, key=lambda a: str(a["gate"])):
        took = a["received_at"] - sent_at
        if a.get("ok"):
            print(f"{a['gate']}: {a.get('cmd')} ok ({took:.2f} s)")
        else:
            print(f"{a['gate']}: {a.get('cmd')} REFUSED: {a.get('error')}: {a.get('message', '')}")
    for r in asked:
        print(f"{r['gate']}: asks for {r.get('kind')} from version {r.get('have')}")
    wait = args.wait if gate == "all" else args.timeout
    for g in missing:
        print(f"{g}: no ack in {wait:g} s; {_status_line(status.get(g))}", file=sys.stderr)
    if gate != "all" and missing:
        if status.get(gate, {}).get("state") == "online":
            hint = (
                "a gate sends no ack for a message it refuses (unknown key, expired, wrong "
                "clock): see `gatectl sync status` on the gate"
            )
        else:
            # The gate's persistent session holds the command at the broker.
            hint = f"the command still acts if the gate connects within {args.ttl:g} s (--ttl)"
        print(f"  ({hint})", file=sys.stderr)
    if gate == "all" and not acks and not missing:
        print(f"no gate of site {cloud.site} answered in {wait:g} s", file=sys.stderr)
    return 0 if ok else EXIT_REFUSED


# --- tickets, blocklist, keys --------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    type: str
    body: dict[str, Any]
    delete: bool


def _read_records(path: str, types: set[str], default_type: str | None = None) -> list[_Record]:
    """The records of a JSON-lines file, each checked as a gate checks it; any bad line and
    CloudToolError lists them (a delta is all or nothing: a half-sent one cannot be mended)."""
    from offline_cache import RecordError
    from offline_cache.records import (
        block_key,
        block_row,
        delete_key,
        product_row,
        read_json_lines,
        ticket_row,
    )

    records: list[_Record] = []
    errors: list[str] = []
    for n, rec, why in read_json_lines(path):
        if rec is None:
            errors.append(f"line {n}: {why}")
            continue
        kind = rec.pop("type", default_type)
        delete = rec.pop("delete", False)
        if kind not in types:
            errors.append(f"line {n}: type: expected {' or '.join(sorted(types))}")
            continue
        if not isinstance(delete, bool):
            errors.append(f"line {n}: delete: expected true or false")
            continue
        if "holder_id" in rec:
            errors.append(f"line {n}: holder_id: send holder_hash; no ID number over MQTT")
            continue
        try:
            if delete:
                if kind == "block":
                    block_key(rec, key=None)
                else:
                    delete_key("tickets", rec, key=None)
            elif kind == "ticket":
                ticket_row(rec, key=None, utc_offset_s=0)
            elif kind == "product":
                product_row(rec)
            else:
                block_row(rec, key=None, utc_offset_s=0)
        except RecordError as exc:
            errors.append(f"line {n}: {exc}")
            continue
        records.append(_Record(str(kind), rec, delete))
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise CloudToolError(f"{path}: {len(errors)} bad line(s), nothing sent:\n  {shown}{more}")
    return records


def _split(records: list[_Record], kind: str) -> tuple[list[dict[str, Any]], list[Any]]:
    upserts = [r.body for r in records if r.type == kind and not r.delete]
    if kind == "block":
        deletes: list[Any] = [
            {"kind": r.body["kind"], "value": r.body["value"]}
            for r in records
            if r.type == kind and r.delete
        ]
    else:
        deletes = [str(r.body["id"]) for r in records if r.type == kind and r.delete]
    return upserts, deletes


def _steps(pairs: list[tuple[str, int | None, int | None]]) -> None:
    for name, low, high in pairs:
        if low is None or high is None:
            raise CloudToolError(f"{name}: give both versions")
        if high <= low:
            raise CloudToolError(f"{name}: the new version must be greater than the old")


def _data(args: argparse.Namespace) -> int:
    """tickets delta|snapshot, blocklist delta|replace, keys: sign, send, confirm, wait."""
    sends: list[tuple[str, dict[str, Any], str]] = []  # (contract kind, body, what)
    targets: dict[str, int] = {}
    if args.action == "tickets" and args.op == "delta":
        records = _read_records(args.file, set(TICKET_TYPES))
        for kind, low, high, flag in (
            ("product", args.products_from, args.products_to, "--products-from/--products-to"),
            ("ticket", args.from_version, args.to_version, "--from/--to"),
        ):
            upserts, deletes = _split(records, kind)
            if (upserts or deletes) and (low is None or high is None):
                raise CloudToolError(
                    f"{args.file} holds {len(upserts) + len(deletes)} {kind} line(s): give "
                    f"{flag} ({kind}s have a version of their own)"
                )
            if low is None and high is None:
                continue
            _steps([(flag, low, high)])
            plural = TICKET_TYPES[kind]
            body = {
                "op": "delta",
                "kind": plural,
                "from_version": low,
                "to_version": high,
                "upserts": upserts,
                "deletes": deletes,
            }
            sends.append(("tickets", body, f"{plural} delta {low}->{high}: {_counted(body)}"))
            assert high is not None
            targets[plural] = high
        if not sends:
            raise CloudToolError("nothing to send: give --from and --to")
    elif args.action == "tickets":
        if args.chunk < 1:
            raise CloudToolError("--chunk must be at least 1")
        records = _read_records(args.file, set(TICKET_TYPES))
        if any(r.delete for r in records):
            raise CloudToolError("a snapshot replaces everything: it has no delete lines")
        tickets = [r.body for r in records if r.type == "ticket"]
        products = [r.body for r in records if r.type == "product"]
        if products and args.products_version is None:
            raise CloudToolError(
                f"{args.file} holds {len(products)} product line(s): give --products-version"
            )
        return _send_snapshot(args, tickets, products)
    elif args.action == "blocklist":
        records = _read_records(args.file, {"block"}, default_type="block")
        upserts, deletes = _split(records, "block")
        if args.op == "delta":
            _steps([("--from/--to", args.from_version, args.to_version)])
            body = {
                "op": "delta",
                "from_version": args.from_version,
                "to_version": args.to_version,
                "upserts": upserts,
                "deletes": deletes,
            }
            what = f"blocklist delta {args.from_version}->{args.to_version}: {_counted(body)}"
            targets["blocks"] = args.to_version
        else:
            if deletes:
                raise CloudToolError("a replacement holds every block: it has no delete lines")
            if args.version < 1:
                raise CloudToolError("--version must be at least 1")
            body = {"op": "replace", "version": args.version, "blocks": upserts}
            what = f"blocklist version {args.version}: {len(upserts)} block(s)"
            targets["blocks"] = args.version
        sends.append(("blocklist", body, what))
    else:
        if args.version < 1:
            raise CloudToolError("--version must be at least 1")
        body = {"version": args.version, "keys": args.issuer}
        what = f"issuer keys version {args.version}: {len(args.issuer)} key(s)"
        sends.append(("keys", body, what))
        targets["keys"] = args.version
    for kind, body, _ in sends:
        _check_body(kind, body)
    with SiteCloud(args, sign=True, ttl_s=args.ttl) as cloud:
        for kind, body, _ in sends:
            topic = cloud.ref.topics("all")[kind]
            cloud.ref.send(topic, body, retain=kind == "keys")
        cloud.flush(max(10.0, args.connect_timeout))
        for _, _, what in sends:
            print(f"sent {what} (site {cloud.site}, confirmed by the broker)")
        return _await_versions(cloud, targets, args.wait)


def _counted(body: dict[str, Any]) -> str:
    return f"{len(body['upserts'])} upsert(s), {len(body['deletes'])} delete(s)"


def _send_snapshot(
    args: argparse.Namespace, tickets: list[dict[str, Any]], products: list[dict[str, Any]]
) -> int:
    if args.version < 1:
        raise CloudToolError("--version must be at least 1")
    body: dict[str, Any] = {
        "op": "snapshot",
        "snapshot": "check",
        "version": args.version,
        "index": 0,
        "count": 1,
        "tickets": tickets[: args.chunk],
    }
    if products:
        body.update(products=products, products_version=args.products_version)
    _check_body("tickets", body)
    targets = {"tickets": args.version}
    if products:
        targets["products"] = args.products_version
    with SiteCloud(args, sign=True, ttl_s=args.ttl) as cloud:
        chunks = cloud.ref.snapshot(
            args.version,
            tickets,
            products=products or None,
            products_version=args.products_version if products else None,
            chunk=args.chunk,
        )
        cloud.flush(max(10.0, args.connect_timeout))
        with_products = f" and {len(products)} product(s)" if products else ""
        print(
            f"sent tickets snapshot version {args.version}: {len(tickets)} ticket(s)"
            f"{with_products} in {chunks} message(s) (site {cloud.site}, confirmed by the broker)"
        )
        return _await_versions(cloud, targets, args.wait)


def _await_versions(cloud: SiteCloud, targets: dict[str, int], wait_s: float) -> int:
    """With --wait: until every online gate reports ``targets`` in its status."""
    if wait_s <= 0:
        return 0

    def online(status: dict[str, dict[str, Any]]) -> list[str]:
        return sorted(g for g, s in status.items() if s.get("state") == "online")

    def behind(status: dict[str, dict[str, Any]]) -> list[str]:
        return [
            g
            for g in online(status)
            if any(status[g].get("versions", {}).get(k, 0) < v for k, v in targets.items())
        ]

    cloud.wait(lambda: bool(online(cloud.status)) and not behind(cloud.status), wait_s)
    _, status, resync = cloud.snapshot()
    up, late = online(status), behind(status)
    if not up:
        print(f"no gate of site {cloud.site} is online", file=sys.stderr)
        return EXIT_REFUSED
    for g in up:
        v = status[g].get("versions", {})
        have = ", ".join(f"{k} {v.get(k, 0)}" for k in targets)
        print(f"{g}: {have}{'  BEHIND' if g in late else ''}")
    for r in resync:
        why = r.get("reason")
        print(f"{r['gate']}: asks for {r.get('kind')} from version {r.get('have')} ({why})")
    return EXIT_REFUSED if late else 0


# --- collect -------------------------------------------------------------------------------


def _event_line(e: dict[str, Any]) -> str:
    ts = e.get("ts")
    when = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, int | float) else "?"
    return f"#{e.get('seq')} {when} {e.get('kind')} {e.get('lane') or '-'}"


def _status_line(s: dict[str, Any] | None) -> str:
    if not s:
        return "no status seen (is the gate id right, and is it on this broker?)"
    at = s.get("at")
    age = f" {time.time() - at:.0f} s ago" if isinstance(at, int | float) else ""
    if s.get("state") != "online":
        return f"last status: offline ({s.get('reason', '?')}){age}"
    versions = ", ".join(f"{k} {v}" for k, v in (s.get("versions") or {}).items())
    outbox = s.get("outbox") or {}
    return (
        f"last status: online{age}; versions {versions or '-'}; outbox "
        f"{outbox.get('depth', '?')}; emergency {'ON' if s.get('emergency') else 'off'}"
    )


def _collect(args: argparse.Namespace) -> int:
    cloud = SiteCloud(args, sign=False, live_gate=args.gate, live=args.events)
    if args.json:
        cloud.live_to = sys.stderr  # stdout carries one JSON document
    started = time.monotonic()
    with cloud:
        print(
            f"collecting from site {cloud.site} at {cloud.where}"
            + (f" for {args.seconds:g} s" if args.seconds is not None else " until Ctrl-C"),
            file=sys.stderr,
            flush=True,
        )
        try:
            if args.seconds is None:
                while True:
                    time.sleep(3600)
            else:
                time.sleep(args.seconds)
        except KeyboardInterrupt:
            pass
    took = time.monotonic() - started
    # The link has stopped: nothing changes the reference cloud's logs from here on.
    acks, status, resync = cloud.snapshot()
    logs = cloud.ref.gates
    names = sorted(set(logs) | set(status) | {str(a["gate"]) for a in acks})
    if args.gate:
        names = [g for g in names if g == args.gate]
    from agent.cloud.reference import GateLog

    report: dict[str, Any] = {}
    for g in names:
        log = logs.get(g, GateLog())
        ok, verdict = log.check()
        seqs = sorted(log.events)
        report[g] = {
            "received": log.received,
            "unique": len(log.events),
            "duplicates": log.duplicates,
            "conflicts": list(log.conflicts),
            "seq_first": seqs[0] if seqs else None,
            "seq_last": seqs[-1] if seqs else None,
            "chain_ok": ok,
            "chain": verdict,
            "kinds": dict(Counter(str(e.get("kind")) for e in log.events.values())),
            "status": status.get(g),
            "acks": sum(1 for a in acks if a["gate"] == g),
            "resync": [r for r in resync if r["gate"] == g],
            "telemetry": cloud.telemetry[g],
        }
    failed = sorted(g for g, r in report.items() if not r["chain_ok"])
    if args.json:
        out = {"site": cloud.site, "seconds": round(took, 1), "gates": report, "failed": failed}
        print(json.dumps(out, indent=2))
        return EXIT_REFUSED if failed else 0
    print(f"site {cloud.site}: {len(report)} gate(s) heard in {took:.1f} s")
    for g, r in report.items():
        print(
            f"gate {g}: {r['received']} event(s) received, {r['unique']} unique, "
            f"{r['duplicates']} duplicate(s), {len(r['conflicts'])} conflict(s)"
        )
        if r["unique"]:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(r["kinds"].items()))
            print(f"  seq {r['seq_first']}..{r['seq_last']}: {kinds}")
        print(f"  chain: {'ok' if r['chain_ok'] else 'BROKEN'}: {r['chain']}")
        print(f"  {_status_line(r['status'])}")
        print(
            f"  {r['acks']} ack(s), {len(r['resync'])} resync request(s), "
            f"{r['telemetry']} telemetry message(s)"
        )
    return EXIT_REFUSED if failed else 0
