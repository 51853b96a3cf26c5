"""Control socket: a Unix socket speaking JSON lines, one request and one reply per line.

The socket is created mode 0660 (group configurable), so only root, the daemon's user and
the technicians' group can reach it. Each connection's peer credentials (SO_PEERCRED) are
read once and handed to the command handler for the audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


Handler = Callable[[dict[str, Any], Peer], Awaitable[dict[str, Any]]]


def peer_of(writer: asyncio.StreamWriter) -> Peer:
    sock = writer.get_extra_info("socket")
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


class ControlServer:
    def __init__(self, path: Path, group: str | None, handler: Handler) -> None:
        self.path = path
        self._group = group
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            # A socket left by a crashed daemon would make bind fail.
            self.path.unlink()
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_LINE
        )
        os.chmod(self.path, 0o660)
        if self._group:
            try:
                shutil.chown(self.path, group=self._group)
            except (LookupError, PermissionError) as exc:
                log.error("control socket: cannot give it to group %s: %s", self._group, exc)
        log.info("control socket at %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    await self._send(
                        writer,
                        {
                            "ok": False,
                            "error": "bad_request",
                            "message": f"line longer than {MAX_LINE} bytes",
                        },
                    )
                    break
                if not line:
                    break
                reply = await self._dispatch(line, peer)
                await self._send(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes, peer: Peer) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {"ok": False, "error": "bad_request", "message": "not a JSON object"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "bad_request", "message": "not a JSON object"}
        try:
            return await self._handler(request, peer)
        except Exception:
            log.exception("control: command failed")
            return {"ok": False, "error": "internal_error", "message": "see the daemon log"}

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(json.dumps(reply, default=str).encode() + b"\n")
        await writer.drain()


class DaemonNotRunning(ConnectionError):
    """No daemon answers on the control socket."""


def request(path: Path, req: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
    """Send one request to the daemon and return its reply (blocking; for gatectl)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(str(path)) from exc
        sock.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise DaemonNotRunning(f"{path}: connection closed without a reply")
            buf += chunk
        reply: dict[str, Any] = json.loads(buf)
        return reply
    finally:
        sock.close()
