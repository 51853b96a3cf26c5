"""``python -m tests.bench_cloud``: cloud sync against a real Mosquitto (part of ``make bench``).

Every scenario gets a fresh ``LocalBroker``. Where the site cloud only listens to events it
runs as ``ReferenceCloud`` in a process of its own (``--subscriber``), so that parsing and
checking every event does not take the gate side's GIL; it checks the count and hash chain.

- ``outbox_drain``: a 50,000-event backlog of passage events (as the passage commit writes
  them, ~390 bytes each on the wire) in a ``Cache``; the real ``Uplink`` + ``MqttLink``, wired
  as ``CloudSync`` wires them, drain it from this process with ``CloudConfig``'s batch settings,
  then with 100/200/500 events per message and 10/20 messages in flight (median of 3 runs
  each). Timed from CONNACK to the last PUBACK, to the last event received and to the outbox
  empty (rows deleted).
- ``event_latency_online``: events appended at a steady 500/s for 20 s with the uplink running;
  each carries its creation time (``time.monotonic()``: one clock for every process on Linux);
  latency = receipt at the subscriber minus creation (so it includes the durable commit).
- ``event_latency_daemon``: the real daemon, both lanes held open, simulated people walking
  through steadily; latency = receipt minus the event's ``ts`` (the daemon's wall clock when
  the lane reported the passage).
- ``delta_10k_apply`` and ``snapshot_1m``: the real daemon (``Testbed``) with 1,000,000 tickets
  in its cache (written before it starts); ReferenceCloud publishes a signed 10,000-ticket
  delta, then 1,000,000-ticket snapshots while a separate process makes ``cache_lookup``
  decisions over the control socket at 100/s and people walk through lane L2. Timed from the
  first publish to the version in force (``sync_status``). The snapshot is sent three ways:
  as ``ReferenceCloud.snapshot`` does (5,000 per chunk, all at once), then paced so that at
  most 4 chunks wait unverified at the gate (what MQTT flow control would give), with 5,000
  and with 1,000 tickets per chunk.

Prints one line per figure, ``BENCH <name> <value> <unit>``, and ``INFO`` lines that explain.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from agent.cloud.contract import up_topic
from agent.cloud.mqtt import Incoming, LinkListener, LinkSettings, MqttLink
from agent.cloud.reference import ReferenceCloud
from agent.cloud.uplink import Uplink
from agent.config import CloudConfig
from agent.control import request
from agent.localbroker import LocalBroker
from agent.testbed import Testbed, wait_for
from drivers.sim.client import SimClient
from offline_cache import Cache
from tests.bench_cache import tickets as ticket_chunks
from tests.cloudkit import CLOUD_SEED, cloud_toml, reference_cloud, unique_site
from verify.model import Policy

GATE = "gate-01"
BACKLOG = 50_000
RATE = 500
DRAIN_VARIANTS = [(100, 10), (100, 20), (200, 10), (500, 10), (500, 20)]
DELTA = 10_000
SNAPSHOT_CHUNK = 5000
SMALL_CHUNK = 1000
WINDOW = 4
LOOKUP_HZ = 100
CROWD_STEP_S = 0.01
CROWD_GAP_S = 0.02


def default(name: str) -> int:
    value = CloudConfig.model_fields[name].default
    assert isinstance(value, int)
    return value


def emit(name: str, value: float, unit: str) -> None:
    print(f"BENCH {name} {value:.3f} {unit}", flush=True)


def info(text: str) -> None:
    print(f"INFO {text}", flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def load1() -> float:
    return os.getloadavg()[0]


def rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- the cloud side that listens: a process of its own --------------------------------------


class _CountingCloud(ReferenceCloud):
    """ReferenceCloud that also counts payload bytes."""

    payload_bytes = 0

    def message(self, conn: int, msg: Incoming) -> None:
        self.payload_bytes += len(msg.payload)
        super().message(conn, msg)


def subscriber(args: dict[str, Any]) -> int:
    """Receive a gate's events until ``expect`` arrived (or a line on stdin); print results.

    Latency per event: receive time minus ``data["t0"]`` (monotonic, set by the bench) or,
    for events of ``kinds``, minus the event's own ``ts`` (wall clock, set by the daemon).
    """
    site, gate, expect = args["site"], args["gate"], args["expect"]
    kinds = set(args.get("kinds") or ())
    settings = LinkSettings(args["host"], args["port"], f"cloud-{site}", reconnect_max_s=1.0)
    cloud = _CountingCloud(settings, site, CLOUD_SEED)
    halt = threading.Event()

    def listen() -> None:
        # Only "stop" stops us: the bench closes stdin when it just waits for the results.
        if sys.stdin.readline().strip() == "stop":
            halt.set()

    threading.Thread(target=listen, daemon=True).start()
    wall = time.time() - time.monotonic()
    cloud.start()
    try:
        # A probe of our own, published after SUBSCRIBE on the same connection, comes back
        # only once the subscription is in place.
        probe = up_topic(site, "probe", "events")
        deadline = time.monotonic() + 10
        while cloud.messages == 0:
            if time.monotonic() > deadline:
                raise TimeoutError("subscriber: the probe never came back")
            cloud.link.publish(probe, b'{"v":1,"events":[]}')
            time.sleep(0.05)
        print("ready", flush=True)
        deadline = time.monotonic() + args["timeout_s"]
        while not halt.is_set() and time.monotonic() < deadline:
            gate_log = cloud.gates.get(gate)
            if expect is not None and gate_log is not None and len(gate_log.events) >= expect:
                break
            time.sleep(0.005)
    finally:
        cloud.stop()
    gate_log = cloud.gates.get(gate)
    events = gate_log.events if gate_log is not None else {}
    received = [(t, top) for t, top in cloud.received_at if top > 0]
    result: dict[str, Any] = {
        "unique": len(events),
        "received": gate_log.received if gate_log else 0,
        "duplicates": gate_log.duplicates if gate_log else 0,
        "check": list(gate_log.check()) if gate_log else [False, "nothing received"],
        "messages": len(received),
        "payload_bytes": cloud.payload_bytes,
        "first_rx": received[0][0] if received else None,
        "last_rx": received[-1][0] if received else None,
    }
    # Messages carry consecutive seqs in order: an event arrived with the first message
    # whose highest seq reaches it.
    tops: list[int] = []
    for _, top in received:
        tops.append(max(top, tops[-1]) if tops else top)
    lat = []
    for seq, e in events.items():
        at = received[min(bisect.bisect_left(tops, seq), len(received) - 1)][0]
        if "t0" in e["data"]:
            lat.append((at - e["data"]["t0"]) * 1000)
        elif e["kind"] in kinds:
            lat.append((at + wall - e["ts"]) * 1000)
    result["latency_ms"] = lat
    print(json.dumps(result), flush=True)
    return 0


class Subscriber:
    """The subscriber process, started and read from the bench."""

    def __init__(
        self,
        broker: LocalBroker,
        site: str,
        expect: int | None,
        timeout_s: float,
        kinds: tuple[str, ...] = (),
    ) -> None:
        args = {
            "host": broker.host,
            "port": broker.port,
            "site": site,
            "gate": GATE,
            "expect": expect,
            "timeout_s": timeout_s,
            "kinds": list(kinds),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench_cloud", "--subscriber", json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"subscriber did not start: {line!r}")

    def result(self, timeout_s: float, *, stop: bool = False) -> dict[str, Any]:
        """Its results, once it has everything it expects (or at once, with ``stop``)."""
        out, _ = self.proc.communicate("stop\n" if stop else None, timeout=timeout_s)
        parsed: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return parsed

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


# --- the gate side in this process: Cache + Uplink + MqttLink -------------------------------


class _Listener(LinkListener):
    """Forwards the link's reports to the uplink (as CloudSync does) and notes their times."""

    def __init__(self, uplink: Uplink) -> None:
        self.uplink = uplink
        self.connected_at: float | None = None
        self.last_ack_at = 0.0

    def connected(self, conn: int, session_present: bool) -> None:
        self.connected_at = time.monotonic()
        self.uplink.connected(conn)

    def disconnected(self, conn: int, reason: str) -> None:
        self.uplink.disconnected(conn)

    def acked(self, conn: int, mid: int, ok: bool) -> None:
        self.last_ack_at = time.monotonic()
        self.uplink.acked(conn, mid, ok)


