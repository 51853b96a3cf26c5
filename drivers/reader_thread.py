"""What the threaded credential readers share: the worker thread, reopen backoff and alarm.

pyserial, OpenCV and zbar block, so each reader runs its device loop in a daemon thread and
hands results to the event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any


class Worker:
    """A reader thread's side: its stop flag and a way to hand work back to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop = threading.Event()
        self._loop = loop

    def post(self, callback: Callable[..., None], *args: Any) -> bool:
        """Run ``callback(*args)`` on the event loop; False (and stop) once the loop has closed."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            # The loop has closed under us: nobody is left to hand results to.
            self.stop.set()
            return False
        return True


async def run_in_thread(
    name: str,
    body: Callable[[Worker], None],
    *,
    stop_wait_s: float,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Run ``body`` in a daemon thread until cancelled; then stop it and wait for it a while.

    ``on_stop`` runs on the event loop as the stop flag is set (to wake a blocked read, say).
    """
    loop = asyncio.get_running_loop()
    worker = Worker(loop)
    finished = asyncio.Event()

    def target() -> None:
        try:
            body(worker)
        finally:
            worker.post(finished.set)

    threading.Thread(target=target, name=name, daemon=True).start()
    try:
        await loop.create_future()
    finally:
        worker.stop.set()
        if on_stop is not None:
            on_stop()
        # The thread is a daemon: should it hang in a driver call, it must not hang the stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(stop_wait_s):
                await finished.wait()


class Backoff:
    """Reopen delays that double from ``first_s`` up to ``max_s``; ``reset`` after a success."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.delay_s = first_s

    def reset(self) -> None:
        """Start again from the first delay."""
        self.delay_s = self.first_s

    def wait(self, stop: threading.Event) -> None:
        """Sleep the current delay (cut short by ``stop``) and double the next one."""
        stop.wait(self.delay_s)
        self.delay_s = min(self.delay_s * 2, self.max_s)


class Alarm:
    """A reader's outage flag: the first failure is news, repeats are not, recovery is again.

    The caller logs: at ERROR when ``fail`` returns True, at DEBUG when it returns False, and
    once more when ``recover`` returns True.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.raised = 0

    @property
    def up(self) -> bool:
        """Whether the reader is in an outage."""
        return self.reason is not None

    def fail(self, reason: str) -> bool:
        """Raise the alarm (or keep it up with a new reason); True if it was down."""
        first = self.reason is None
        if first:
            self.raised += 1
        self.reason = reason
        return first

    def recover(self) -> bool:
        """Clear the alarm; True if it was up."""
        was_up = self.reason is not None
        self.reason = None
        return was_up
