"""Control channel of the simulator: JSON lines over a Unix socket.

One request per line, ``{"cmd": "walk", "channel": 1, ...}``, answered by one line
``{"ok": true, "now": <monotonic>, ...}`` or ``{"ok": false, "error": "..."}``. Every request
runs in its own task, so a walk that waits for the lane to unlock holds up nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any

from drivers.sim.board import Direction, SimBoard
from drivers.sim.server import SimServer

log = logging.getLogger(__name__)

Request = dict[str, Any]
Reply = dict[str, Any]


class RequestError(Exception):
    """A control request that cannot be carried out; its text goes back to the caller."""


def _get(req: Request, key: str, kind: type, default: Any = ...) -> Any:
    if req.get(key) is None:
        if default is ...:
            raise RequestError(f"missing {key!r}")
        return default
    value = req[key]
    # bool is an int in Python; a channel of `true` is a caller's mistake, not channel 1.
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        raise RequestError(f"{key!r} must be {kind.__name__}, not {value!r}")
    return value


class ControlServer:
    """Answers control requests for the boards of one SimServer."""

    def __init__(self, sim: SimServer, path: str) -> None:
        self.sim = sim
        self.path = path
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._commands: dict[str, Callable[[Request], Awaitable[Reply]]] = {
            "walk": self._walk,
            "crowd": self._crowd,
            "tailgate": self._tailgate,
            "back_out": self._back_out,
            "obstruction": self._obstruction,
            "emergency": self._emergency,
            "fire": self._fire,
            "link": self._link,
            "state": self._state,
            "history": self._history,
            "coil_writes": self._coil_writes,
            "clear_history": self._clear_history,
        }

    async def start(self) -> None:
        """Listen on the Unix socket, replacing a stale socket left by a killed simulator."""
        _remove_stale_socket(self.path)
        self._server = await asyncio.start_unix_server(self._serve_client, path=self.path)

    async def close(self) -> None:
        """Stop listening, drop clients, cancel running requests and remove the socket."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._track(asyncio.current_task())
        self._writers.add(writer)
        write_lock = asyncio.Lock()
        try:
            while line := await reader.readline():
                if line.strip():
                    task = asyncio.create_task(self._answer(line, writer, write_lock))
                    self._track(task)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # the client went away or sent an over-long line: drop the connection
        finally:
            self._writers.discard(writer)
            writer.close()

    def _track(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(
        self, line: bytes, writer: asyncio.StreamWriter, write_lock: asyncio.Lock
    ) -> None:
        try:
            req = json.loads(line)
        except ValueError as exc:  # also covers bytes that are not UTF-8
            reply: Reply = {"ok": False, "error": f"bad JSON: {exc}"}
        else:
            if isinstance(req, dict):
                reply = await self.handle(req)
                if "id" in req:
                    reply["id"] = req["id"]
            else:
                reply = {"ok": False, "error": "a request is a JSON object"}
        async with write_lock:
            with contextlib.suppress(ConnectionError):
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()

    async def handle(self, req: Request) -> Reply:
        """Carry out one request and build its reply (usable without a socket)."""
        cmd = req.get("cmd")
        command = self._commands.get(cmd) if isinstance(cmd, str) else None
        if command is None:
            return {"ok": False, "error": f"unknown cmd {cmd!r}; one of {sorted(self._commands)}"}
        try:
            reply = await command(req)
        except (RequestError, ValueError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            # The boundary: a bug in one command must not leave the caller waiting forever.
            log.exception("control request %s failed", cmd)
            return {"ok": False, "error": f"internal error: {exc!r}"}
        return {"ok": True, "now": time.monotonic(), **reply}

    # ---- helpers ----

    def _board(self, req: Request) -> SimBoard:
        """The board named by "unit", or the first board when none is named."""
        unit = _get(req, "unit", int, None)
        if unit is None:
            return next(iter(self.sim.boards.values()))
        if unit not in self.sim.boards:
            raise RequestError(f"no unit {unit}; units are {sorted(self.sim.boards)}")
        return self.sim.boards[unit]

    @staticmethod
    def _direction(req: Request) -> Direction:
        direction = req.get("direction")
        if direction == "entry":
            return "entry"
        if direction == "exit":
            return "exit"
        raise RequestError(f"'direction' must be 'entry' or 'exit', not {direction!r}")

    def _boards(self, req: Request) -> list[SimBoard]:
        """The board named by "unit", or every board when none is named."""
        if req.get("unit") is None:
            return list(self.sim.boards.values())
        return [self._board(req)]

    # ---- commands ----

    def _lane(self, req: Request) -> tuple[SimBoard, int, Direction]:
        return self._board(req), _get(req, "channel", int), self._direction(req)

    async def _walk(self, req: Request) -> Reply:
        return await self._pass(req, tailgate=False)

    async def _crowd(self, req: Request) -> Reply:
        board, channel, direction = self._lane(req)
        people = _get(req, "people", int)
        if not 1 <= people <= 1_000_000:
            raise ValueError("people must be 1..1000000")
        passed = await board.crowd(
            channel,
            direction,
            people,
            step_s=_get(req, "step_s", float, 0.06),
            gap_s=_get(req, "gap_s", float, 0.06),
        )
        return {"passed": passed}

    async def _tailgate(self, req: Request) -> Reply:
        return await self._pass(req, tailgate=True)

    async def _pass(self, req: Request, *, tailgate: bool) -> Reply:
        board, channel, direction = self._lane(req)
        passed = await board.walk(
            channel,
            direction,
            wait_unlock=_get(req, "wait_unlock", bool, True),
            wait_timeout_s=_get(req, "wait_timeout_s", float, 5.0),
            step_s=_get(req, "step_s", float, 0.06),
            people=2 if tailgate else 1,
        )
        log.info(
            "sim unit %s lane %s: %s %s %s",
            board.unit,
            channel,
            "tailgate" if tailgate else "walk",
            direction,
            "passed" if passed else "gave up (lane stayed locked)",
        )
        return {"passed": passed}

    async def _back_out(self, req: Request) -> Reply:
        board, channel, direction = self._lane(req)
        await board.back_out(channel, direction, step_s=_get(req, "step_s", float, 0.06))
        log.info("sim unit %s lane %s: backed out (%s side)", board.unit, channel, direction)
        return {}

    async def _obstruction(self, req: Request) -> Reply:
        self._board(req).set_obstruction(_get(req, "channel", int), _get(req, "on", bool))
        return {}

    async def _emergency(self, req: Request) -> Reply:
        on = _get(req, "on", bool)
        for board in self._boards(req):
            board.set_emergency(on)
        return {}

    async def _fire(self, req: Request) -> Reply:
        on = _get(req, "on", bool)
        for board in self._boards(req):
            board.set_fire(on)
        return {}

    async def _link(self, req: Request) -> Reply:
        mode = _get(req, "mode", str)
        for board in self._boards(req):
            board.set_link(mode)
            log.info("sim unit %s: link %s", board.unit, mode)
        return {}

    async def _state(self, req: Request) -> Reply:
        return {"units": {str(b.unit): b.state() for b in self._boards(req)}}

    async def _history(self, req: Request) -> Reply:
        since = _get(req, "since", float, 0.0)
        entries = [e for b in self._boards(req) for e in b.history if e["t"] > since]
        return {"entries": sorted(entries, key=lambda e: e["t"])}

    async def _coil_writes(self, req: Request) -> Reply:
        since = _get(req, "since", float, 0.0)
        entries = [e for b in self._boards(req) for e in b.coil_writes if e["t"] > since]
        return {"entries": sorted(entries, key=lambda e: e["t"])}

    async def _clear_history(self, req: Request) -> Reply:
        for board in self._boards(req):
            board.clear_history()
        return {}


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            return
    raise FileExistsError(f"another simulator is listening on {path}")
