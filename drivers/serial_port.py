"""The one owner of pyserial: a serial port opened by device path or pyserial URL.

Readers open, read, write and close ports here and see one error, ``PortGone``, for a device
that failed, vanished or cannot be opened; pyserial's own exceptions stay inside this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import serial  # type: ignore[import-untyped]  # pyserial ships no type stubs

from drivers.base import DriverError


class PortGone(DriverError):
    """The serial device failed, vanished or cannot be opened; ``cause`` names the fault."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


@contextlib.contextmanager
def _port_faults() -> Iterator[None]:
    try:
        yield
    # SerialException is pyserial's own check; OSError is the device or socket failing.
    except (serial.SerialException, OSError) as exc:
        raise PortGone(type(exc).__name__) from exc


class SerialPort:
    """An open port: a device path or a pyserial URL (``loop://``, ``socket://host:port``, …)."""

    def __init__(
        self,
        url: str,
        *,
        baudrate: int,
        timeout: float,
        write_timeout: float | None = None,
        exclusive: bool | None = None,
    ) -> None:
        try:
            self._port: Any = serial.serial_for_url(
                url,
                baudrate=baudrate,
                timeout=timeout,
                write_timeout=write_timeout,
                exclusive=exclusive,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            # ValueError: a malformed URL or setting, which no retry will mend but must not crash.
            raise PortGone(type(exc).__name__) from exc

    def read(self) -> bytes:
        """What has arrived, waiting up to the timeout for a first byte (b"" if none came)."""
        with _port_faults():
            data: bytes = self._port.read(self._port.in_waiting or 1)
        return data

    def write(self, data: bytes) -> None:
        """Send bytes (waiting up to the write timeout, if one was given)."""
        with _port_faults():
            self._port.write(data)

    def discard_input(self) -> None:
        """Drop whatever has arrived and not been read."""
        with _port_faults():
            self._port.reset_input_buffer()

    def cancel_read(self) -> None:
        """Wake a read blocked in another thread, where the port type can; never raises."""
        with contextlib.suppress(Exception):
            self._port.cancel_read()

    def close(self) -> None:
        """Release the port; never raises."""
        with contextlib.suppress(Exception):
            self._port.close()
