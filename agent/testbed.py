"""A simulated gate on this machine: the simulated board and the real daemon as processes.

Used by ``make demo``, the scenario tests and the benchmarks, so that all three run the
same daemon the same way a controller does, talking Modbus to a board over TCP or over
an RTU line on a pty pair.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from agent.control import request
from drivers.sim.client import SimClient
from offline_cache import StoredEvent, read_events

Transport = Literal["tcp", "rtu"]


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


QUICK_CLOUD: dict[str, Any] = {
    "status_interval_s": 2,
    "telemetry_interval_s": 2,
    "keepalive_s": 3,
    "connect_timeout_s": 3,
    "reconnect_min_s": 0.1,
    "reconnect_max_s": 1,
}
"""Cloud settings for a gate on this machine: status at once, a dead broker noticed in
seconds, a restarted one reconnected at once."""


def cloud_toml(host: str, port: int, trust_anchor: str, **options: Any) -> str:
    """A ``[cloud]`` section (QUICK_CLOUD, then ``options``) trusting one cloud key (hex)."""
    lines = ["[cloud]", f"host = {_toml(host)}", f"port = {port}"]
    for key, value in {**QUICK_CLOUD, **options}.items():
        lines.append(f"{key} = {_toml(str(value) if isinstance(value, Path) else value)}")
    lines += ["", "[[cloud.trust_anchors]]", f"public_key = {_toml(trust_anchor)}", ""]
    return "\n".join(lines)


def wait_for(
    predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.01
) -> Any:
    """Poll until ``predicate`` returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


