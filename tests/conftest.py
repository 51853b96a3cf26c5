"""Fixtures that guard the house: no test may leave processes or threads behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _children() -> set[int]:
    me = str(os.getpid())
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, fields[1] the parent pid; zombies are reaped by Popen.
        if fields[1] == me and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves child processes or non-daemon threads running."""
    before_children = _children()
    before_threads = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leaked = _children() - before_children
        threads = [
            t for t in set(threading.enumerate()) - before_threads if t.is_alive() and not t.daemon
        ]
        if not leaked and not threads:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"test left child processes running: {sorted(leaked)}"
    assert not threads, f"test left threads running: {threads}"