class GateUplink:
    """The gate's uplink as CloudSync wires it, without the rest of the daemon."""

    def __init__(
        self, cache: Cache, broker: LocalBroker, site: str, batch_events: int, inflight: int
    ) -> None:
        self.cache = cache
        self.uplink = Uplink(
            cache.path,
            up_topic(site, GATE, "events"),
            {"site": site, "gate": GATE},
            lambda topic, payload: self.link.publish(topic, payload),
            cache.mark_sent,
            lambda: cache.outbox_range,
            batch_events=batch_events,
            batch_bytes=default("batch_bytes"),
            inflight=inflight,
        )
        self.listener = _Listener(self.uplink)
        settings = LinkSettings(broker.host, broker.port, f"gate-{site}-{GATE}")
        self.link = MqttLink(settings, self.listener, [])

    def start(self) -> None:
        self.cache.watch_outbox(self.uplink.wake)
        self.uplink.start()
        self.link.start()

    def stop(self) -> None:
        self.cache.watch_outbox(None)
        self.link.stop()
        self.uplink.stop()


def passage_data(i: int, **extra: Any) -> dict[str, Any]:
    """What a passage event carries (offline_cache's passage commit)."""
    return {
        "ticket_id": f"T{i:08d}",
        "zone": "park",
        "direction": "entry",
        "reservation": uuid.uuid4().hex,
        "entries": 1 + i % 3,
        **extra,
    }


