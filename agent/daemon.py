"""The gate daemon: wires buses, lanes, the safety monitor, the event store and the socket.

Task layout on one asyncio loop:
- one bus owner per field bus (polls inputs, writes coils and heartbeats);
- the safety monitor (emergency/fire inputs, obstruction, link loss) fed by the buses;
- one runner per lane (timers), plus the control socket and the systemd notifier.
Safety never waits on anything else: the monitor steps lanes synchronously and the bus
owners write the resulting coils at once; events go to a writer thread.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from agent import __version__
from agent.admission import Admission, decision_dict
from agent.cloud.service import CloudSync, config_digest, link_settings
from agent.config import ConfigError, ModbusTcpBusConfig, Site, load_config
from agent.control import ControlServer, Peer
from agent.gate.core import Direction, HoldOpen, Kind, Lockout, Report, shutdown_outputs
from agent.gate.monitor import SafetyMonitor
from agent.lane import LaneRunner
from agent.notify import Notifier, watchdog_interval
from agent.readers import LaneReaders, make_reader
from drivers.base import BoardSnapshot
from drivers.modbus import BoardSpec, BusSettings, ModbusBus, RtuLink, TcpLink
from offline_cache import Cache, load_site_key
from verify.model import Policy, ReentryPolicy
from verify.token import KeyRing, TrustedKey, kid_for

log = logging.getLogger(__name__)

ALIVE_WITHIN_S = 1.0


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel tasks and wait until they have ended.

    A cancellation can be lost: Python 3.11's asyncio.wait_for (which libraries such as
    pymodbus use inside a request) swallows one that arrives just as its result does, and the
    task runs on. So a task still running after a moment is cancelled again.
    """
    for task in tasks:
        task.cancel()
    pending = {t for t in tasks if not t.done()}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=0.2)
        for task in pending:
            task.cancel()


def _key_ring(keys: list[dict[str, Any]]) -> KeyRing:
    """Trusted issuer keys (config entries or the cloud's) as a KeyRing."""
    return KeyRing(
        TrustedKey(
            kid_for(bytes.fromhex(k["public_key"])),
            bytes.fromhex(k["public_key"]),
            k["issuer"],
            k.get("not_before"),
            k.get("not_after"),
        )
        for k in keys
    )


def key_path(configured: Path) -> Path:
    """The site key file, or systemd's copy of it when the unit loads it as a credential.

    The key file is root-only and the daemon is not root: ``LoadCredential=site.key:PATH``
    lets systemd read it and hand the daemon a private copy in $CREDENTIALS_DIRECTORY.
    """
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        for name in (configured.name, "site.key"):
            candidate = Path(creds) / name
            if candidate.is_file():
                return candidate
    return configured


def _board_specs(site: Site) -> dict[str, list[BoardSpec]]:
    """Per bus: the boards on it with the address blocks their lanes and inputs use."""
    by_bus: dict[str, list[BoardSpec]] = {}
    lane_cfg = {lane.id: lane for lane in site.config.lanes}
    for board in site.config.boards:
        preset = site.presets[board.name]
        lanes = [io for lid, io in site.lane_io.items() if io.board == board.name]
        coils = [a for io in lanes for a in io.coils] or [0]
        inputs = [p.address for io in lanes for p in io.inputs]
        inputs += [p.address for _, p in site.safety_points.get(board.name, [])]
        inputs = inputs or [0]
        mask = 0
        for lid, io in site.lane_io.items():
            if io.board == board.name and lane_cfg[lid].fail_state == "open":
                mask |= 1 << (lane_cfg[lid].channel - 1)
        regs = preset.registers
        by_bus.setdefault(board.bus, []).append(
            BoardSpec(
                name=board.name,
                unit_id=board.unit_id,
                inputs=(min(inputs), max(inputs) - min(inputs) + 1),
                coils=(min(coils), max(coils) - min(coils) + 1),
                heartbeat_register=regs.heartbeat,
                watchdog_ms_register=regs.watchdog_ms,
                watchdog_ms=board.watchdog_ms,
                fail_open_mask_register=regs.fail_open_mask,
                fail_open_mask=mask,
            )
        )
    return by_bus


