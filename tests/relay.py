"""A TCP relay between a client and a server that a test can cut or silence, like a bad link.

``Relay(host, port)`` listens on a free loopback port and forwards every connection to the
target, both directions, from an asyncio loop in a background thread. The broker stays up while
the link between it and the agent fails:

* ``cut()`` resets every open connection (SO_LINGER 0, so both ends see ECONNRESET, not a polite
  FIN) and resets new ones as soon as they are accepted, until ``restore()``. The listening
  socket stays open, so the port cannot be lost while the link is down; a client sees its
  connect succeed and the connection reset before any reply, as through a link that drops.
* ``silence()`` keeps connections open but forwards nothing in either direction. Bytes are
  dropped, as on a dead link (the default), or held back and delivered on ``restore()``
  (``silence(hold=True)``, a stalled link that recovers). Dropping leaves gaps in both byte
  streams, so after ``restore()`` a protocol on top sees garbage: silence then cut, as the
  "silent for 20 s, then cut" scenario does. Note the relay's kernel still ACKs at the TCP level,
  so a silenced sender's writes succeed; only application timeouts (MQTT keepalive, PUBACK
  waits) notice the silence.
* Counters: bytes forwarded and dropped in each direction, connections accepted and open.

Not thread-safe beyond its public methods, which may be called from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_CHUNK = 65536
_OPEN, _CUT, _DROP, _HOLD = "open", "cut", "drop", "hold"


@dataclass(eq=False)
class _Link:
    """One relayed connection: the client side and the target side."""

    client: asyncio.StreamWriter
    target: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with RST: SO_LINGER on with a zero timeout, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Relay:
    """A TCP proxy on a free loopback port whose link a test can cut, silence and restore."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        """Start listening on host (a free port) and forwarding to target_host:target_port."""
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self._state = _OPEN
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._lock = threading.Lock()
        self._bytes_up = 0
        self._bytes_down = 0
        self._dropped_up = 0
        self._dropped_down = 0
        self._accepted = 0
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"relay->{target_port}", daemon=False
        )
        self._thread.start()
        try:
            self.port: int = self._call(self._listen())
        except BaseException:
            self._stop_loop()
            raise

    # --- counters ---------------------------------------------------------------------------

    @property
    def bytes_up(self) -> int:
        """Bytes forwarded from clients to the target."""
        with self._lock:
            return self._bytes_up

    @property
    def bytes_down(self) -> int:
        """Bytes forwarded from the target to clients."""
        with self._lock:
            return self._bytes_down

    @property
    def dropped_up(self) -> int:
        """Bytes from clients thrown away while silenced."""
        with self._lock:
            return self._dropped_up

    @property
    def dropped_down(self) -> int:
        """Bytes from the target thrown away while silenced."""
        with self._lock:
            return self._dropped_down

    @property
    def accepted(self) -> int:
        """Connections accepted so far, including those reset while cut."""
        with self._lock:
            return self._accepted

    @property
    def open_connections(self) -> int:
        """Connections currently relayed."""
        with self._lock:
            return len(self._links)

    @property
    def state(self) -> str:
        """'open', 'cut', 'drop' (silenced, dropping) or 'hold' (silenced, holding)."""
        return self._state

    # --- link faults ------------------------------------------------------------------------

    def cut(self) -> None:
        """Reset every connection now, and every new one until restore()."""
        self._call(self._set_state(_CUT))

    def silence(self, *, hold: bool = False) -> None:
        """Stop forwarding both ways; bytes are dropped, or held back with hold=True."""
        self._call(self._set_state(_HOLD if hold else _DROP))

    def restore(self) -> None:
        """Forward again: new connections are relayed, held bytes are delivered."""
        self._call(self._set_state(_OPEN))

    def close(self) -> None:
        """Reset all connections, stop listening and stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._shutdown())
        finally:
            self._stop_loop()

    def __enter__(self) -> Relay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- loop side --------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("the relay is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _listen(self) -> int:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _set_state(self, state: str) -> None:
        assert self._flowing is not None
        self._state = state
        if state == _HOLD:
            self._flowing.clear()
        else:
            self._flowing.set()
        if state == _CUT:
            await self._reset_all()
        log.debug("relay %s -> %s:%s now %s", self.port, self.target_host, self.target_port, state)

    async def _reset_all(self) -> None:
        with self._lock:
            links = list(self._links)
        for link in links:
            _reset(link.client)
            if link.target is not None:
                _reset(link.target)
            for task in link.tasks:
                task.cancel()
        tasks = [t for link in links for t in link.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._accepted += 1
        if self._state == _CUT or self._closed:
            _reset(writer)
            return
        link = _Link(client=writer)
        handler = asyncio.current_task()
        with self._lock:
            self._links.add(link)
        if handler is not None:
            self._handlers.add(handler)
        try:
            try:
                target_reader, target_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError as exc:
                log.debug(
                    "relay could not reach %s:%s: %s", self.target_host, self.target_port, exc
                )
                _reset(writer)
                return
            link.target = target_writer
            if self._state == _CUT:
                _reset(writer)
                _reset(target_writer)
                return
            up = asyncio.create_task(self._pump(reader, target_writer, up=True))
            down = asyncio.create_task(self._pump(target_reader, writer, up=False))
            link.tasks += [up, down]
            await asyncio.gather(up, down, return_exceptions=True)
            writer.close()
            target_writer.close()
        finally:
            with self._lock:
                self._links.discard(link)
            if handler is not None:
                self._handlers.discard(handler)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        assert self._flowing is not None
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                # Held: keep the chunk and stop reading, so the kernel buffers fill behind it.
                await self._flowing.wait()
                if self._state == _DROP:
                    with self._lock:
                        if up:
                            self._dropped_up += len(data)
                        else:
                            self._dropped_down += len(data)
                    continue
                # Counted before the write, so a peer that has received them sees them counted.
                with self._lock:
                    if up:
                        self._bytes_up += len(data)
                    else:
                        self._bytes_down += len(data)
                writer.write(data)
                await writer.drain()
            # EOF from one side: pass the half-close on; the other direction may go on.
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            # One side went away abruptly: take the other side down the same way.
            _reset(writer)