def outbox_drain(work: Path, batch_events: int, inflight: int) -> dict[str, float]:
    """Drain a BACKLOG-event outbox to a fresh broker; seconds and counts."""
    site = unique_site()
    with (
        LocalBroker(work / "broker") as broker,
        Cache(work / "gate.db", policy=Policy()) as cache,
    ):
        for i in range(BACKLOG):
            cache.append("passage", "L1", **passage_data(i))
        wait_for(lambda: cache.outbox_range[1] >= BACKLOG, 120, "the backlog written", 0.05)
        assert cache.outbox_range == (0, BACKLOG), cache.outbox_range
        sub = Subscriber(broker, site, BACKLOG, timeout_s=120)
        gate = GateUplink(cache, broker, site, batch_events, inflight)
        gate.start()
        try:
            wait_for(lambda: gate.uplink.acked_events >= BACKLOG, 120, "every PUBACK", 0.002)
            wait_for(lambda: cache.outbox_range[0] >= BACKLOG, 30, "the outbox empty", 0.002)
            emptied = time.monotonic()
            got = sub.result(60)
        finally:
            gate.stop()
            sub.kill()
        t0 = gate.listener.connected_at
        assert t0 is not None
        depth = cache.stats()["outbox"]["depth"]
        with sqlite3.connect(cache.path) as db:
            rows = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        stats = gate.uplink.stats()
    ok, _ = got["check"]
    assert got["unique"] == BACKLOG and ok, {k: v for k, v in got.items() if k != "latency_ms"}
    assert stats["acked_events"] == BACKLOG, stats
    assert depth == 0 and rows == 0, (depth, rows)
    return {
        "puback": gate.listener.last_ack_at - t0,
        "received": got["last_rx"] - t0,
        "empty": emptied - t0,
        "messages": float(stats["sent_messages"]),  # type: ignore[arg-type]
        "redelivered": float(stats["redelivered_events"]),  # type: ignore[arg-type]
        "duplicates": float(got["duplicates"]),
        "bytes_per_event": got["payload_bytes"] / got["received"],
    }


