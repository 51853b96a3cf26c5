"""The serial QR scanner driver against a pty scanner: framing, garbage, debounce, unplug."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import Credential
from drivers.qr_serial import LINE_TRIM, TERMINATORS, ScanFramer, SerialScanner
from drivers.sim.scanner import SimScanner

WAIT_S = 3.0


@pytest.fixture
def sim() -> Iterator[SimScanner]:
    with SimScanner() as scanner:
        yield scanner


async def until(check: Callable[[], bool], within_s: float = WAIT_S) -> None:
    """Wait until ``check()`` holds, polling the loop."""
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@asynccontextmanager
async def running(scanner: SerialScanner) -> AsyncIterator[list[Credential]]:
    """Run the scanner into a list until the block ends, then stop it."""
    got: list[Credential] = []
    task = asyncio.create_task(scanner.run(got.append))
    try:
        await until(lambda: bool(scanner.stats()["connected"]))
        yield got
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def values(got: list[Credential]) -> list[str]:
    return [c.value for c in got]


@pytest.mark.parametrize("terminator", ["CR", "LF", "CRLF"])
async def test_each_terminator_splits_codes(sim: SimScanner, terminator: str) -> None:
    scanner = SerialScanner("lane1-qr", sim.path, terminator=terminator)  # type: ignore[arg-type]
    async with running(scanner) as got:
        sim.scan("GA1.first", terminator)
        sim.scan("GA1.second", terminator)
        await until(lambda: len(got) == 2)
    assert values(got) == ["GA1.first", "GA1.second"]
    assert {c.kind for c in got} == {"qr"}
    assert {c.reader for c in got} == {"lane1-qr"}


async def test_a_code_split_over_many_writes_is_one_code(sim: SimScanner) -> None:
    scanner = SerialScanner("q", sim.path, terminator="CRLF")
    async with running(scanner) as got:
        for piece in (b"GA1.", b"slow", b"ly\r", b"\nNEXT\r\n"):
            sim.send_raw(piece)
            await asyncio.sleep(0.02)
        await until(lambda: len(got) == 2)
    assert values(got) == ["GA1.slowly", "NEXT"]


async def test_prefix_and_suffix_are_stripped(sim: SimScanner) -> None:
    scanner = SerialScanner("q", sim.path, prefix="\x02", suffix="\x03")
    async with running(scanner) as got:
        sim.scan("TICKET-1", prefix="\x02", suffix="\x03")
        sim.send_raw(b"no framing\r")
        sim.send_raw(b"\x1b\x00\x02TICKET-2\x03\r")
        await until(lambda: len(got) == 2)
        await until(lambda: scanner.stats()["rejected"] == {"no_prefix": 1})
    assert values(got) == ["TICKET-1", "TICKET-2"]


async def test_garbage_between_codes_is_tolerated(sim: SimScanner) -> None:
    scanner = SerialScanner("q", sim.path)
    async with running(scanner) as got:
        sim.scan("A-1")
        sim.send_raw(b"\x00\x00\xff\xfe\r\x1b[2J\r\r\n")
        sim.scan("A-2")
        await until(lambda: len(got) == 2)
        await until(lambda: sum(scanner.stats()["rejected"].values()) == 3)  # type: ignore[attr-defined]
    assert values(got) == ["A-1", "A-2"]
    assert scanner.stats()["rejected"] == {"not_utf8": 1, "control_chars": 1, "empty": 1}


async def test_over_long_run_is_dropped_up_to_the_next_terminator(sim: SimScanner) -> None:
    scanner = SerialScanner("q", sim.path, max_length=16)
    async with running(scanner) as got:
        for _ in range(10):
            sim.send_raw(b"X" * 30)
            await asyncio.sleep(0.005)
        sim.send_raw(b"tail of the run\rGOOD-1\r")
        sim.scan("Y" * 17)
        sim.scan("Y" * 16)
        await until(lambda: len(got) == 2)
        await until(lambda: scanner.stats()["rejected"] == {"too_long": 2})
    assert values(got) == ["GOOD-1", "Y" * 16]


async def test_same_code_within_debounce_window_is_ignored(sim: SimScanner) -> None:
    now = [100.0]
    scanner = SerialScanner("q", sim.path, debounce_s=1.0, clock=lambda: now[0])
    async with running(scanner) as got:
        sim.scan("SAME")
        await until(lambda: len(got) == 1)
        now[0] += 0.5
        sim.scan("SAME")
        await until(lambda: scanner.stats()["repeats"] == 1)
        # The window slides: a code held under the scanner stays one read.
        now[0] += 0.9
        sim.scan("SAME")
        await until(lambda: scanner.stats()["repeats"] == 2)
        sim.scan("OTHER")
        await until(lambda: len(got) == 2)
        now[0] += 1.5
        sim.scan("OTHER")
        await until(lambda: len(got) == 3)
    assert values(got) == ["SAME", "OTHER", "OTHER"]
    assert [c.at for c in got] == [100.0, 101.4, 102.9]


async def test_unplug_raises_alarm_and_replug_recovers(
    sim: SimScanner, caplog: pytest.LogCaptureFixture
) -> None:
    scanner = SerialScanner("q", sim.path, reopen_max_s=0.2)
    async with running(scanner) as got:
        sim.scan("BEFORE")
        await until(lambda: len(got) == 1)
        sim.unplug()
        await until(lambda: scanner.stats()["alarm"] is True)
        assert scanner.stats()["connected"] is False
        await asyncio.sleep(0.5)
        sim.replug()
        await until(lambda: scanner.stats()["connected"] is True)
        assert scanner.stats()["alarm"] is False
        sim.scan("AFTER")
        await until(lambda: len(got) == 2)
    assert values(got) == ["BEFORE", "AFTER"]
    assert scanner.stats()["outages"] == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, "an outage is logged once, however many reopen attempts fail"
    assert not any("BEFORE" in r.getMessage() or "AFTER" in r.getMessage() for r in caplog.records)


async def test_missing_device_at_start_is_an_alarm_not_an_error() -> None:
    scanner = SerialScanner("q", "/nonexistent/serial/by-id/scanner", reopen_max_s=0.1)
    task = asyncio.create_task(scanner.run(lambda c: None))
    await until(lambda: scanner.stats()["alarm"] is True)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_loop_url_reads_what_the_port_receives() -> None:
    scanner = SerialScanner("q", "loop://", terminator="LF")
    async with running(scanner) as got:
        # loop:// hands back whatever is written to the port, so write to the driver's own port.
        port = scanner._port
        assert port is not None
        port.write(b"LOOPED\n")
        await until(lambda: len(got) == 1)
    assert values(got) == ["LOOPED"]


async def test_socket_url_scanner_reconnects_after_the_server_drops() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    scanner = SerialScanner("q", f"socket://127.0.0.1:{port}", reopen_max_s=0.2)
    try:
        async with running(scanner) as got:
            await until(lambda: len(writers) == 1)
            writers[0].write(b"NET-1\r")
            await until(lambda: len(got) == 1)
            writers[0].close()
            await until(lambda: scanner.stats()["outages"] == 1)
            await until(lambda: len(writers) == 2 and scanner.stats()["connected"] is True)
            writers[1].write(b"NET-2\r")
            await until(lambda: len(got) == 2)
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
    assert values(got) == ["NET-1", "NET-2"]


async def test_second_reader_on_a_taken_port_is_an_alarm(sim: SimScanner) -> None:
    first = SerialScanner("lane1", sim.path)
    second = SerialScanner("lane2", sim.path, reopen_max_s=0.1)
    async with running(first) as got:
        task = asyncio.create_task(second.run(lambda c: None))
        await until(lambda: second.stats()["alarm"] is True)
        sim.scan("ONLY-LANE1")
        await until(lambda: len(got) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_random_bytes_on_the_wire_do_not_stop_the_scanner(sim: SimScanner) -> None:
    scanner = SerialScanner("q", sim.path, max_length=64)
    rng = random.Random(7)
    async with running(scanner) as got:
        for _ in range(64):
            sim.send_raw(rng.randbytes(256))
            await asyncio.sleep(0.001)
        sim.send_raw(b"\r")
        sim.scan("STILL-ALIVE")
        await until(lambda: bool(got) and got[-1].value == "STILL-ALIVE")
    assert scanner.stats()["connected"] is False  # stopped cleanly after the block


def _said_by(code: str, data: bytes, framer: ScanFramer) -> bool:
    """Whether ``code`` is what one terminated line of ``data`` says, framing removed."""
    framed = framer.prefix + code.encode() + framer.suffix
    lines = data.split(framer.terminator)[:-1]
    for line in lines:
        line = line.strip(LINE_TRIM)
        if framer.prefix and line.endswith(framed):
            return True
        if not framer.prefix and line == framed:
            return True
    return False


def _feed_in_chunks(framer: ScanFramer, data: bytes, cuts: list[int]) -> list[str]:
    codes: list[str] = []
    start = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        codes += framer.feed(data[start:cut])
        start = cut
    return codes


framings = st.sampled_from(list(TERMINATORS)).flatmap(
    lambda t: st.tuples(
        st.just(t), st.sampled_from(["", "\x02", "]Q1"]), st.sampled_from(["", "\x03"])
    )
)


@settings(max_examples=300, deadline=None)
@given(
    framing=framings,
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=8),
)
def test_fuzz_random_bytes_only_yield_codes_the_bytes_say(
    framing: tuple[str, str, str], data: bytes, cuts: list[int]
) -> None:
    terminator, prefix, suffix = framing
    framer = ScanFramer(terminator, prefix, suffix, max_length=40)  # type: ignore[arg-type]
    for code in _feed_in_chunks(framer, data, cuts):
        assert _said_by(code, data, framer)
        assert 0 < len(code.encode()) <= 40


codes = st.text(
    alphabet=st.characters(
        min_codepoint=0x20, max_codepoint=0x2FF, exclude_categories=("Cc", "Cs")
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(
    framing=framings,
    sent=st.lists(codes, min_size=1, max_size=6),
    mutations=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=8),
)
def test_fuzz_mutated_lines_only_yield_codes_the_bytes_say(
    framing: tuple[str, str, str],
    sent: list[str],
    mutations: list[tuple[int, int]],
    cuts: list[int],
) -> None:
    terminator, prefix, suffix = framing
    term = TERMINATORS[terminator].decode()
    clean = "".join(prefix + code + suffix + term for code in sent).encode()
    data = bytearray(clean)
    for where, byte in mutations:
        data[where % len(data)] = byte
    framer = ScanFramer(terminator, prefix, suffix, max_length=120)  # type: ignore[arg-type]
    got = _feed_in_chunks(framer, bytes(data), cuts)
    for code in got:
        assert _said_by(code, bytes(data), framer)
    if not mutations and not any(prefix and prefix in code for code in sent):
        assert got == sent
