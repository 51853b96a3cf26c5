"""systemd's sd_notify protocol: tell the service manager we are ready, alive or stopping.

A dozen lines of socket code instead of a dependency: the PyPI ``sdnotify`` package is
unmaintained and cannot reach an abstract-namespace socket (``NOTIFY_SOCKET=@...``).

Outside systemd (tests, the demo, a technician running the daemon by hand) ``NOTIFY_SOCKET``
is unset and every call is a no-op. A failed send never reaches the caller: a missed
notification must not stop the gate loop. Sends are non-blocking for the same reason; a
dropped ``WATCHDOG=1`` is repeated at the next ping, well inside ``WatchdogSec``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _socket_address(value: str) -> str | None:
    """Turn a ``NOTIFY_SOCKET`` value into an AF_UNIX address, or None if unusable."""
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace: systemd writes "@name", the kernel wants a leading NUL byte.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # Relative paths and other transports (e.g. "vsock:") are not for a local daemon.
    return None


def _one_line(text: str) -> str:
    """Keep a status text on one line: a newline would start a new assignment."""
    return " ".join(text.splitlines())


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Return systemd's watchdog interval in seconds, or None if no watchdog is set for us."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                # Inherited from a parent process: the watchdog is not ours to feed.
                return None
        except ValueError:
            return None
    try:
        interval = int(usec)
    except ValueError:
        return None
    if interval <= 0:
        return None
    return interval / 1_000_000


class Notifier:
    """Sends sd_notify datagrams to the socket named by ``NOTIFY_SOCKET``."""

    def __init__(self, notify_socket: str | None = None) -> None:
        """Use ``notify_socket`` (``/path`` or ``@abstract``), else ``$NOTIFY_SOCKET``."""
        value = notify_socket if notify_socket is not None else os.environ.get("NOTIFY_SOCKET")
        self._address = _socket_address(value) if value else None
        self._failure_logged = False
        if value and self._address is None:
            log.debug("ignoring unsupported NOTIFY_SOCKET %r", value)

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        """Report start-up finished, with an optional status line."""
        message = "READY=1"
        if status is not None:
            message += "\nSTATUS=" + _one_line(status)
        return self._send(message)

    def watchdog(self) -> bool:
        """Feed systemd's watchdog; call at least twice per ``watchdog_interval()``."""
        return self._send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status``."""
        return self._send("STATUS=" + _one_line(text))

    def stopping(self) -> bool:
        """Report that shutdown has begun."""
        return self._send("STOPPING=1")

    def _send(self, message: str) -> bool:
        """Send one datagram; return whether it went out, never raise."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._failure_logged:
                self._failure_logged = True
                log.debug("sd_notify to %r failed: %s", self._address, exc)
            return False
        return True