def bench_drain(work: Path, repeats: int) -> None:
    base = (default("batch_events"), default("inflight"))
    info(
        f"outbox_drain: {BACKLOG} events, CloudConfig defaults batch_events={base[0]} "
        f"inflight={base[1]}; median of {repeats} runs per setting"
    )
    rates: dict[tuple[int, int], float] = {}
    run = 0
    for batch, inflight in [base, *DRAIN_VARIANTS]:
        runs = []
        for _ in range(repeats):
            runs.append(outbox_drain(work / f"drain{run}", batch, inflight))
            run += 1
        r = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        rates[batch, inflight] = BACKLOG / r["puback"]
        each = ", ".join(f"{x['puback']:.3f}" for x in runs)
        info(
            f"drain batch={batch} inflight={inflight}: last PUBACK {r['puback']:.3f} s "
            f"(runs: {each}), last received "
            f"{r['received']:.3f} s, outbox empty {r['empty']:.3f} s, {r['messages']:.0f} "
            f"messages, {r['bytes_per_event']:.0f} bytes/event on the wire, redelivered "
            f"{max(x['redelivered'] for x in runs):.0f}, duplicates "
            f"{max(x['duplicates'] for x in runs):.0f}, load {load1():.2f}"
        )
        if (batch, inflight) == base:
            emit("outbox_drain_events_per_s", rates[base], "events/s")
            emit("outbox_drain_received_events_per_s", BACKLOG / r["received"], "events/s")
            emit("outbox_drain_empty_s", r["empty"], "s")
        else:
            emit(
                f"outbox_drain_events_per_s_b{batch}_i{inflight}",
                rates[batch, inflight],
                "events/s",
            )
    best = max(rates, key=lambda k: rates[k])
    info(f"drain best: batch={best[0]} inflight={best[1]}, {rates[best]:.0f} events/s")


def latency_figures(name: str, got: dict[str, Any]) -> None:
    lat = got["latency_ms"]
    emit(f"{name}_p50_ms", statistics.median(lat), "ms")
    emit(f"{name}_p99_ms", pct(lat, 99), "ms")
    emit(f"{name}_max_ms", max(lat), "ms")


def bench_latency(work: Path, seconds: float) -> None:
    site = unique_site()
    count = int(RATE * seconds)
    with (
        LocalBroker(work / "broker") as broker,
        Cache(work / "gate.db", policy=Policy()) as cache,
    ):
        sub = Subscriber(broker, site, count, timeout_s=seconds + 60)
        gate = GateUplink(cache, broker, site, default("batch_events"), default("inflight"))
        gate.start()
        try:
            wait_for(lambda: gate.listener.connected_at, 10, "the uplink connected")
            start = time.monotonic() + 0.1
            late = 0.0
            for i in range(count):
                due = start + i / RATE
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                else:
                    late = max(late, now - due)
                cache.append("passage", "L1", **passage_data(i, t0=time.monotonic()))
            got = sub.result(60)
        finally:
            gate.stop()
            sub.kill()
    ok, _ = got["check"]
    assert got["unique"] == count and ok, {k: v for k, v in got.items() if k != "latency_ms"}
    info(
        f"latency: {count} events at {RATE}/s for {seconds:.0f} s, {got['messages']} messages, "
        f"the producer at most {late * 1000:.1f} ms behind its schedule, load {load1():.2f}"
    )
    latency_figures("event_latency_online", got)


