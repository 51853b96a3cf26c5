"""Cloud sync for the daemon: the MQTT link, the uplink, and signed downlink applied.

Nothing here is on the safety path: lanes, the safety monitor and admission never wait on
it. Downlink messages are verified on a worker thread (a large snapshot chunk takes
milliseconds to parse) and applied through the cache's snapshot/delta API or the daemon's
own command path, so a command from the cloud does exactly what the same gatectl command does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.cloud import worker
from agent.cloud.contract import (
    BlocklistDelta,
    BlocklistReplace,
    FacesBody,
    KeysBody,
    ResyncCmd,
    TicketsDelta,
    TicketsSnapshot,
    down_topics,
    up_topic,
)
from agent.cloud.mqtt import Incoming, LinkListener, LinkSettings, MqttLink
from agent.cloud.signing import Anchor, DownlinkVerifier, Rejected, Verified
from agent.cloud.uplink import Uplink
from agent.config import CloudConfig
from offline_cache import Cache, ValidatedChunk

log = logging.getLogger(__name__)

DOWNLINK_WINDOW = 4
SNAPSHOT_CHUNK_TIMEOUT_S = 120.0
_END = object()


class Hooks(Protocol):
    """What the cloud may ask of the daemon (all called on the event loop)."""

    def run_command(self, req: dict[str, Any], origin: str) -> dict[str, Any]: ...
    def lane_states(self) -> list[dict[str, Any]]: ...
    def emergency(self) -> bool: ...
    def set_issuer_keys(self, keys: list[dict[str, Any]]) -> None: ...
    def lane_counts(self) -> dict[str, dict[str, dict[str, int]]]: ...


@dataclass
class _Snapshot:
    """A ticket snapshot arriving chunk by chunk, applied by a thread as chunks come."""

    snapshot: str
    version: int
    count: int
    next_index: int
    chunks: queue.Queue[Any]
    thread: threading.Thread
    last_chunk_at: float
    complete: bool = False
    """Every chunk is in; the apply thread may still be writing and swapping."""
    held: list[TicketsDelta] = field(default_factory=list)
    """Deltas on top of this snapshot that arrived while it streamed in."""
    abandoned: threading.Event = field(default_factory=threading.Event)

    def put(self, item: object) -> bool:
        """Hand the apply thread a chunk (or _END); blocks while it has two waiting. False if
        the snapshot was abandoned or its thread has ended."""
        while not self.abandoned.is_set():
            try:
                self.chunks.put(item, timeout=0.5)
                return True
            except queue.Full:
                if not self.thread.is_alive():
                    return False
        return False

    def abandon(self) -> None:
        self.abandoned.set()
        # Wake the apply thread if it waits for a chunk; if the queue is full it is busy and
        # sees the flag at its next chunk.
        with contextlib.suppress(queue.Full):
            self.chunks.put_nowait(None)


def read_secret(path: Path) -> str:
    """A password from a file (first line, without the newline)."""
    return path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""


def link_settings(
    cfg: CloudConfig, site: str, gate: str, key_path: Callable[[Path], Path]
) -> LinkSettings:
    """LinkSettings from the ``[cloud]`` config; credential files are read here, once."""
    password = read_secret(key_path(cfg.password_file)) if cfg.password_file else None
    return LinkSettings(
        host=cfg.host,
        port=cfg.port,
        client_id=cfg.client_id or f"gate-{site}-{gate}",
        protocol=cfg.protocol,
        tls=cfg.tls,
        ca_file=cfg.ca_file,
        cert_file=cfg.cert_file,
        key_file=key_path(cfg.key_file) if cfg.key_file else None,
        username=cfg.username,
        password=password,
        keepalive_s=cfg.keepalive_s,
        session_expiry_s=cfg.session_expiry_s,
        connect_timeout_s=cfg.connect_timeout_s,
        reconnect_min_s=cfg.reconnect_min_s,
        reconnect_max_s=cfg.reconnect_max_s,
        max_packet_bytes=max(cfg.max_message_bytes * 2, 16 * 1024 * 1024),
        # Flow control: the broker sends at most a few messages ahead, and the gate
        # acknowledges each only once it has handled it, so nothing is acknowledged and then
        # dropped, however fast the cloud sends.
        manual_ack=True,
        receive_maximum=DOWNLINK_WINDOW,
    )


class CloudSync(LinkListener):
    """Keeps one gate in sync with its site cloud."""

    def __init__(
        self,
        cfg: CloudConfig,
        site: str,
        gate: str,
        cache: Cache,
        hooks: Hooks,
        settings: LinkSettings,
        *,
        agent_version: str,
        config_digest: str,
    ) -> None:
        self.cfg = cfg
        self.site = site
        self.gate = gate
        self.cache = cache
        self.hooks = hooks
        self.agent_version = agent_version
        self.config_digest = config_digest
        self.topics = down_topics(site, gate)
        self.verifier = DownlinkVerifier(
            [
                Anchor(bytes.fromhex(a.public_key), a.not_before, a.not_after)
                for a in cfg.trust_anchors
            ],
            self.topics,
            max_bytes=cfg.max_message_bytes,
            max_lifetime_s=cfg.max_lifetime_s,
        )
        self.header = {"site": site, "gate": gate}
        self.link = MqttLink(
            settings,
            self,
            list(self.topics.values()),
            will=lambda: (
                up_topic(site, gate, "status"),
                self._status_message("offline", reason="lost"),
            ),
        )
        self.uplink = Uplink(
            cache.path,
            up_topic(site, gate, "events"),
            self.header,
            self.link.publish,
            cache.mark_sent,
            lambda: cache.outbox_range,
            batch_events=cfg.batch_events,
            batch_bytes=cfg.batch_bytes,
            inflight=cfg.inflight,
        )
        self.rejected: Counter[str] = Counter()
        self.applied: Counter[str] = Counter()
        self.duplicates = 0
        self.last_contact: float | None = None
        self.last_connected_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: asyncio.Queue[tuple[int, Incoming]] | None = None
        self._snapshot: _Snapshot | None = None
        self._publish_status = asyncio.Event()
        self._last_counts: dict[str, dict[str, dict[str, int]]] = {}
        self._keys_version = 0
        self._warned_faces = False
        self._background: set[asyncio.Task[None]] = set()
        self._pool: ProcessPoolExecutor | None = None

    # --- link listener: called on the link thread -----------------------------------------

    def connected(self, conn: int, session_present: bool) -> None:
        self.uplink.connected(conn)
        self._call(self._on_connected)

    def disconnected(self, conn: int, reason: str) -> None:
        self.uplink.disconnected(conn)

    def acked(self, conn: int, mid: int, ok: bool) -> None:
        self.uplink.acked(conn, mid, ok)
        self.last_contact = time.time()

    def message(self, conn: int, msg: Incoming) -> None:
        self._call(self._enqueue, conn, msg)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            # A RuntimeError means the loop closed under us: the daemon is stopping.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    # --- event loop -----------------------------------------------------------------------

    def _on_connected(self) -> None:
        self.last_contact = self.last_connected_at = time.time()
        self._publish_status.set()

    def _enqueue(self, conn: int, msg: Incoming) -> None:
        assert self._inbox is not None
        self.last_contact = time.time()
        # Unbounded on our side: the broker's Receive Maximum bounds what is in flight.
        self._inbox.put_nowait((conn, msg))

    async def run(self) -> None:
        """Run until cancelled; never raises into the daemon."""
        self._loop = asyncio.get_running_loop()
        self._inbox = asyncio.Queue()
        self._keys_version = int(self.cache.state("keys_version", 0) or 0)
        # Started now (a pool starts its process at the first task), so that its imports are
        # done before the first snapshot arrives.
        self._pool = self._start_worker()
        self._pool.submit(worker.ready)
        self.cache.watch_outbox(self.uplink.wake)
        self.uplink.start()
        self.link.start()
        tasks = [
            asyncio.create_task(self._downlink(), name="cloud-downlink"),
            asyncio.create_task(self._periodic(), name="cloud-status"),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Say offline (retained), disconnect, stop the uplink."""
        self.cache.watch_outbox(None)
        final = (
            up_topic(self.site, self.gate, "status"),
            self._status_message("offline", reason="shutdown"),
        )
        await asyncio.to_thread(self.link.stop, final)
        await asyncio.to_thread(self.uplink.stop)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._snapshot is not None:
            self._snapshot.abandon()

    def sync_now(self) -> None:
        self.link.retry_now()
        self.uplink.wake()
        self._publish_status.set()

    async def _periodic(self) -> None:
        next_status = next_telemetry = time.monotonic()
        while True:
            try:
                async with asyncio.timeout(1.0):
                    await self._publish_status.wait()
            except TimeoutError:
                pass
            now = time.monotonic()
            try:
                if self._publish_status.is_set() or now >= next_status:
                    self._publish_status.clear()
                    self._publish(
                        up_topic(self.site, self.gate, "status"),
                        self._status_message("online"),
                        retain=True,
                    )
                    next_status = now + self.cfg.status_interval_s
                if now >= next_telemetry:
                    self._publish_telemetry()
                    next_telemetry = now + self.cfg.telemetry_interval_s
                self._check_snapshot_stalled()
            except Exception:
                log.exception("cloud: status/telemetry step failed")

    def _publish(self, topic: str, body: bytes, *, retain: bool = False) -> bool:
        return self.link.publish(topic, body, qos=1, retain=retain) >= 0

    def _json(self, obj: dict[str, Any]) -> bytes:
        return json.dumps({"v": 1, **self.header, **obj}, separators=(",", ":")).encode()

    def _status_message(self, state: str, *, reason: str | None = None) -> bytes:
        msg: dict[str, Any] = {
            "state": state,
            "at": round(time.time(), 3),
            "agent_version": self.agent_version,
        }
        if reason is not None:
            msg["reason"] = reason
        if state == "online":
            versions = self.cache.versions()
            versions["keys"] = self._keys_version
            anchor, committed = self.cache.outbox_range
            stats = self.cache.stats()["outbox"]
            msg.update(
                versions=versions,
                config=self.config_digest,
                lanes=[
                    {"id": lane["lane"], "mode": lane["mode"]} for lane in self.hooks.lane_states()
                ],
                emergency=self.hooks.emergency(),
                downlink_rejected=dict(self.rejected),
                outbox={
                    "depth": committed - anchor,
                    "oldest_age_s": stats["oldest_age_s"],
                    "last_seq": committed,
                },
            )
        return self._json(msg)

    def _publish_telemetry(self) -> None:
        counts = self.hooks.lane_counts()
        lanes: dict[str, Any] = {}
        for lane, groups in counts.items():
            before = self._last_counts.get(lane, {})
            lanes[lane] = {
                group: {
                    k: n - before.get(group, {}).get(k, 0)
                    for k, n in values.items()
                    if n - before.get(group, {}).get(k, 0)
                }
                for group, values in groups.items()
            }
        self._last_counts = counts
        body = self._json(
            {
                "at": round(time.time(), 3),
                "interval_s": self.cfg.telemetry_interval_s,
                "lanes": lanes,
                "zones": self.cache.zones(),
            }
        )
        self._publish(up_topic(self.site, self.gate, "telemetry"), body)

    def _request_resync(self, kind: str, reason: str) -> None:
        have = self._keys_version if kind == "keys" else self.cache.versions().get(kind, 0)
        body = self._json(
            {"kind": kind, "have": have, "reason": reason, "at": round(time.time(), 3)}
        )
        self._publish(up_topic(self.site, self.gate, "resync"), body)
        log.info("cloud: asked for %s from version %d (%s)", kind, have, reason)

    # --- downlink -------------------------------------------------------------------------

    async def _downlink(self) -> None:
        assert self._inbox is not None
        while True:
            conn, msg = await self._inbox.get()
            try:
                await self._handle(msg)
            except Exception:
                # A bug in applying one message must not end the downlink for good.
                self.rejected["error"] += 1
                log.exception("cloud: downlink message on %s could not be applied", msg.topic)
            # Handled (applied, refused or failed): only now may the broker forget it.
            self.link.ack(conn, msg)

    async def _handle(self, msg: Incoming) -> None:
        now = time.time()
        chunk: ValidatedChunk | None = None
        try:
            if msg.topic == self.topics["tickets"]:
                verified, chunk = await self._check_in_worker(msg, now)
            else:
                verified = await asyncio.to_thread(
                    self.verifier.verify, msg.topic, msg.payload, now
                )
        except Rejected as rej:
            self.rejected[rej.reason] += 1
            # Never the payload: it may be anything anyone sent.
            log.warning("cloud: refused a message on %s: %s", msg.topic, rej)
            return
        fresh = await asyncio.wrap_future(
            self.cache.remember_nonce(verified.nonce, verified.exp, now)
        )
        if not fresh:
            if msg.retain or msg.dup:
                # A retained message is handed out on every connect, and one we handled but
                # could not acknowledge before the link dropped comes again: not an attack.
                self.duplicates += 1
                return
            self.rejected["replayed"] += 1
            log.warning("cloud: refused a replayed message on %s", msg.topic)
            return
        if verified.iat > (self.cache.cloud_time or 0.0):
            self.cache.set_cloud_time(verified.iat)
        self.applied[verified.kind] += 1
        await self._apply(verified, chunk)

    async def _check_in_worker(
        self, msg: Incoming, now: float
    ) -> tuple[Verified, ValidatedChunk | None]:
        """Verify (and validate a snapshot chunk) in the worker process; in a thread if the
        worker is gone (it is started again for the next message)."""
        pool = self._pool
        if pool is None:
            pool = self._pool = self._start_worker()
        try:
            checked = await asyncio.get_running_loop().run_in_executor(
                pool, worker.check, msg.topic, msg.payload, now
            )
        except BrokenProcessPool:
            log.error("cloud: the verification worker died; verifying in the daemon")
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            return await asyncio.to_thread(self.verifier.verify, msg.topic, msg.payload, now), None
        return checked.verified, checked.chunk

    def _start_worker(self) -> ProcessPoolExecutor:
        key, utc_offset_s = self.cache.validation_settings()
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.init,
            initargs=(
                self.verifier.anchor_list(),
                self.topics,
                self.cfg.max_message_bytes,
                self.cfg.max_lifetime_s,
                key,
                utc_offset_s,
                os.getpid(),
            ),
        )

    async def _apply(self, v: Verified, chunk: ValidatedChunk | None = None) -> None:
        body = v.body
        if v.kind in ("cmd", "all_cmd"):
            await self._command(v)
        elif isinstance(body, TicketsDelta):
            snap = self._snapshot
            if snap is not None and body.kind == "tickets" and body.from_version >= snap.version:
                # Built on the snapshot still arriving: applying it now to the old tickets
                # would be a gap, and the swap would lose it. Apply it after the swap.
                snap.held.append(body)
                return
            await self._delta(
                body.kind, body.from_version, body.to_version, body.upserts, body.deletes
            )
        elif isinstance(body, TicketsSnapshot):
            await self._snapshot_chunk(body, chunk)
        elif isinstance(body, BlocklistDelta):
            await self._delta(
                "blocks", body.from_version, body.to_version, body.upserts, body.deletes
            )
        elif isinstance(body, BlocklistReplace):
            current = self.cache.versions()["blocks"]
            if body.version <= current:
                self.duplicates += 1
                return
            replaced = await asyncio.wrap_future(
                self.cache.apply_delta(
                    current, body.version, body.blocks, kind="blocks", replace_all=True
                )
            )
            log.info("cloud: blocklist v%d %s", body.version, replaced.status)
            self._publish_status.set()
        elif isinstance(body, KeysBody):
            self._keys(body)
        elif isinstance(body, FacesBody):
            if not self._warned_faces:
                log.warning("cloud: face enrolment received but faces are not enabled on this gate")
                self._warned_faces = True
            self.rejected["unsupported"] += 1

    async def _delta(
        self, kind: str, from_v: int, to_v: int, upserts: list[dict[str, Any]], deletes: list[Any]
    ) -> None:
        if to_v <= from_v:
            self.rejected["invalid_body"] += 1
            return
        result = await asyncio.wrap_future(
            self.cache.apply_delta(from_v, to_v, upserts, deletes, kind=kind)  # type: ignore[arg-type]
        )
        if result.status == "gap":
            self._request_resync(kind, "gap")
        elif result.rejected:
            log.warning(
                "cloud: %s delta %d->%d: %d records rejected", kind, from_v, to_v, result.rejected
            )
            # The version moved on without those records: tell the cloud, which holds them.
            self._request_resync(kind, "rejected")
        self._publish_status.set()

    def _keys(self, body: KeysBody) -> None:
        if body.version <= self._keys_version:
            self.duplicates += 1
            return
        keys = [k.model_dump() for k in body.keys]
        self.hooks.set_issuer_keys(keys)
        self.cache.save_state("cloud_keys", json.dumps(keys))
        self.cache.save_state("keys_version", body.version)
        self._keys_version = body.version
        log.info("cloud: issuer keys version %d in force (%d keys)", body.version, len(keys))
        self._publish_status.set()

    async def _command(self, v: Verified) -> None:
        cmd = v.body
        name = cmd.cmd
        origin = f"cloud:{v.nonce[:12]}"
        # Every command goes through the daemon, which audits it like a gatectl command.
        reply = self.hooks.run_command(cmd.model_dump(), origin)
        if isinstance(cmd, ResyncCmd) and reply.get("ok"):
            for kind in cmd.kinds:
                self._request_resync(kind, "command")
        ack = {
            "nonce": v.nonce,
            "cmd": name,
            "ok": bool(reply.get("ok")),
            "at": round(time.time(), 3),
        }
        if not reply.get("ok"):
            ack["error"] = reply.get("error")
            ack["message"] = reply.get("message")
        self._publish(up_topic(self.site, self.gate, "cmd/ack"), self._json(ack))
        log.info("cloud: command %s -> %s", name, "ok" if reply.get("ok") else reply.get("error"))

    async def _snapshot_chunk(
        self, chunk: TicketsSnapshot, rows: ValidatedChunk | None = None
    ) -> None:
        snap = self._snapshot
        streaming = snap is not None and not snap.complete
        if chunk.index == 0:
            if streaming:
                self._abandon("a new snapshot started")
            if chunk.version <= self.cache.versions()["tickets"]:
                self.duplicates += 1
                return
            if chunk.products is not None:
                current = self.cache.versions()["products"]
                target = chunk.products_version or current + 1
                if target > current:
                    await asyncio.wrap_future(
                        self.cache.apply_delta(
                            current, target, chunk.products, kind="products", replace_all=True
                        )
                    )
            snap = self._start_snapshot(chunk)
        elif (
            snap is None
            or not streaming
            or chunk.snapshot != snap.snapshot
            or chunk.index != snap.next_index
        ):
            if streaming and snap is not None:
                self._abandon(f"chunk {chunk.index} arrived, expected {snap.next_index}")
            else:
                self.rejected["snapshot_out_of_order"] += 1
            return
        # The queue holds two chunks: waiting here holds back the acknowledgement, and so the
        # broker, while the apply thread writes (memory stays flat, however big the snapshot).
        if not await asyncio.to_thread(snap.put, rows if rows is not None else chunk.tickets):
            return
        snap.next_index = chunk.index + 1
        snap.last_chunk_at = time.monotonic()
        if snap.next_index == snap.count:
            snap.complete = True
            await asyncio.to_thread(snap.put, _END)

    def _after_snapshot(self, snap: _Snapshot) -> None:
        """On the loop, once the apply thread is done: apply the deltas held meanwhile."""
        if self._snapshot is snap:
            self._snapshot = None
        if snap.held:
            held = list(snap.held)

            async def apply_held() -> None:
                for d in held:
                    await self._delta(d.kind, d.from_version, d.to_version, d.upserts, d.deletes)

            task = asyncio.get_running_loop().create_task(apply_held())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        self._publish_status.set()

    def _start_snapshot(self, first: TicketsSnapshot) -> _Snapshot:
        chunks: queue.Queue[Any] = queue.Queue(maxsize=2)

        def feed() -> Iterator[list[dict[str, Any]]]:
            while True:
                item = chunks.get()
                if item is None or snap.abandoned.is_set():
                    raise RuntimeError("snapshot abandoned")
                if item is _END:
                    return
                yield item

        def apply() -> None:
            try:
                result = self.cache.apply_snapshot(first.version, feed())
            except Exception as exc:
                log.warning("cloud: snapshot %s not applied: %s", first.snapshot, exc)
                self._call(self._request_resync, "tickets", "snapshot_incomplete")
                self._call(self._after_snapshot, snap)
                return
            log.info(
                "cloud: snapshot v%d %s (%d tickets)", result.version, result.status, result.tickets
            )
            if result.status == "rejected":
                self._call(self._request_resync, "tickets", "rejected")
            self._call(self._after_snapshot, snap)

        thread = threading.Thread(target=apply, name="cloud-snapshot", daemon=True)
        snap = _Snapshot(
            first.snapshot, first.version, first.count, 0, chunks, thread, time.monotonic()
        )
        self._snapshot = snap
        thread.start()
        return snap

    def _abandon(self, why: str) -> None:
        snap = self._snapshot
        if snap is None:
            return
        self._snapshot = None
        self.rejected["snapshot_incomplete"] += 1
        log.warning("cloud: snapshot %s abandoned: %s", snap.snapshot, why)
        snap.abandon()

    def _check_snapshot_stalled(self) -> None:
        snap = self._snapshot
        if (
            snap is not None
            and not snap.complete
            and time.monotonic() - snap.last_chunk_at > SNAPSHOT_CHUNK_TIMEOUT_S
        ):
            self._abandon("no chunk for too long")

    # --- gatectl sync status --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        anchor, committed = self.cache.outbox_range
        versions = self.cache.versions()
        versions["keys"] = self._keys_version
        return {
            "enabled": True,
            "broker": f"{self.cfg.host}:{self.cfg.port}",
            "connected": self.link.connected,
            "last_error": self.link.last_error,
            "last_contact": self.last_contact,
            "last_connected_at": self.last_connected_at,
            "connects": self.link.connects,
            "disconnects": self.link.disconnects,
            "outbox_depth": committed - anchor,
            "oldest_unsent_age_s": self.cache.stats()["outbox"]["oldest_age_s"],
            "versions": versions,
            "uplink": self.uplink.stats(),
            "downlink_applied": dict(self.applied),
            "downlink_rejected": dict(self.rejected),
            "downlink_duplicates": self.duplicates,
            "snapshot_in_progress": self._snapshot.snapshot if self._snapshot else None,
        }


def config_digest(path: Path | None) -> str:
    """First 16 hex digits of the config file's SHA-256 (shown in status)."""
    if path is None:
        return ""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return ""
