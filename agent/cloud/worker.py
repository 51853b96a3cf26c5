"""Downlink verification in a process of its own, for the big messages (ticket snapshots).

Checking the signature and parsing and validating a chunk of a thousand tickets takes a few
milliseconds of CPU that hold Python's GIL, during which the lanes' decisions wait on the
event loop. Done here, in a separate process, the daemon only unpickles the finished rows.
The process is started with "spawn" (never fork a threaded daemon) and ends by itself when
the daemon is gone.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace

from agent.cloud.contract import TicketsSnapshot
from agent.cloud.signing import Anchor, DownlinkVerifier, Verified
from offline_cache import ValidatedChunk, validate_tickets

_verifier: DownlinkVerifier | None = None
_key: bytes | None = None
_utc_offset_s = 0


@dataclass(frozen=True)
class Checked:
    """A verified message; for a snapshot chunk, its tickets already validated as rows."""

    verified: Verified
    chunk: ValidatedChunk | None = None


def init(
    anchors: list[Anchor],
    topics: dict[str, str],
    max_bytes: int,
    max_lifetime_s: float,
    key: bytes | None,
    utc_offset_s: int,
    daemon_pid: int,
) -> None:
    """Set up the worker process (ProcessPoolExecutor initializer)."""
    global _verifier, _key, _utc_offset_s
    _verifier = DownlinkVerifier(
        anchors, topics, max_bytes=max_bytes, max_lifetime_s=max_lifetime_s
    )
    _key, _utc_offset_s = key, utc_offset_s

    def watch() -> None:
        # Orphaned (the daemon was killed, perhaps before this process even got here): go
        # too, rather than linger.
        while os.getppid() == daemon_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def ready() -> bool:
    """A no-op task: submitting it starts the process."""
    return _verifier is not None


def check(topic: str, raw: bytes, now: float) -> Checked:
    """Verify one downlink message (raises Rejected); validate a snapshot chunk's tickets."""
    assert _verifier is not None, "init() first"
    verified = _verifier.verify(topic, raw, now)
    body = verified.body
    if not isinstance(body, TicketsSnapshot):
        return Checked(verified)
    chunk = validate_tickets(body.tickets, _key, _utc_offset_s)
    # The records travel back as rows only: half the bytes to unpickle in the daemon.
    return Checked(replace(verified, body=body.model_copy(update={"tickets": []})), chunk)