def bench_daemon_latency(work: Path, seconds: float) -> None:
    """Passages through the real daemon (both lanes held open, a steady crowd) to the cloud."""
    site = unique_site()
    with LocalBroker(work / "broker") as broker:
        tb = Testbed(
            work / "gate",
            fail_states=("open", "open"),
            site_id=site,
            bus={"poll_hz": 200},
            extra_toml=cloud_toml(broker.host, broker.port),
        )
        with tb:
            tb.start_sim()
            tb.start_daemon()
            wait_for(lambda: sync_status(tb).get("connected"), 15, "the gate connecting")
            for lane in ("L1", "L2"):
                assert tb.ctl({"cmd": "hold_open", "lane": lane, "on": True})["ok"]
            sub = Subscriber(broker, site, None, timeout_s=seconds + 120, kinds=("free_passage",))
            try:
                crowds = [Crowd(tb, channel, CROWD_STEP_S, CROWD_GAP_S) for channel in (1, 2)]
                t0 = time.monotonic()
                for crowd in crowds:
                    crowd.start()
                time.sleep(seconds)
                for crowd in crowds:
                    crowd.halt.set()
                for crowd in crowds:
                    crowd.join(60)
                took = time.monotonic() - t0
                wait_for(
                    lambda: (
                        (s := sync_status(tb))["outbox_depth"] == 0
                        and s["uplink"]["inflight_messages"] == 0
                    ),
                    60,
                    "the outbox drained",
                    0.05,
                )
                time.sleep(0.5)
                got = sub.result(30, stop=True)
            finally:
                sub.kill()
    passed = sum(crowd.passed for crowd in crowds)
    ok, _ = got["check"]
    assert ok and len(got["latency_ms"]) == passed, (got["check"], len(got["latency_ms"]), passed)
    info(
        f"daemon latency: {passed} passages on 2 held-open lanes in {took:.1f} s "
        f"({passed / took:.0f}/s), poll_hz 200, {got['messages']} events messages; "
        f"from the event's ts (set when the lane reports the passage) to receipt; "
        f"load {load1():.2f}"
    )
    latency_figures("event_latency_daemon", got)


# --- downlink to the real daemon with 1,000,000 tickets cached ------------------------------


PRODUCTS = [
    {"type": "product", "id": "day", "zones": {"park": 1}},
    {"type": "product", "id": "combo", "zones": {"park": 1, "cable": 1}},
    {"type": "product", "id": "season", "zones": {"park": None}, "reentry": {"mode": "always"}},
]


def code_of(i: int) -> str:
    return f"QR{i:08d}X{i * 7919 % 100000:05d}"


def build_cache(path: Path, n: int, now: float) -> float:
    """The gate's cache with ``n`` tickets at version 1, written before the daemon starts."""
    t0 = time.monotonic()
    with Cache(path, policy=Policy()) as cache:
        cache.import_records(PRODUCTS)
        if n:
            result = cache.apply_snapshot(1, ticket_chunks(n, now))
            assert result.status == "applied" and result.tickets == n, result
    return time.monotonic() - t0


def sync_status(tb: Testbed) -> dict[str, Any]:
    reply = request(tb.ctl_socket, {"cmd": "sync_status"}, timeout_s=10)
    sync: dict[str, Any] = reply.get("sync", {})
    return sync


def tickets_version(tb: Testbed) -> int:
    return int(sync_status(tb)["versions"]["tickets"])


class Daemon:
    """The testbed's daemon on a fresh broker, its cloud connected."""

    def __init__(self, tb: Testbed, work: Path) -> None:
        self.tb = tb
        self.broker = LocalBroker(work)
        self.cloud: ReferenceCloud | None = None

    def __enter__(self) -> ReferenceCloud:
        self.broker.start()
        try:
            self.tb.extra_toml = cloud_toml(self.broker.host, self.broker.port)
            self.cloud = reference_cloud(self.broker, self.tb.site_id)
            self.cloud.start()
            self.tb.start_daemon()
            wait_for(lambda: sync_status(self.tb).get("connected"), 15, "the gate connecting")
        except BaseException:
            self.__exit__()
            raise
        return self.cloud

    def __exit__(self, *exc: object) -> None:
        try:
            self.tb.stop_daemon()
        finally:
            if self.cloud is not None:
                self.cloud.stop()
            self.broker.close()