class Testbed:
    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        workdir: Path,
        *,
        transport: Transport = "tcp",
        fail_states: Sequence[str] = ("open", "locked"),
        lane: dict[str, Any] | None = None,
        lane_readers: dict[int, list[dict[str, Any]]] | None = None,
        bus: dict[str, Any] | None = None,
        watchdog_ms: int = 1000,
        log_format: str = "text",
        config_file: Path | None = None,
        tcp_port: int = 0,
        extra_toml: str = "",
        site_id: str = "test-park",
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.transport = transport
        self.fail_states = list(fail_states)
        self.lane_extra = {
            "unlock_timeout_s": 4,
            "close_time_s": 0.3,
            "alarm_s": 1.0,
            **(lane or {}),
        }
        self.bus_extra = bus or {}
        self.lane_readers = lane_readers or {}
        self.watchdog_ms = watchdog_ms
        self.log_format = log_format
        self.sim_socket = self.dir / "sim.sock"
        self.ctl_socket = self.dir / "ctl.sock"
        self.state_dir = self.dir / "state"
        self.config_file = config_file
        self.extra_toml = extra_toml
        self.site_id = site_id
        self.tcp_port = tcp_port
        self.config_path = config_file or self.dir / "gate.toml"
        self.sim_proc: subprocess.Popen[bytes] | None = None
        self.daemon_proc: subprocess.Popen[bytes] | None = None
        self.sim_info: dict[str, Any] = {}
        self._sim: SimClient | None = None

    # --- the simulated board ----------------------------------------------------------

    def start_sim(self, stdout: Any = None) -> None:
        ready = self.dir / "sim-ready.json"
        ready.unlink(missing_ok=True)
        args = [
            sys.executable,
            "-m",
            "drivers.sim",
            "--units",
            "1",
            "--lanes",
            str(len(self.fail_states)),
            "--control",
            str(self.sim_socket),
            "--ready-file",
            str(ready),
        ]
        args += ["--tcp", f"127.0.0.1:{self.tcp_port}"] if self.transport == "tcp" else ["--rtu"]
        self.sim_proc = subprocess.Popen(
            args,
            stdout=stdout if stdout is not None else (self.dir / "sim.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_for(
            lambda: ready.exists() or self.sim_proc.poll() is not None, 15, "the simulated board"
        )
        if not ready.exists():
            raise RuntimeError(f"the simulated board did not start (see {self.dir / 'sim.log'})")
        self.sim_info = json.loads(ready.read_text())
        self._sim = SimClient(str(self.sim_socket))
        self._sim.wait_ready(10)

    @property
    def sim(self) -> SimClient:
        assert self._sim is not None, "start_sim() first"
        return self._sim

    # --- the daemon -------------------------------------------------------------------

    def write_config(self) -> Path:
        if self.config_file is not None:
            return self.config_file
        lines = [
            "[site]",
            f'id = "{self.site_id}"',
            'gate_id = "gate-01"',
            "",
            "[daemon]",
            f'log_format = "{self.log_format}"',
            "ready_timeout_s = 3",
            "",
        ]
        lines += ["[[buses]]", 'name = "bus-1"']
        if self.transport == "tcp":
            lines += [
                'type = "modbus-tcp"',
                'host = "127.0.0.1"',
                f"port = {self.sim_info['tcp_port']}",
            ]
        else:
            lines += [
                'type = "modbus-rtu"',
                f"port = {_toml(self.sim_info['rtu_device'])}",
                "baudrate = 115200",
            ]
        lines += [f"{k} = {_toml(v)}" for k, v in self.bus_extra.items()]
        lines += [
            "",
            "[[boards]]",
            'name = "board-1"',
            'bus = "bus-1"',
            "unit_id = 1",
            'preset = "gt-io4"',
            f"watchdog_ms = {self.watchdog_ms}",
            "",
        ]
        for i, fail in enumerate(self.fail_states, start=1):
            lines += [
                "[[lanes]]",
                f'id = "L{i}"',
                'board = "board-1"',
                f"channel = {i}",
                f'fail_state = "{fail}"',
            ]
            lines += [f"{k} = {_toml(v)}" for k, v in self.lane_extra.items()]
            if i in self.lane_readers:
                lines.append(f"readers = {_toml(self.lane_readers[i])}")
            lines.append("")
        for kind in ("emergency_button", "fire"):
            lines += ["[[safety.inputs]]", f'kind = "{kind}"', 'board = "board-1"', ""]
        lines.append(self.extra_toml)
        self.config_path.write_text("\n".join(lines))
        return self.config_path

    def start_daemon(
        self, env: dict[str, str] | None = None, stdout: Any = None, wait: bool = True
    ) -> None:
        self.write_config()
        self.daemon_proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "run",
                "--config",
                str(self.config_path),
                "--state-dir",
                str(self.state_dir),
                "--control-socket",
                str(self.ctl_socket),
            ],
            stdout=stdout if stdout is not None else (self.dir / "daemon.log").open("ab"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        if wait:
            self.wait_modes("locked", timeout_s=15)

    def ctl(self, req: dict[str, Any]) -> dict[str, Any]:
        return request(self.ctl_socket, req)

    def gatectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.gatectl", "--socket", str(self.ctl_socket), *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )

    def status(self) -> dict[str, Any]:
        return self.ctl({"cmd": "status"})

    def modes(self) -> dict[str, str]:
        try:
            return {lane["lane"]: lane["mode"] for lane in self.status()["lanes"]}
        except (OSError, ValueError):
            return {}

    def wait_modes(self, *modes: str, timeout_s: float = 5.0) -> dict[str, str]:
        """Wait until every lane is in one of ``modes``."""
        result: dict[str, str] = wait_for(
            lambda: (m := self.modes()) and all(v in modes for v in m.values()) and m,
            timeout_s,
            f"all lanes {modes}",
        )
        return result

    def events(self, kind: str | None = None) -> list[StoredEvent]:
        path = self.state_dir / "gate.db"
        return list(read_events(path, kind=kind)) if path.exists() else []

    def wait_event(self, kind: str, count: int = 1, timeout_s: float = 5.0) -> list[StoredEvent]:
        result: list[StoredEvent] = wait_for(
            lambda: (ev := self.events(kind)) and len(ev) >= count and ev,
            timeout_s,
            f"{count} {kind} event(s)",
            poll_s=0.05,
        )
        return result

    def stop_daemon(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int | None:
        proc, self.daemon_proc = self.daemon_proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                return proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                # Every thread's stack into the daemon's log (faulthandler on SIGUSR1): a
                # daemon that does not stop is a bug, and this is how to find it.
                proc.send_signal(signal.SIGUSR1)
                time.sleep(1.0)
                proc.kill()
                proc.wait()
                raise
        return proc.returncode

    def close(self) -> None:
        """Stop everything this testbed started (safe to call twice)."""
        try:
            self.stop_daemon()
        finally:
            if self._sim is not None:
                self._sim.close()
                self._sim = None
            proc, self.sim_proc = self.sim_proc, None
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
