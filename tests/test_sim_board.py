"""The simulated gt-io4 board, seen from the wire: Modbus TCP, RTU over a pty, control socket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerType

from drivers.presets import BoardPreset, load_preset
from drivers.sim.board import SimBoard
from drivers.sim.client import SimClient, SimError
from drivers.sim.control import ControlServer
from drivers.sim.server import SimServer

PRESET = load_preset("gt-io4")
LANE1 = PRESET.lane_map(1)
LANE2 = PRESET.lane_map(2)
REGS = PRESET.registers
EMERGENCY = PRESET.board_inputs.emergency_button
FIRE = PRESET.board_inputs.fire
assert EMERGENCY is not None and FIRE is not None
assert REGS.watchdog_ms is not None and REGS.fail_open_mask is not None


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    """One board (unit 1, two lanes) served in-process on Modbus TCP."""
    server = SimServer([SimBoard(PRESET, unit=1, lanes=2)])
    try:
        await server.start_tcp("127.0.0.1", 0)
        yield server
    finally:
        await server.close()


@pytest.fixture
async def modbus(sim: SimServer) -> AsyncIterator[AsyncModbusTcpClient]:
    """A Modbus TCP client connected to the in-process simulator."""
    client = AsyncModbusTcpClient("127.0.0.1", port=sim.tcp_port or 0, timeout=0.2, retries=0)
    try:
        assert await client.connect()
        yield client
    finally:
        client.close()


async def read_inputs(client: Any, address: int, count: int = 1, unit: int = 1) -> list[bool]:
    """Raw discrete input levels as the daemon would read them."""
    rr = await client.read_discrete_inputs(address, count=count, device_id=unit)
    assert not rr.isError(), rr
    return list(rr.bits[:count])


def beams(history: list[dict[str, Any]], channel: int = 1) -> list[tuple[str, bool]]:
    """The beam changes of one lane, in order."""
    return [
        (e["what"], e["value"])
        for e in history
        if e["channel"] == channel and e["what"].startswith("sensor_")
    ]


ENTRY_SEQUENCE = [
    ("sensor_entry_side", True),
    ("sensor_exit_side", True),
    ("sensor_entry_side", False),
    ("sensor_exit_side", False),
]
EXIT_SEQUENCE = [
    ("sensor_exit_side", True),
    ("sensor_entry_side", True),
    ("sensor_exit_side", False),
    ("sensor_entry_side", False),
]


# ---- inputs and polarity ----


async def test_inputs_start_inactive_in_their_own_polarity(modbus: AsyncModbusTcpClient) -> None:
    levels = await read_inputs(modbus, 0, 34)
    obstruction = LANE1.inputs.obstruction
    assert obstruction is not None and obstruction.active_low
    # Normally-closed contacts read high while nothing is wrong.
    assert levels[obstruction.address] is True
    assert levels[EMERGENCY.address] is True and levels[FIRE.address] is True
    assert levels[LANE1.inputs.sensor_entry_side.address] is False
    assert levels[LANE1.inputs.sensor_exit_side.address] is False


async def test_safety_inputs_read_with_correct_polarity(
    sim: SimServer, modbus: AsyncModbusTcpClient
) -> None:
    board = sim.boards[1]
    obstruction2 = LANE2.inputs.obstruction
    assert obstruction2 is not None

    board.set_emergency(True)
    board.set_fire(True)
    board.set_obstruction(2, True)
    assert await read_inputs(modbus, EMERGENCY.address, 2) == [False, False]
    assert await read_inputs(modbus, obstruction2.address) == [False]
    assert board.board_inputs() == {"emergency_button": True, "fire": True}

    board.set_emergency(False)
    board.set_fire(False)
    board.set_obstruction(2, False)
    assert await read_inputs(modbus, EMERGENCY.address, 2) == [True, True]
    assert await read_inputs(modbus, obstruction2.address) == [True]
    whats = [(e["what"], e["value"]) for e in board.history]
    assert ("emergency_button", True) in whats and ("emergency_button", False) in whats


async def test_addresses_beyond_the_board_are_illegal(modbus: AsyncModbusTcpClient) -> None:
    rr = await modbus.read_holding_registers(200, count=1, device_id=1)
    assert rr.isError() and rr.exception_code == 2


# ---- people ----


async def test_walk_waits_for_the_unlock_coil_then_breaks_beams_in_order(
    sim: SimServer, modbus: AsyncModbusTcpClient
) -> None:
    board = sim.boards[1]
    walk = asyncio.create_task(board.walk(1, "entry", wait_timeout_s=2.0, step_s=0.04))
    await asyncio.sleep(0.1)
    assert not walk.done() and beams(board.history) == []

    rr = await modbus.write_coil(LANE1.coils.unlock_entry, True, device_id=1)
    assert not rr.isError()
    seen: list[tuple[bool, bool]] = []
    while not walk.done():
        entry, exit_ = await read_inputs(modbus, LANE1.inputs.sensor_entry_side.address, 2)
        if not seen or seen[-1] != (entry, exit_):
            seen.append((entry, exit_))
        await asyncio.sleep(0.005)

    assert await walk is True
    assert beams(board.history) == ENTRY_SEQUENCE
    # What the daemon sees on the wire: the same sequence, both beams at once in the middle.
    assert [s for s in seen if s != (False, False)] == [(True, False), (True, True), (False, True)]


async def test_exit_walk_is_the_mirror_and_waits_for_unlock_exit(sim: SimServer) -> None:
    board = sim.boards[1]
    assert LANE2.coils.unlock_exit is not None
    board.write_coils(LANE2.coils.unlock_entry, [True])
    assert await board.walk(2, "exit", wait_timeout_s=0.1, step_s=0.01) is False
    board.write_coils(LANE2.coils.unlock_exit, [True])
    assert await board.walk(2, "exit", wait_timeout_s=0.5, step_s=0.01) is True
    assert beams(board.history, channel=2) == EXIT_SEQUENCE


async def test_forced_passage_tailgate_and_back_out(sim: SimServer) -> None:
    board = sim.boards[1]
    assert await board.walk(1, "entry", wait_unlock=False, step_s=0.01) is True
    assert beams(board.history) == ENTRY_SEQUENCE

    board.clear_history()
    board.write_coils(LANE1.coils.unlock_entry, [True])
    assert await board.tailgate(1, "entry", step_s=0.01) is True
    assert beams(board.history) == ENTRY_SEQUENCE * 2

    board.clear_history()
    await board.back_out(1, "exit", step_s=0.01)
    assert beams(board.history) == [("sensor_exit_side", True), ("sensor_exit_side", False)]


async def test_walks_on_two_lanes_run_at_once(sim: SimServer) -> None:
    board = sim.boards[1]
    walks = [asyncio.create_task(board.walk(ch, "entry", step_s=0.01)) for ch in (1, 2)]
    await asyncio.sleep(0.05)
    board.write_coils(LANE1.coils.unlock_entry, [True])
    board.write_coils(LANE2.coils.unlock_entry, [True])
    assert await asyncio.wait_for(asyncio.gather(*walks), 2.0) == [True, True]


# ---- watchdog ----


def test_watchdog_trips_to_each_lanes_fail_state_and_clears_on_heartbeat() -> None:
    clock = FakeClock()
    board = SimBoard(PRESET, unit=1, lanes=2, clock=clock)
    board.write_registers(REGS.watchdog_ms, [200])
    board.write_registers(REGS.fail_open_mask, [0b01])
    board.write_coils(LANE2.coils.unlock_entry, [True])

    for beat in range(1, 6):
        clock.now += 0.15
        board.write_registers(REGS.heartbeat, [beat])
        board.tick()
    assert not board.watchdog_tripped

    # A repeated value is not a heartbeat: a hung daemon rewriting it must still trip.
    clock.now += 0.1
    board.write_registers(REGS.heartbeat, [5])
    clock.now += 0.1
    board.tick()
    assert board.watchdog_tripped
    assert board.outputs(1) == {"unlock_entry": True, "unlock_exit": True, "alarm": False}
    assert board.outputs(2) == {"unlock_entry": False, "unlock_exit": False, "alarm": False}
    assert board.coils[LANE2.coils.unlock_entry] is True

    board.write_registers(REGS.heartbeat, [6])
    assert not board.watchdog_tripped
    assert board.outputs(1) == {"unlock_entry": False, "unlock_exit": False, "alarm": False}
    assert board.outputs(2)["unlock_entry"] is True
    assert [e["value"] for e in board.history if e["what"] == "watchdog"] == [True, False]


def test_watchdog_default_applies_before_the_daemon_configures_it() -> None:
    clock = FakeClock()
    board = SimBoard(
        PRESET, lanes=2, default_watchdog_ms=500, default_fail_open_mask=0b10, clock=clock
    )
    clock.now += 0.6
    board.tick()
    assert board.watchdog_tripped
    assert board.outputs(2)["unlock_exit"] is True and board.outputs(1)["unlock_exit"] is False


async def test_watchdog_over_modbus_when_heartbeats_stop(
    sim: SimServer, modbus: AsyncModbusTcpClient
) -> None:
    board = sim.boards[1]
    await modbus.write_registers(REGS.watchdog_ms, [100, 0b10], device_id=1)
    for beat in range(1, 8):
        await modbus.write_register(REGS.heartbeat, beat, device_id=1)
        await asyncio.sleep(0.02)
    assert not board.watchdog_tripped and board.heartbeat_count == 7

    stopped = time.monotonic()
    # Lane 2 fails open, so its unlock output coming on is the trip.
    assert await board.wait_output(2, "unlock_entry", True, timeout_s=1.0)
    trips = [e for e in board.history if e["what"] == "watchdog"]
    assert trips and trips[0]["value"] is True
    # 100 ms after the last beat, give or take the 10 ms check and a busy test machine.
    assert 0.05 <= trips[0]["t"] - stopped <= 0.3
    assert board.outputs(2) == {"unlock_entry": True, "unlock_exit": True, "alarm": False}

    await modbus.write_register(REGS.heartbeat, 8, device_id=1)
    assert not board.watchdog_tripped and board.outputs(2)["unlock_entry"] is False


# ---- link faults ----


async def test_mute_link_times_out_and_up_restores(
    sim: SimServer, modbus: AsyncModbusTcpClient
) -> None:
    sim.boards[1].set_link("mute")
    with pytest.raises(ModbusIOException):
        await modbus.read_discrete_inputs(0, count=8, device_id=1)
    sim.boards[1].set_link("up")
    assert len(await read_inputs(modbus, 0, 8)) == 8


async def test_muted_board_hears_nothing_so_its_watchdog_trips(
    sim: SimServer, modbus: AsyncModbusTcpClient
) -> None:
    board = sim.boards[1]
    await modbus.write_register(REGS.watchdog_ms, 100, device_id=1)
    board.set_link("mute")
    with pytest.raises(ModbusIOException):
        await modbus.write_register(REGS.heartbeat, 1, device_id=1)
    assert board.heartbeat_count == 0
    await asyncio.sleep(0.05)
    assert board.watchdog_tripped


async def test_exception_link_answers_every_request_with_an_error(
    sim: SimServer, modbus: AsyncModbusTcpClient
) -> None:
    sim.boards[1].set_link("exception")
    rr = await modbus.read_discrete_inputs(0, count=8, device_id=1)
    assert rr.isError() and rr.exception_code == 4
    rr = await modbus.write_coil(LANE1.coils.unlock_entry, True, device_id=1)
    assert rr.isError()
    assert sim.boards[1].coils[LANE1.coils.unlock_entry] is False


async def test_slow_link_answers_late(sim: SimServer) -> None:
    sim.boards[1].set_link("slow")
    client = AsyncModbusTcpClient("127.0.0.1", port=sim.tcp_port or 0, timeout=1.5, retries=0)
    try:
        assert await client.connect()
        started = time.monotonic()
        rr = await client.read_discrete_inputs(0, count=8, device_id=1)
        assert not rr.isError() and time.monotonic() - started >= 0.45
    finally:
        client.close()


async def test_garbled_replies_and_unknown_units_give_no_answer(
    sim: SimServer, modbus: AsyncModbusTcpClient
) -> None:
    sim.boards[1].set_link("garble")
    with pytest.raises(ModbusIOException):
        await modbus.read_discrete_inputs(0, count=8, device_id=1)
    sim.boards[1].set_link("up")
    with pytest.raises(ModbusIOException):
        await modbus.read_discrete_inputs(0, count=8, device_id=7)
    assert len(await read_inputs(modbus, 0, 8)) == 8


# ---- RTU over a pty pair ----


async def test_rtu_over_a_pty_pair(tmp_path: Path) -> None:
    link = tmp_path / "ttyGATE0"
    board = SimBoard(PRESET, unit=3, lanes=1)
    server = SimServer([board])
    client: AsyncModbusSerialClient | None = None
    try:
        device = await server.start_rtu(link=str(link))
        assert os.readlink(link) == device
        client = AsyncModbusSerialClient(
            str(link), framer=FramerType.RTU, baudrate=115200, timeout=0.2, retries=0
        )
        assert await client.connect()
        board.set_emergency(True)
        assert await read_inputs(client, EMERGENCY.address, 2, unit=3) == [False, True]
        rr = await client.write_coil(LANE1.coils.unlock_entry, True, device_id=3)
        assert not rr.isError()
        assert board.outputs(1)["unlock_entry"] is True
        assert board.coil_writes[-1]["values"] == [True]
    finally:
        if client is not None:
            client.close()
        await server.close()
    assert not link.exists()


# ---- the control channel, in-process ----


async def test_control_requests_and_errors(sim: SimServer, tmp_path: Path) -> None:
    control = ControlServer(sim, str(tmp_path / "ctl.sock"))
    try:
        assert (await control.handle({"cmd": "fire", "on": True}))["ok"]
        state = await control.handle({"cmd": "state"})
        assert state["units"]["1"]["board_inputs"]["fire"] is True
        bad = [
            {"cmd": "nope"},
            {"cmd": "walk", "channel": 9, "direction": "entry"},
            {"cmd": "walk", "channel": 1, "direction": "sideways"},
            {"cmd": "obstruction", "channel": True, "on": True},
            {"cmd": "link", "mode": "flaky"},
            {"cmd": "state", "unit": 5},
        ]
        for req in bad:
            reply = await control.handle(req)
            assert reply["ok"] is False and reply["error"], req
    finally:
        await control.close()


# ---- the gate-sim process ----


def _start_sim(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    ready = tmp_path / "ready.json"
    cmd = [sys.executable, "-m", "drivers.sim", "--ready-file", str(ready), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.communicate()[0].decode(errors="replace")
            pytest.fail(f"gate-sim did not start:\n{out}")
        time.sleep(0.02)
    return proc, json.loads(ready.read_text())


def _stop_sim(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out = proc.communicate(timeout=5)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
    return out.decode(errors="replace")


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """gate-sim with two boards on TCP (port 0) and RTU, and a control socket."""
    proc, info = _start_sim(
        tmp_path,
        "--units", "1,2",
        "--lanes", "2",
        "--tcp", "127.0.0.1:0",
        "--rtu-link", str(tmp_path / "ttyGATE"),
        "--control", str(tmp_path / "sim.sock"),
    )  # fmt: skip
    try:
        yield {**info, "proc": proc, "tmp": tmp_path}
    finally:
        _stop_sim(proc)


async def test_process_walks_on_two_lanes_while_the_daemon_unlocks_them(
    sim_process: dict[str, Any],
) -> None:
    client = AsyncModbusTcpClient("127.0.0.1", port=sim_process["tcp_port"], timeout=0.5, retries=0)
    ctl = SimClient(sim_process["control"])
    ctl.wait_ready(5)
    try:
        assert await client.connect()
        since = time.monotonic()
        walks = [
            asyncio.create_task(asyncio.to_thread(_walk_in_own_connection, sim_process, ch))
            for ch in (1, 2)
        ]
        await asyncio.sleep(0.1)
        for lane in (LANE1, LANE2):
            rr = await client.write_coil(lane.coils.unlock_entry, True, device_id=2)
            assert not rr.isError()
        assert await asyncio.wait_for(asyncio.gather(*walks), 5) == [True, True]

        history = ctl.history(since, unit=2)
        assert beams(history, 1) == ENTRY_SEQUENCE and beams(history, 2) == ENTRY_SEQUENCE
        unlocks = [e for e in history if e["what"] == "unlock_entry"]
        assert all(e["t"] > since for e in unlocks) and len(unlocks) == 2
        writes = ctl.coil_writes(since)
        assert [(w["unit"], w["address"], w["values"]) for w in writes] == [
            (2, LANE1.coils.unlock_entry, [True]),
            (2, LANE2.coils.unlock_entry, [True]),
        ]
        assert ctl.state(1)["lanes"]["1"]["outputs"]["unlock_entry"] is False
        ctl.clear_history()
        assert ctl.history() == []
    finally:
        ctl.close()
        client.close()


def _walk_in_own_connection(sim_process: dict[str, Any], channel: int) -> bool:
    with SimClient(sim_process["control"]) as ctl:
        return ctl.walk(channel, "entry", wait_timeout_s=3.0, unit=2)


async def test_process_control_commands_reach_the_wire(sim_process: dict[str, Any]) -> None:
    client = AsyncModbusSerialClient(
        sim_process["rtu_link"], framer=FramerType.RTU, baudrate=115200, timeout=0.2, retries=0
    )
    try:
        with SimClient(sim_process["control"]) as ctl:
            assert await client.connect()
            ctl.emergency(True, unit=1)
            ctl.obstruction(1, True, unit=2)
            assert await read_inputs(client, EMERGENCY.address, 2, unit=1) == [False, True]
            assert await read_inputs(client, EMERGENCY.address, 2, unit=2) == [True, True]
            obstruction = LANE1.inputs.obstruction
            assert obstruction is not None
            assert await read_inputs(client, obstruction.address, 1, unit=2) == [False]

            ctl.link("exception", unit=2)
            rr = await client.read_coils(0, count=8, device_id=2)
            assert rr.isError()
            ctl.link("mute")
            with pytest.raises(ModbusIOException):
                await client.read_coils(0, count=8, device_id=1)
            ctl.link("up")
            assert not (await client.read_coils(0, count=8, device_id=2)).isError()

            assert ctl.walk(1, wait_timeout_s=0.05) is False
            with pytest.raises(SimError, match=r"lanes 1\.\.2"):
                ctl.walk(3)
    finally:
        client.close()


def test_process_exits_cleanly_on_sigterm_and_removes_its_files(tmp_path: Path) -> None:
    link, sock = tmp_path / "ttyGATE", tmp_path / "sim.sock"
    proc, info = _start_sim(
        tmp_path, "--rtu-link", str(link), "--control", str(sock), "--watchdog-ms", "50"
    )
    try:
        assert info["tcp_port"] is None and os.path.realpath(link) == info["rtu_device"]
        with SimClient(str(sock)) as ctl:
            ctl.wait_ready(5)
            time.sleep(0.1)
            assert ctl.state(1)["watchdog_tripped"] is True
    finally:
        out = _stop_sim(proc)
    assert proc.returncode == 0, out
    assert "watchdog TRIPPED" in out and "sim stopped" in out
    assert not link.exists() and not link.is_symlink()
    assert not sock.exists() and not (tmp_path / "ready.json").exists()


def test_rejects_a_preset_without_enough_channels() -> None:
    small: BoardPreset = PRESET.model_copy(update={"channels": 1})
    with pytest.raises(ValueError, match="lanes"):
        SimBoard(small, lanes=2)
