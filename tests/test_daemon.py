"""Scenario tests: the real daemon as a subprocess, driving the simulated board over Modbus.

Each story runs over Modbus TCP and over RTU on a pty pair where the transport matters.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.testbed import Testbed, wait_for


@pytest.fixture(params=["tcp", "rtu"])
def gate(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Testbed]:
    with Testbed(tmp_path, transport=request.param) as tb:
        tb.start_sim()
        tb.start_daemon()
        yield tb


@pytest.fixture
def tcp_gate(tmp_path: Path) -> Iterator[Testbed]:
    with Testbed(tmp_path, transport="tcp") as tb:
        tb.start_sim()
        tb.start_daemon()
        yield tb


def outputs(tb: Testbed, channel: int) -> dict[str, bool]:
    lane: dict[str, bool] = tb.sim.state(1)["lanes"][str(channel)]["outputs"]
    return lane


def test_authorised_entry_counts_one_passage(gate: Testbed) -> None:
    r = gate.gatectl("open", "L1", "entry")
    assert r.returncode == 0, r.stderr
    assert gate.sim.walk(1, "entry")
    [passage] = gate.wait_event("passage")
    assert passage.lane == "L1" and passage.data["direction"] == "entry"
    gate.wait_modes("locked")
    assert not outputs(gate, 1)["unlock_entry"]
    audit = gate.events("audit")
    assert audit[-1].data["cmd"] == "open" and audit[-1].data["uid"] >= 0


def test_exit_and_timeout_not_passed(tcp_gate: Testbed) -> None:
    tb = tcp_gate
    assert tb.gatectl("open", "L2", "exit").returncode == 0
    assert tb.sim.walk(2, "exit")
    tb.wait_event("passage")
    assert tb.gatectl("open", "L1", "entry").returncode == 0
    [np] = tb.wait_event("not_passed", timeout_s=8)
    assert np.lane == "L1" and np.data["reason"] == "timeout"
    tb.wait_modes("locked")


def test_tailgater_and_forced_passage_alarm(tcp_gate: Testbed) -> None:
    tb = tcp_gate
    assert tb.gatectl("open", "L1", "entry").returncode == 0
    assert tb.sim.tailgate(1, "entry")
    tb.wait_event("passage")
    [tg] = tb.wait_event("tailgating")
    assert tg.lane == "L1"
    tb.wait_modes("locked", timeout_s=5)
    tb.sim.walk(2, "entry", wait_unlock=False)
    [fp] = tb.wait_event("forced_passage")
    assert fp.lane == "L2"


def test_obstruction_while_closing_reopens_and_alarms(tcp_gate: Testbed) -> None:
    tb = tcp_gate
    tb.write_config()
    assert tb.gatectl("open", "L1", "entry").returncode == 0
    assert tb.sim.walk(1, "entry")
    tb.sim.obstruction(1, True)
    tb.wait_event("obstruction")
    wait_for(lambda: outputs(tb, 1)["unlock_entry"] and outputs(tb, 1)["alarm"], 2, "reopen")
    time.sleep(0.5)
    assert outputs(tb, 1)["unlock_entry"], "closed on an obstruction"
    tb.sim.obstruction(1, False)
    tb.wait_event("obstruction_cleared")
    tb.wait_modes("locked")
    assert not outputs(tb, 1)["unlock_entry"]


def test_refusals_have_reasons(tcp_gate: Testbed) -> None:
    tb = tcp_gate
    assert tb.gatectl("lockout", "L2", "on").returncode == 0
    r = tb.gatectl("open", "L2", "entry")
    assert r.returncode == 1 and "lane_locked_out" in r.stderr
    r = tb.gatectl("open", "L9", "entry")
    assert r.returncode == 1 and "unknown_lane" in r.stderr
    assert tb.gatectl("lockout", "L2", "off").returncode == 0
    assert tb.gatectl("hold-open", "L1", "on").returncode == 0
    wait_for(lambda: outputs(tb, 1)["unlock_entry"] and outputs(tb, 1)["unlock_exit"], 2, "held")
    assert tb.sim.walk(1, "exit")
    tb.wait_event("free_passage")
    assert tb.gatectl("hold-open", "L1", "off").returncode == 0
    tb.wait_modes("locked")
    bad = tb.ctl({"cmd": "fly"})
    assert bad == {"ok": False, "error": "unknown_command", "message": "unknown command 'fly'"}


def test_emergency_opens_every_lane_latched_until_reset(gate: Testbed) -> None:
    tb = gate
    t0 = time.monotonic()
    tb.sim.emergency(True)
    wait_for(
        lambda: all(
            outputs(tb, c)["unlock_entry"] and outputs(tb, c)["unlock_exit"] for c in (1, 2)
        ),
        1.0,
        "every lane open",
    )
    assert time.monotonic() - t0 < 1.0
    assert tb.wait_modes("emergency_open")
    r = tb.gatectl("emergency", "reset")
    assert r.returncode == 1 and "emergency_input_active" in r.stderr
    tb.sim.emergency(False)
    time.sleep(0.3)
    assert tb.wait_modes("emergency_open"), "released input must not close the lanes"
    r = tb.gatectl("open", "L1", "entry")
    assert r.returncode == 1 and "emergency_open" in r.stderr
    assert tb.gatectl("emergency", "reset").returncode == 0
    tb.wait_modes("locked")
    assert not outputs(tb, 1)["unlock_entry"] and not outputs(tb, 2)["unlock_entry"]


def test_fire_input_and_software_emergency(tcp_gate: Testbed) -> None:
    tb = tcp_gate
    tb.sim.fire(True)
    tb.wait_modes("emergency_open")
    tb.sim.fire(False)
    assert tb.gatectl("emergency", "reset").returncode == 0
    tb.wait_modes("locked")
    assert tb.gatectl("emergency", "on").returncode == 0
    tb.wait_modes("emergency_open")
    assert "EMERGENCY OPEN" in tb.gatectl("status").stdout
    assert tb.gatectl("emergency", "reset").returncode == 0
    tb.wait_modes("locked")
    assert tb.wait_event("emergency_latched")[0].data["source"].startswith("fire:")


def test_link_loss_fault_within_a_second_then_fail_state_then_normal(gate: Testbed) -> None:
    tb = gate
    tb.sim.link("mute")
    t0 = time.monotonic()
    tb.wait_modes("fault", timeout_s=2)
    assert time.monotonic() - t0 < 1.0
    assert len(tb.wait_event("link_lost", count=2)) == 2
    since = time.monotonic()
    tb.sim.link("up")
    tb.wait_modes("locked", timeout_s=5)
    tb.wait_event("link_restored", count=4)
    writes = tb.sim.coil_writes(since)
    # L1 fails open: the first write after the outage opens it, a later one closes it.
    l1 = [w for w in writes if w["address"] == 0]
    assert l1 and l1[0]["values"][0] and l1[0]["values"][1], writes
    assert not any(w["values"][0] for w in writes[-1:]), writes
    # L2 fails locked: never opened.
    assert all(not w["values"][8] for w in writes if w["address"] == 0 and len(w["values"]) > 8)


@pytest.mark.parametrize("mode", ["exception", "slow", "garble"])
def test_bad_replies_never_crash_the_daemon(tcp_gate: Testbed, mode: str) -> None:
    tb = tcp_gate
    tb.sim.link(mode)
    if mode != "slow":
        tb.wait_modes("fault", timeout_s=3)
    else:
        # Replies 0.5 s late: some time out, others arrive; the daemon must just stay up.
        time.sleep(2)
    assert tb.daemon_proc is not None and tb.daemon_proc.poll() is None
    assert tb.status()["ok"]
    tb.sim.link("up")
    tb.wait_modes("locked", timeout_s=8)
    assert tb.gatectl("open", "L1", "entry").returncode == 0
    assert tb.sim.walk(1, "entry")
    tb.wait_event("passage")
    st = tb.status()
    faults = st["buses"][0]["boards"]["board-1"]["faults"]
    assert sum(faults.values()) >= 1, faults


def test_sigkill_board_watchdog_takes_fail_state(gate: Testbed) -> None:
    tb = gate
    assert tb.daemon_proc is not None
    tb.daemon_proc.kill()
    tb.daemon_proc.wait()
    wait_for(lambda: tb.sim.state(1)["watchdog_tripped"], 3, "the board watchdog")
    assert outputs(tb, 1)["unlock_entry"] and outputs(tb, 1)["unlock_exit"]
    assert not outputs(tb, 2)["unlock_entry"]
    tb.daemon_proc = None
    tb.start_daemon()
    wait_for(lambda: not tb.sim.state(1)["watchdog_tripped"], 3, "watchdog cleared")


def test_sigterm_leaves_safe_state_and_records_it(tcp_gate: Testbed) -> None:
    tb = tcp_gate
    assert tb.stop_daemon(signal.SIGTERM) == 0
    assert outputs(tb, 1)["unlock_entry"], "L1 fails open"
    assert not outputs(tb, 2)["unlock_entry"], "L2 fails locked"
    kinds = [e.kind for e in tb.events()]
    assert kinds[0] == "daemon_started" and kinds[-1] == "daemon_stopped"


def test_gatectl_without_daemon(tmp_path: Path) -> None:
    tb = Testbed(tmp_path)
    r = tb.gatectl("status")
    assert r.returncode == 3
    assert "not running" in r.stderr


def test_systemd_notify_ready_watchdog_and_socket_mode(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.2)
    seen: list[str] = []
    try:
        with Testbed(tmp_path / "gate") as tb:
            tb.start_sim()
            tb.start_daemon(env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"})
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not (
                "READY=1" in seen and seen.count("WATCHDOG=1") >= 2
            ):
                with contextlib.suppress(TimeoutError):
                    seen += sock.recv(4096).decode().splitlines()
            assert "READY=1" in seen and seen.count("WATCHDOG=1") >= 2, seen
            assert stat.S_IMODE(tb.ctl_socket.stat().st_mode) == 0o660
            assert tb.stop_daemon() == 0
            with contextlib.suppress(TimeoutError):
                while True:
                    seen += sock.recv(4096).decode().splitlines()
            assert "STOPPING=1" in seen
    finally:
        sock.close()