def delta_records(n: int, existing: int, now: float, version: int) -> list[dict[str, Any]]:
    """Half new tickets, half changes to cached ones (a day's sales and corrections)."""
    ids = [i for i in range(existing - n // 2, existing)] if existing >= n // 2 else []
    ids += list(range(existing, existing + n - len(ids)))
    return [
        {
            "id": f"T{i:08d}",
            "code": code_of(i),
            "channel": "ota",
            "product_id": "day",
            "valid_from": now - 86400,
            "valid_to": now + 60 * 86400,
            "max_entries_total": 2,
            "version": version,
        }
        for i in ids
    ]


def bench_delta(tb: Testbed, work: Path, cached: int, now: float) -> None:
    with Daemon(tb, work / "broker-delta") as cloud:
        have = tickets_version(tb)
        records = delta_records(DELTA, cached, now, have + 1)
        t0 = time.monotonic()
        cloud.tickets_delta(have, have + 1, records)
        sent = time.monotonic()
        wait_for(lambda: tickets_version(tb) == have + 1, 120, "the delta in force", 0.005)
        took = time.monotonic() - t0
        size = len(json.dumps(records))
        assert tb.daemon_proc is not None
        info(
            f"delta: {DELTA} tickets ({size / 1e6:.1f} MB of records) onto {cached} cached, "
            f"signed+published in {sent - t0:.3f} s, load {load1():.2f}"
        )
        suffix = "" if cached >= 1_000_000 else f"_{cached}_cached"
        emit(f"delta_10k_apply_s{suffix}", took, "s")
        code = code_of(cached + 1)
        reply = tb.ctl({"cmd": "cache_lookup", "lane": "L1", "code": code})
        assert reply["decision"]["reason"] == "ok", reply


def lookups(args: dict[str, Any]) -> int:
    """``cache_lookup`` at a steady rate until a line arrives on stdin; prints the samples.

    A process of its own: in the bench's process the cloud's signing and JSON encoding of
    megabyte chunks would hold the GIL and delay the requests, not the gate.
    """
    sock, hz = Path(args["socket"]), args["hz"]
    rng = random.Random(7)
    codes = [code_of(rng.randrange(args["tickets"])) for _ in range(2000)]
    halt = threading.Event()

    def listen() -> None:
        sys.stdin.readline()
        halt.set()

    threading.Thread(target=listen, daemon=True).start()
    samples: list[tuple[float, float, bool]] = []
    print("ready", flush=True)
    start = time.monotonic()
    i = 0
    while not halt.is_set():
        due = start + i / hz
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        t = time.monotonic()
        req = {"cmd": "cache_lookup", "lane": "L1", "code": codes[i % len(codes)]}
        try:
            ok = request(sock, req).get("decision", {}).get("reason") == "ok"
        except OSError:
            ok = False
        samples.append((t, (time.monotonic() - t) * 1000, ok))
        i += 1
    print(json.dumps(samples), flush=True)
    return 0


class Lookups:
    """The lookups process, started and read from the bench."""

    def __init__(self, tb: Testbed, tickets: int) -> None:
        args = {"socket": str(tb.ctl_socket), "hz": LOOKUP_HZ, "tickets": tickets}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench_cloud", "--lookups", json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the lookups process did not start")
        self.samples: list[tuple[float, float, bool]] = []

    def stop(self) -> None:
        out, _ = self.proc.communicate("stop\n", timeout=30)
        rows = json.loads(out.strip().splitlines()[-1])
        self.samples = [(float(t), float(ms), bool(ok)) for t, ms, ok in rows]

    def between(self, a: float, b: float) -> list[float]:
        return [ms for t, ms, _ in self.samples if a <= t <= b]

    @property
    def failed(self) -> int:
        return sum(1 for _, _, ok in self.samples if not ok)


class Crowd(threading.Thread):
    """People walking through a held-open lane, 10 at a time, until halted."""

    def __init__(self, tb: Testbed, channel: int, step_s: float, gap_s: float) -> None:
        super().__init__(name=f"crowd-{channel}", daemon=True)
        self.sim = SimClient(str(tb.sim_socket))
        self.channel = channel
        self.step_s = step_s
        self.gap_s = gap_s
        self.passed = 0
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.passed += self.sim.crowd(
                    self.channel, 10, step_s=self.step_s, gap_s=self.gap_s
                )
        finally:
            self.sim.close()


def verified(tb: Testbed) -> int:
    """Tickets messages the gate has verified and handed on (sync_status)."""
    return int(sync_status(tb)["downlink_applied"].get("tickets", 0))


def send_snapshot(
    cloud: ReferenceCloud,
    tb: Testbed,
    version: int,
    n: int,
    now: float,
    chunk: int,
    window: int | None,
) -> int:
    """ReferenceCloud.snapshot's messages, generated chunk by chunk rather than held in full.

    ``window``: publish a chunk only while at most that many are unverified at the gate.
    """
    count = -(-n // chunk)
    snap = uuid.uuid4().hex
    topic = cloud.topics("all")["tickets"]
    base = verified(tb)
    index = 0
    for block in ticket_chunks(n, now):
        for rec in block:
            rec["version"] = version
        for i in range(0, len(block), chunk):
            if window is not None:
                target = base + index - window

                def caught_up(target: int = target) -> bool:
                    return verified(tb) >= target

                wait_for(caught_up, 120, "the gate verifying", 0.01)
            body = {
                "op": "snapshot",
                "snapshot": snap,
                "version": version,
                "index": index,
                "count": count,
                "tickets": block[i : i + chunk],
            }
            cloud.send(topic, body)
            index += 1
    return count


def applied(tb: Testbed, version: int) -> bool:
    """True once ``version`` of the tickets is in force; raises if the gate gave up on it."""
    sync = sync_status(tb)
    if sync["versions"]["tickets"] == version:
        return True
    failed = {k: n for k, n in sync["downlink_rejected"].items() if k != "replayed"}
    if failed:
        raise RuntimeError(f"the gate refused part of the snapshot: {failed}")
    return False


def bench_snapshot(
    tb: Testbed, work: Path, cached: int, now: float, chunk: int, window: int | None, name: str
) -> None:
    how = f"{chunk} per chunk, " + (
        f"at most {window} chunks unverified at the gate" if window else "as fast as it can"
    )
    with Daemon(tb, work / f"broker-{name}") as cloud:
        assert tb.daemon_proc is not None
        pid = tb.daemon_proc.pid
        have = tickets_version(tb)
        assert tb.ctl({"cmd": "hold_open", "lane": "L2", "on": True})["ok"]
        lookups = Lookups(tb, cached)
        crowd = Crowd(tb, 2, 0.01, 0.05)
        crowd.start()
        failure = None
        try:
            time.sleep(3)
            t0 = time.monotonic()
            chunks = send_snapshot(cloud, tb, have + 1, cached, now, chunk, window)
            sent = time.monotonic()
            try:
                wait_for(lambda: applied(tb, have + 1), 600, "the snapshot in force", 0.05)
            except RuntimeError as exc:
                failure = str(exc)
            t1 = time.monotonic()
            time.sleep(2)
        finally:
            lookups.stop()
            crowd.halt.set()
            crowd.join(60)
        rss = rss_peak_mb(pid)
        status = sync_status(tb)
        before = lookups.between(0, t0)
        during = lookups.between(t0, t1)
        info(
            f"{name}: {cached} tickets in {chunks} chunks ({how}), published in "
            f"{sent - t0:.1f} s; {len(during)} lookups during the apply "
            f"({lookups.failed} not ok), {crowd.passed} passages on L2; daemon peak RSS "
            f"{rss:.0f} MB; rejected {status['downlink_rejected']}; load {load1():.2f}"
        )
        info(
            f"{name}: lookup round trip before the snapshot p50 {statistics.median(before):.2f} "
            f"ms, p99 {pct(before, 99):.2f} ms"
        )
        if failure is not None:
            info(f"{name}: NOT APPLIED after {t1 - t0:.1f} s: {failure}")
            emit(f"{name}_refused", sum(status["downlink_rejected"].values()), "messages")
            return
        assert tb.status()["cache"]["tickets"] == cached
        # Where in the apply the slow lookups fall (tenths of the apply time): the streaming
        # chunks, or the final index build and swap.
        tenths = [
            lookups.between(t0 + k * (t1 - t0) / 10, t0 + (k + 1) * (t1 - t0) / 10)
            for k in range(10)
        ]
        info(
            f"{name}: lookup p99 by tenth of the apply: "
            + " ".join(f"{pct(x, 99):.1f}" if x else "-" for x in tenths)
        )
        emit(f"{name}_apply_s", t1 - t0, "s")
        emit(f"{name}_decide_p50_ms", statistics.median(during), "ms")
        emit(f"{name}_decide_p99_ms", pct(during, 99), "ms")
        emit(f"{name}_decide_max_ms", max(during), "ms")


def bench_downlink(work: Path, cached: int, only: set[str]) -> None:
    now = time.time()
    tb = Testbed(work / "gate", fail_states=("open", "open"), site_id=unique_site())
    built = build_cache(tb.state_dir / "gate.db", cached, now)
    info(f"cache with {cached} tickets built in {built:.1f} s (before the daemon starts)")
    with tb:
        tb.start_sim()
        if "delta" in only:
            bench_delta(tb, work, cached, now)
        if "snapshot" in only:
            name = "snapshot_1m" if cached == 1_000_000 else f"snapshot_{cached}"
            # As ReferenceCloud.snapshot sends it: every chunk at once.
            bench_snapshot(tb, work, cached, now, SNAPSHOT_CHUNK, None, f"{name}_unpaced")
            # Paced by what the gate has verified, as MQTT flow control would.
            bench_snapshot(tb, work, cached, now, SNAPSHOT_CHUNK, WINDOW, name)
            bench_snapshot(tb, work, cached, now, SMALL_CHUNK, WINDOW, f"{name}_chunk{SMALL_CHUNK}")


SCENARIOS = ("drain", "latency", "daemon-latency", "delta", "snapshot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_cloud", description=__doc__)
    parser.add_argument("--only", action="append", choices=SCENARIOS, help="repeatable")
    parser.add_argument("--tickets", type=int, default=1_000_000, help="cached for the downlink")
    parser.add_argument("--latency-s", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3, help="drain runs per setting")
    parser.add_argument("--workdir", type=Path, help="keep logs and databases here")
    parser.add_argument("--subscriber", help=argparse.SUPPRESS)
    parser.add_argument("--lookups", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.subscriber:
        return subscriber(json.loads(args.subscriber))
    if args.lookups:
        return lookups(json.loads(args.lookups))
    only = set(args.only or SCENARIOS)
    info(f"1-min load at start {load1():.2f}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="gate-cloud-bench-") as d:
        work = args.workdir or Path(d)
        if "drain" in only:
            bench_drain(work / "drain", args.repeats)
        if "latency" in only:
            bench_latency(work / "latency", args.latency_s)
        if "daemon-latency" in only:
            bench_daemon_latency(work / "daemon-latency", args.latency_s)
        if only & {"delta", "snapshot"}:
            bench_downlink(work / "downlink", args.tickets, only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
