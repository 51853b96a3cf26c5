"""A simulated serial QR scanner on a pty, reachable through a stable symlink.

Unplug closes the pty and removes the link; replug opens a new pty behind the same link, as
udev does with /dev/serial/by-id for a real USB scanner.
"""

from __future__ import annotations

import contextlib
import os
import pty
import shutil
import tempfile
import tty
from pathlib import Path

from drivers.sim.pty import make_link, remove_link

TERMINATOR_BYTES: dict[str, bytes] = {"CR": b"\r", "LF": b"\n", "CRLF": b"\r\n"}


class SimScanner:
    """A pty that behaves like a QR scanner: scan, send raw bytes, unplug and replug."""

    def __init__(self, link: str | os.PathLike[str] | None = None) -> None:
        self._tmpdir: str | None = None
        if link is None:
            self._tmpdir = tempfile.mkdtemp(prefix="sim-scanner-")
            link = Path(self._tmpdir) / "scanner"
        self.path = str(link)
        self._master: int | None = None
        self._slave: int | None = None
        self._device: str | None = None
        self.dropped = 0
        self.replug()

    @property
    def plugged(self) -> bool:
        """Whether the scanner is plugged in."""
        return self._master is not None

    def replug(self) -> None:
        """Plug the scanner (back) in: a new pty behind the same path."""
        if self._master is not None:
            return
        master, slave = pty.openpty()
        # Raw before the driver opens it: a cooked pty echoes and rewrites 0x0d/0x0a.
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self._device = os.ttyname(slave)
        make_link(self._device, self.path)

    def unplug(self) -> None:
        """Pull the scanner out: the driver's reads fail and the path disappears."""
        if self._master is None:
            return
        if self._device is not None:
            remove_link(self._device, self.path)
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None
        self._device = None

    def send_raw(self, data: bytes) -> int:
        """Write bytes as the scanner would; returns how many got through (0 while unplugged)."""
        if self._master is None:
            self.dropped += len(data)
            return 0
        sent = 0
        while sent < len(data):
            try:
                sent += os.write(self._master, data[sent:])
            except BlockingIOError:
                # Nobody drains the line: a real serial line drops the bytes too.
                break
        self.dropped += len(data) - sent
        return sent

    def scan(self, text: str, terminator: str = "CR", prefix: str = "", suffix: str = "") -> int:
        """Send one scanned code framed as a scanner configured so would."""
        return self.send_raw((prefix + text + suffix).encode() + TERMINATOR_BYTES[terminator])

    def close(self) -> None:
        """Unplug for good and remove the temporary folder."""
        self.unplug()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> SimScanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