class Daemon:
    def __init__(
        self,
        site: Site,
        *,
        state_dir: Path | None = None,
        control_socket: Path | None = None,
        notifier: Notifier | None = None,
        config_path: Path | None = None,
    ) -> None:
        cfg = site.config
        self.site = site
        self.config_path = config_path
        self.exit_code = 0
        self.state_dir = state_dir or cfg.daemon.state_dir
        self.socket_path = control_socket or cfg.daemon.control_socket
        self.notifier = notifier or Notifier()
        adm = cfg.admission
        self.policy = Policy(
            slot_grace_before_s=adm.slot_grace_before_s,
            slot_grace_after_s=adm.slot_grace_after_s,
            reentry=ReentryPolicy(adm.reentry, adm.reentry_minutes),
            anti_passback=adm.anti_passback,
            clock_tolerance_s=adm.clock_tolerance_s,
            utc_offset_s=round(adm.utc_offset_hours * 3600),
        )
        site_key = load_site_key(key_path(adm.holder_key_file)) if adm.holder_key_file else None
        self.cache = Cache(
            self.state_dir / "gate.db",
            policy=self.policy,
            site_key=site_key,
            max_events=adm.max_events,
        )
        self.started_at = time.time()
        self._stop = asyncio.Event()

        def to_monitor(snap: BoardSnapshot) -> None:
            self.monitor.submit(snap)

        specs = _board_specs(site)
        self.buses: list[ModbusBus] = []
        handles = {}
        for bus_cfg in cfg.buses:
            link: TcpLink | RtuLink
            if isinstance(bus_cfg, ModbusTcpBusConfig):
                link = TcpLink(bus_cfg.host, bus_cfg.port)
            else:
                link = RtuLink(
                    bus_cfg.port,
                    bus_cfg.baudrate,
                    bus_cfg.parity,
                    bus_cfg.stopbits,
                    bus_cfg.bytesize,
                )
            settings = BusSettings(
                bus_cfg.name,
                link,
                bus_cfg.poll_hz,
                bus_cfg.timeout_s,
                bus_cfg.link_timeout_s,
                bus_cfg.reconnect_max_s,
            )
            bus = ModbusBus(settings, specs.get(bus_cfg.name, []), to_monitor)
            self.buses.append(bus)
            for spec in specs.get(bus_cfg.name, []):
                handles[spec.name] = bus.board(spec.name)

        self.lanes = {
            lane.id: LaneRunner(
                lane.id,
                site.lane_io[lane.id],
                lane.timing(),
                handles[lane.board],
                self.cache.append,
            )
            for lane in cfg.lanes
        }
        self.admission = Admission(
            self.cache,
            {lane.id: lane.zone for lane in cfg.lanes},
            self.policy,
            _key_ring([k.model_dump() for k in cfg.trusted_keys]),
        )
        for runner in self.lanes.values():
            runner.settle = self._settle
        self.readers = LaneReaders(self.admission)
        for lane in cfg.lanes:
            for i, rc in enumerate(lane.readers):
                reader = make_reader(lane.id, i, rc, site_key, adm.utc_offset_hours)
                self.readers.add(self.lanes[lane.id], rc.direction, reader)
        stale = max(b.link_timeout_s for b in cfg.buses) + 0.3
        self.monitor = SafetyMonitor(
            self.lanes.values(), site.safety_points, stale, time.monotonic, self._on_latch
        )
        self.control = ControlServer(self.socket_path, cfg.daemon.control_group, self.command)
        self.cloud: CloudSync | None = None
        if cfg.cloud is not None:
            self.cloud = CloudSync(
                cfg.cloud,
                cfg.site.id,
                cfg.site.gate_id,
                self.cache,
                self,
                link_settings(cfg.cloud, cfg.site.id, cfg.site.gate_id, key_path),
                agent_version=__version__,
                config_digest=config_digest(config_path),
            )

    # --- what the cloud may ask (agent.cloud.service.Hooks) --------------------------------

    def run_command(self, req: dict[str, Any], origin: str) -> dict[str, Any]:
        """A signed command from the cloud: the same path as gatectl's, audited likewise."""
        cmd = req.get("cmd")
        if cmd == "config_reload":
            reply = self._config_reload()
        elif cmd == "resync":
            reply = {"ok": True}  # the cloud link asks for the data; recorded here
        elif cmd == "zone_capacity":
            try:
                self.cache.set_zone_capacity(str(req.get("zone")), req.get("capacity"))
                reply = {"ok": True}
            except ValueError as exc:
                reply = {"ok": False, "error": "bad_request", "message": str(exc)}
        elif cmd in ("lockout", "hold_open") and req.get("lane") == "*":
            replies = [self._execute(cmd, {**req, "lane": lane}, origin) for lane in self.lanes]
            reply = next((r for r in replies if not r["ok"]), {"ok": True})
        else:
            reply = self._execute(cmd, req, origin)
        self._audit(req, reply, origin=origin)
        return reply

    def lane_states(self) -> list[dict[str, Any]]:
        return [lane.status() for lane in self.lanes.values()]

    def emergency(self) -> bool:
        return self.monitor.latch.latched

    def set_issuer_keys(self, keys: list[dict[str, Any]]) -> None:
        """Issuer keys pushed by the cloud, in force together with the config's."""
        configured = [k.model_dump() for k in self.site.config.trusted_keys]
        self.admission.keys = _key_ring(configured + keys)

    def lane_counts(self) -> dict[str, dict[str, dict[str, int]]]:
        counts: dict[str, dict[str, dict[str, int]]] = {
            lane_id: {"decisions": {}, "reports": dict(lane.counts)}
            for lane_id, lane in self.lanes.items()
        }
        for (lane_id, reason), n in self.admission.counts.items():
            counts[lane_id]["decisions"][reason] = n
        return counts

    def _config_reload(self) -> dict[str, Any]:
        if self.config_path is None:
            return {"ok": False, "error": "no_config_file", "message": "started without a file"}
        try:
            load_config(self.config_path)
        except ConfigError as exc:
            return {"ok": False, "error": "config_invalid", "message": "; ".join(exc.errors[:3])}
        if not os.environ.get("NOTIFY_SOCKET"):
            return {
                "ok": False,
                "error": "not_supervised",
                "message": "not under systemd: restart the daemon to load the config",
            }
        # The new config takes effect through a clean restart: lanes go to their safe state,
        # systemd (Restart=always) starts us again within a second.
        log.warning("config reload requested by the cloud: restarting")
        asyncio.get_running_loop().call_later(0.5, self._stop.set)
        return {"ok": True, "message": "restarting with the new config"}

    # --- events ---------------------------------------------------------------------------

    def _settle(self, report: Report) -> bool:
        """Close a ticket's two-phase passage; True if the cache recorded the report."""
        if report.kind is Kind.PASSAGE:
            return self.admission.passed(report.auth, time.time())
        if report.kind is Kind.NOT_PASSED:
            return self.admission.not_passed(report.auth, report.reason or "not_passed")
        return False

    def _on_latch(self, what: str, source: str | None) -> None:
        if what == "trip":
            self.cache.append("emergency_latched", None, source=source)
        else:
            self.cache.append("emergency_latch_reset", None)

    # --- control commands -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        latch = self.monitor.latch
        return {
            "ok": True,
            "version": __version__,
            "site": self.site.config.site.id,
            "gate": self.site.config.site.gate_id,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "emergency": {
                "latched": latch.latched,
                "tripped_by": latch.tripped_by,
                "active_inputs": sorted(latch.active),
            },
            "lanes": [lane.status() for lane in self.lanes.values()],
            "buses": [bus.stats() for bus in self.buses],
            "cache": self.cache.stats(),
            "readers": self.readers.stats(),
            "last_decisions": self.readers.last,
        }

    def _lane(self, req: dict[str, Any]) -> LaneRunner | None:
        lane_id = req.get("lane")
        return self.lanes.get(lane_id) if isinstance(lane_id, str) else None

    async def command(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return self.status()
        if cmd == "cache_stats":
            return {"ok": True, "stats": self.cache.stats()}
        if cmd == "sync_status":
            return {"ok": True, "sync": self.cloud.stats() if self.cloud else {"enabled": False}}
        if cmd == "cache_import":
            reply = await self._import(req)
        elif cmd == "sync_now":
            if self.cloud is None:
                reply = {"ok": False, "error": "sync_disabled", "message": "no [cloud] in config"}
            else:
                self.cloud.sync_now()
                reply = {"ok": True}
        else:
            reply = self._execute(cmd, req, f"gatectl:uid={peer.uid}")
        self._audit(req, reply, uid=peer.uid, pid=peer.pid)
        return reply

    def _audit(self, req: dict[str, Any], reply: dict[str, Any], **who: Any) -> None:
        # Ticket codes are bearer credentials: they stay out of the audit trail.
        args = {
            k: v
            for k, v in req.items()
            if k not in ("cmd", "code") and isinstance(v, str | bool | int)
        }
        lane = self._lane(req)
        cmd = str(req.get("cmd"))[:40]
        self.cache.append(
            "audit",
            lane.id if lane else None,
            cmd=cmd,
            args=args,
            **who,
            ok=reply["ok"],
            error=reply.get("error"),
        )
        log.info("audit: %s %s %s -> %s", who, cmd, args, reply.get("error", "ok"))

    async def _import(self, req: dict[str, Any]) -> dict[str, Any]:
        records = req.get("records")
        if not isinstance(records, list):
            return {"ok": False, "error": "bad_request", "message": "records must be a list"}
        lines = req.get("lines")
        if not (isinstance(lines, list) and len(lines) == len(records)):
            lines = list(range(1, len(records) + 1))
        # The import waits on the writer: a worker thread does, the event loop does not.
        result = await asyncio.to_thread(self.cache.import_records, records)
        imported = result.tickets + result.products + result.blocks + result.zones
        errors = [f"line {lines[p.line - 1]}: {p.reason}" for p in result.problems]
        return {"ok": True, "imported": imported, "rejected": result.rejected, "errors": errors}

    def _execute(self, cmd: object, req: dict[str, Any], origin: str) -> dict[str, Any]:
        def fail(error: str, message: str) -> dict[str, Any]:
            return {"ok": False, "error": error, "message": message}

        if cmd == "emergency":
            action = req.get("action")
            if action == "on":
                self.monitor.request_emergency(origin)
                return {"ok": True}
            if action == "reset":
                refusal = self.monitor.request_reset()
                if refusal is None:
                    return {"ok": True}
                return fail(
                    refusal,
                    {
                        "emergency_input_active": "an emergency button or fire input is still "
                        "active: release it first",
                        "not_latched": "no emergency is latched",
                    }.get(refusal, refusal),
                )
            return fail("bad_request", "action must be 'on' or 'reset'")
        if cmd not in ("open", "hold_open", "lockout", "present", "cache_lookup"):
            return fail("unknown_command", f"unknown command {str(cmd)[:40]!r}")
        lane = self._lane(req)
        if cmd == "cache_lookup" and req.get("lane") is None:
            lane = next(iter(self.lanes.values()))
        if lane is None:
            return fail("unknown_lane", f"lane must be one of {sorted(self.lanes)}")
        direction_text = req.get("direction", "entry")
        if direction_text not in ("entry", "exit"):
            return fail("bad_request", "direction must be 'entry' or 'exit'")
        if cmd in ("present", "cache_lookup"):
            code = req.get("code")
            if not isinstance(code, str):
                return fail("bad_request", "code must be a string")
            if cmd == "cache_lookup":
                point = self.admission.point(lane.id, direction_text)
                return {"ok": True, "decision": decision_dict(self.admission.lookup(code, point))}
            decision, outcome = self.admission.present(lane, code, direction_text)
            return {
                "ok": True,
                "decision": decision_dict(decision),
                "lane": lane.id,
                "outcome": outcome,
            }
        if cmd == "open":
            ok, reason = lane.unlock(Direction(direction_text), origin)
            return {"ok": True} if ok else fail(reason or "refused", f"lane {lane.id}: {reason}")
        on = req.get("on")
        if not isinstance(on, bool):
            return fail("bad_request", "on must be true or false")
        lane.handle(HoldOpen(on) if cmd == "hold_open" else Lockout(on))
        return {"ok": True}

    # --- lifecycle ------------------------------------------------------------------------

    def _lanes_up(self) -> bool:
        return all(lane.state.mode.value != "fault" for lane in self.lanes.values())

    def _status_text(self) -> str:
        return ", ".join(f"{lane.id} {lane.state.mode.value}" for lane in self.lanes.values())

    async def _supervise(self) -> None:
        """READY once lanes are up; WATCHDOG only while the safety loop and buses are alive."""
        started = time.monotonic()
        ready = False
        interval = watchdog_interval() or 1.0
        while True:
            now = time.monotonic()
            if not ready and (
                self._lanes_up() or now - started > self.site.config.daemon.ready_timeout_s
            ):
                ready = True
                self.notifier.ready(self._status_text())
                log.info("ready: %s", self._status_text())
            alive = now - self.monitor.alive_at < ALIVE_WITHIN_S and all(
                now - bus.alive_at < ALIVE_WITHIN_S for bus in self.buses
            )
            if ready and alive:
                self.notifier.watchdog()
                self.notifier.status(self._status_text())
            elif ready:
                log.error("safety loop or bus owner stalled: withholding the systemd watchdog")
            await asyncio.sleep(min(interval / 2, 0.5))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self.cache.start()
        for zone in self.site.config.zones:
            self.cache.set_zone_capacity(zone.name, zone.capacity)
        self.cache.append("daemon_started", None, version=__version__, pid=os.getpid())
        await self.control.start()
        tasks = [asyncio.create_task(self.monitor.run(), name="safety-monitor")]
        tasks += [asyncio.create_task(b.run(), name=f"bus-{b.name}") for b in self.buses]
        tasks += [
            asyncio.create_task(lane.run(), name=f"lane-{lane.id}") for lane in self.lanes.values()
        ]
        tasks += self.readers.tasks()
        tasks.append(asyncio.create_task(self._supervise(), name="supervisor"))
        # Everything made at start-up lives as long as the daemon: out of the collector's way,
        # a full collection no longer walks it (measured ~29 ms per collection before, a
        # latency spike for every lane decision that waits behind it).
        gc.freeze()
        # Not a core task: sync trouble must never stop the gate, so it is not awaited below.
        cloud_task = asyncio.create_task(self._run_cloud(), name="cloud") if self.cloud else None
        stop_wait = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for task in done:
            if task is not stop_wait:
                # A core task ended on its own: exit non-zero so systemd restarts us; the
                # board's watchdog holds the fail state meanwhile.
                log.critical(
                    "task %s ended unexpectedly: %r",
                    task.get_name(),
                    task.exception() if not task.cancelled() else "cancelled",
                )
                code = 1
        if cloud_task is not None:
            await _cancel([cloud_task])
        await self._shutdown(tasks)
        stop_wait.cancel()
        return code

    async def _run_cloud(self) -> None:
        assert self.cloud is not None
        stored = self.cache.state("cloud_keys")
        if stored:
            try:
                self.set_issuer_keys(json.loads(stored))
            except (ValueError, TypeError, KeyError):
                log.error("cloud: stored issuer keys unreadable; waiting for the cloud's")
        try:
            await self.cloud.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("cloud sync stopped; the gate keeps running offline")

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        log.info("stopping: leaving lanes in their safe state")
        self.notifier.stopping()
        bus_tasks = [t for t in tasks if t.get_name().startswith("bus-")]
        others = [t for t in tasks if t not in bus_tasks]
        # Stop everything that steps lanes first, then let the bus owners write the safe
        # outputs themselves (one owner per bus: no second writer at shutdown either).
        await _cancel(others)
        for lane in self.lanes.values():
            try:
                lane.drive(shutdown_outputs(lane.state, lane.timing))
            except Exception:
                log.exception("lane %s: could not command its safe state", lane.id)
        deadline = time.monotonic() + 1.0
        # Polling the bus owners' write state: they own the client, we only wait for it.
        while any(b.writes_pending() for b in self.buses) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await _cancel(bus_tasks)
        await self.control.close()
        self.cache.append("daemon_stopped", None)
        if self.cloud is not None:
            try:
                await self.cloud.close()
            except Exception:
                log.exception("cloud: could not close the link cleanly")
        self.cache.close()
