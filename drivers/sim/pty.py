"""Pty plumbing shared by the simulators: a bridged pair of ptys and device symlinks.

A simulated serial device (Modbus RTU board, SAM reader) serves one pty while the daemon opens
the other, as it would open a USB adapter; the symlink plays /dev/serial/by-id/...
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import tty


class PtyBridge:
    """Two pty pairs joined master to master: one slave for the server, one for the daemon."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.server_master, self.server_slave = pty.openpty()
        self.client_master, self.client_slave = pty.openpty()
        # Raw before anyone opens them: a cooked pty echoes bytes back and mangles 0x0d/0x0a.
        for fd in (self.server_slave, self.client_slave):
            tty.setraw(fd)
        for fd in (self.server_master, self.client_master):
            os.set_blocking(fd, False)
        # We keep both slave fds open: without an open slave, reading the master fails with EIO
        # and the bridge would die when the daemon closes and reopens the device.
        self.server_port = os.ttyname(self.server_slave)
        self.device = os.ttyname(self.client_slave)
        loop.add_reader(self.server_master, self._pump, self.server_master, self.client_master)
        loop.add_reader(self.client_master, self._pump, self.client_master, self.server_master)

    def _pump(self, src: int, dst: int) -> None:
        try:
            data = os.read(src, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.loop.remove_reader(src)
            return
        while data:
            try:
                data = data[os.write(dst, data) :]
            except (BlockingIOError, OSError):
                # Nobody drains the other side: a serial line drops bytes too.
                return

    def close(self) -> None:
        for fd in (self.server_master, self.client_master):
            self.loop.remove_reader(fd)
        for fd in (self.server_master, self.client_master, self.server_slave, self.client_slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def make_link(device: str, link: str) -> None:
    """Point ``link`` at ``device``, as a udev rule names a serial adapter."""
    # Like socat's link=: replace a stale symlink, never a real file.
    if os.path.islink(link):
        os.unlink(link)
    os.symlink(device, link)


def remove_link(device: str, link: str) -> None:
    """Remove ``link`` if it still points at ``device``."""
    # Leave the link alone if another simulator has taken it over since.
    if os.path.islink(link) and os.readlink(link) == device:
        os.unlink(link)
