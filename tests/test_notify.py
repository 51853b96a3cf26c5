"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.notify import Notifier, watchdog_interval


def _receiver(address: str) -> socket.socket:
    """Bind a datagram socket where systemd's notify socket would be."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A notify socket at a file system path, named in NOTIFY_SOCKET."""
    address = str(tmp_path / "notify")
    with _receiver(address) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A notify socket in the abstract namespace, named "@..." as systemd does."""
    name = f"gate-agent-test-{uuid.uuid4().hex}"
    with _receiver("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_ready_watchdog_status_stopping_reach_a_path_socket(path_socket: socket.socket) -> None:
    notifier = Notifier()
    assert notifier.enabled

    assert notifier.ready("4 lanes in service")
    assert notifier.watchdog()
    assert notifier.status("lane 2 fault: link lost")
    assert notifier.stopping()

    received = [path_socket.recv(4096) for _ in range(4)]
    assert received == [
        b"READY=1\nSTATUS=4 lanes in service",
        b"WATCHDOG=1",
        b"STATUS=lane 2 fault: link lost",
        b"STOPPING=1",
    ]


def test_ready_without_status_sends_only_ready(path_socket: socket.socket) -> None:
    assert Notifier().ready()
    assert path_socket.recv(4096) == b"READY=1"


def test_status_is_kept_on_one_line(path_socket: socket.socket) -> None:
    Notifier().status("lane 1 open\nWATCHDOG=1")
    assert path_socket.recv(4096) == b"STATUS=lane 1 open WATCHDOG=1"


def test_abstract_socket_is_reached(abstract_socket: socket.socket) -> None:
    notifier = Notifier()
    assert notifier.ready("up")
    assert notifier.watchdog()
    assert abstract_socket.recv(4096) == b"READY=1\nSTATUS=up"
    assert abstract_socket.recv(4096) == b"WATCHDOG=1"


def test_explicit_socket_overrides_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    address = str(tmp_path / "explicit")
    with _receiver(address) as sock:
        assert Notifier(address).stopping()
        assert sock.recv(4096) == b"STOPPING=1"


def test_unset_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert not notifier.ready("up")
    assert not notifier.watchdog()
    assert not notifier.status("idle")
    assert not notifier.stopping()


@pytest.mark.parametrize("value", ["relative/notify", "@", "vsock:2:1234"])
def test_unsupported_notify_socket_is_ignored(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    notifier = Notifier()
    assert not notifier.enabled
    assert not notifier.ready()


def test_dead_socket_never_raises_and_logs_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    notifier = Notifier()
    with caplog.at_level(logging.DEBUG, logger="agent.notify"):
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()
    failures = [r for r in caplog.records if "sd_notify" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.DEBUG


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "5000000"}, 5.0),
        ({"WATCHDOG_USEC": "250000"}, 0.25),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-1"}, None),
        ({"WATCHDOG_USEC": "five"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid())}, 5.0),
        ({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "init"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ) == expected


def test_watchdog_interval_reads_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "5000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 5.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None
