"""Blocking client of the simulator's control socket, for tests and the demo script."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

# A walk can wait this long past its own unlock timeout (beam steps, a slow loop).
WALK_MARGIN_S = 5.0


class SimError(Exception):
    """The simulator refused a control request."""


class SimClient:
    """One connection to a running simulator; one request at a time."""

    def __init__(self, path: str, *, timeout_s: float = 10.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buffer = b""

    def connect(self) -> None:
        """Open the connection (requests do this on demand)."""
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout_s)
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            self._sock = sock
            self._buffer = b""

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Retry connecting until the simulator's socket answers, or raise TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.connect()
                return
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"simulator not ready on {self.path}") from exc
                time.sleep(0.02)

    def close(self) -> None:
        """Close the connection."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> SimClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, req: dict[str, Any], *, timeout_s: float | None = None) -> dict[str, Any]:
        """Send one request and return its reply; raise SimError if the reply is not ok."""
        self.connect()
        assert self._sock is not None
        self._sock.settimeout(self.timeout_s if timeout_s is None else timeout_s)
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
            while b"\n" not in self._buffer:
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise ConnectionError("simulator closed the control connection")
                self._buffer += chunk
        except OSError:
            # After a timeout the late reply would be read as the next one's: start afresh.
            self.close()
            raise
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise SimError(reply.get("error", "request failed"))
        return reply

    # ---- one method per command ----

    def walk(
        self,
        channel: int,
        direction: str = "entry",
        *,
        wait_unlock: bool = True,
        wait_timeout_s: float = 5.0,
        unit: int | None = None,
        cmd: str = "walk",
        step_s: float = 0.06,
    ) -> bool:
        """A person walks through; True if they passed (False: the lane never unlocked)."""
        req = {
            "cmd": cmd,
            "channel": channel,
            "direction": direction,
            "wait_unlock": wait_unlock,
            "wait_timeout_s": wait_timeout_s,
            "unit": unit,
            "step_s": step_s,
        }
        return bool(self.request(req, timeout_s=wait_timeout_s + WALK_MARGIN_S)["passed"])

    def crowd(
        self,
        channel: int,
        people: int,
        direction: str = "entry",
        *,
        step_s: float = 0.01,
        gap_s: float = 0.01,
        unit: int | None = None,
    ) -> int:
        """People walk through a held-open lane one after another; returns how many."""
        req = {
            "cmd": "crowd",
            "channel": channel,
            "direction": direction,
            "people": people,
            "step_s": step_s,
            "gap_s": gap_s,
            "unit": unit,
        }
        timeout = people * (4 * step_s + gap_s) * 3 + 30
        return int(self.request(req, timeout_s=timeout)["passed"])

    def tailgate(
        self,
        channel: int,
        direction: str = "entry",
        *,
        wait_unlock: bool = True,
        wait_timeout_s: float = 5.0,
        unit: int | None = None,
    ) -> bool:
        """Two people back to back on one unlock; True if they passed."""
        return self.walk(
            channel,
            direction,
            wait_unlock=wait_unlock,
            wait_timeout_s=wait_timeout_s,
            unit=unit,
            cmd="tailgate",
        )

    def back_out(self, channel: int, direction: str = "entry", *, unit: int | None = None) -> None:
        """A person breaks the near beam and turns back."""
        self.request({"cmd": "back_out", "channel": channel, "direction": direction, "unit": unit})

    def obstruction(self, channel: int, on: bool, *, unit: int | None = None) -> None:
        """Put something in (or take it out of) a lane's flap zone."""
        self.request({"cmd": "obstruction", "channel": channel, "on": on, "unit": unit})

    def emergency(self, on: bool, *, unit: int | None = None) -> None:
        """Press or release the emergency button (every unit unless one is named)."""
        self.request({"cmd": "emergency", "on": on, "unit": unit})

    def fire(self, on: bool, *, unit: int | None = None) -> None:
        """Raise or clear the fire alarm input (every unit unless one is named)."""
        self.request({"cmd": "fire", "on": on, "unit": unit})

    def link(self, mode: str, *, unit: int | None = None) -> None:
        """Set the link mode: up, mute, exception, slow or garble (every unit unless named)."""
        self.request({"cmd": "link", "mode": mode, "unit": unit})

    def state(self, unit: int | None = None) -> dict[str, Any]:
        """State of every unit keyed by unit id as a string, or of the one unit named."""
        units: dict[str, Any] = self.request({"cmd": "state", "unit": unit})["units"]
        return units if unit is None else units[str(unit)]

    def history(self, since: float = 0.0, *, unit: int | None = None) -> list[dict[str, Any]]:
        """Output and input changes after a monotonic time, oldest first."""
        entries: list[dict[str, Any]] = self.request(
            {"cmd": "history", "since": since, "unit": unit}
        )["entries"]
        return entries

    def coil_writes(self, since: float = 0.0, *, unit: int | None = None) -> list[dict[str, Any]]:
        """Coil write requests received after a monotonic time, oldest first."""
        entries: list[dict[str, Any]] = self.request(
            {"cmd": "coil_writes", "since": since, "unit": unit}
        )["entries"]
        return entries

    def clear_history(self, *, unit: int | None = None) -> None:
        """Forget history and coil writes."""
        self.request({"cmd": "clear_history", "unit": unit})
