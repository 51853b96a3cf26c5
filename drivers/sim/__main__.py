"""gate-sim: simulated turnstile I/O boards on Modbus TCP and/or RTU (``python -m drivers.sim``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from drivers.presets import load_preset
from drivers.sim.board import SimBoard

log = logging.getLogger("drivers.sim")


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _unit_ids(text: str) -> list[int]:
    try:
        units = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected unit ids like 1,2 got {text!r}") from None
    if not units or len(set(units)) != len(units) or not all(1 <= u <= 247 for u in units):
        raise argparse.ArgumentTypeError(f"expected distinct unit ids in 1..247, got {text!r}")
    return units


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gate-sim", description="Simulated turnstile I/O boards for tests and the demo."
    )
    p.add_argument("--preset", default="gt-io4", help="board preset name or TOML path")
    p.add_argument("--units", type=_unit_ids, default=[1], help="Modbus unit ids, e.g. 1,2")
    p.add_argument("--lanes", type=int, default=2, help="lanes wired to each board")
    p.add_argument("--tcp", type=_host_port, metavar="HOST:PORT", help="serve Modbus TCP")
    p.add_argument("--rtu", action="store_true", help="serve Modbus RTU on a pty pair")
    p.add_argument("--rtu-link", metavar="PATH", help="serve RTU and symlink the device here")
    p.add_argument("--control", metavar="PATH", help="Unix socket for JSON-lines control")
    p.add_argument("--watchdog-ms", type=int, default=0, help="watchdog time until configured")
    p.add_argument("--fail-open-mask", type=int, default=0, help="fail-open lanes until configured")
    p.add_argument("--ready-file", metavar="PATH", help="write JSON with port/device when serving")
    p.add_argument("-v", "--verbose", action="store_true", help="also print every beam change")
    args = p.parse_args(argv)
    if not (args.tcp or args.rtu or args.rtu_link):
        p.error("give --tcp HOST:PORT and/or --rtu / --rtu-link PATH")
    return args


def _describe(entry: dict[str, Any], verbose: bool) -> str | None:
    """The printed line for one history entry, or None for beam changes when not verbose."""
    where = f"sim unit {entry['unit']}"
    if entry["channel"] is not None:
        where += f" lane {entry['channel']}"
    what, value = entry["what"], entry["value"]
    if what == "watchdog":
        text = "watchdog TRIPPED, outputs in fail state" if value else "watchdog cleared"
    elif what.startswith("sensor_") and not verbose:
        return None
    else:
        text = f"{what} {'ON' if value else 'OFF'}"
    return f"{where}: {text}"


def _write_ready_file(path: str, info: dict[str, Any]) -> None:
    # Written whole and renamed, so a waiting test never reads half a file.
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f)
    os.replace(tmp, path)


async def _run(args: argparse.Namespace) -> int:
    # Imported here so `--help` and argument errors stay quick.
    from drivers.sim.control import ControlServer
    from drivers.sim.server import SimServer

    preset = load_preset(args.preset)
    boards = [
        SimBoard(
            preset,
            unit=unit,
            lanes=args.lanes,
            default_watchdog_ms=args.watchdog_ms,
            default_fail_open_mask=args.fail_open_mask,
        )
        for unit in args.units
    ]

    def print_entry(entry: dict[str, Any]) -> None:
        if line := _describe(entry, args.verbose):
            log.info("%s", line)

    for board in boards:
        board.listeners.append(print_entry)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if args.ready_file:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.ready_file)
    sim = SimServer(boards)
    control: ControlServer | None = None
    try:
        if args.tcp:
            await sim.start_tcp(*args.tcp)
        if args.rtu or args.rtu_link:
            await sim.start_rtu(link=args.rtu_link)
        if args.control:
            control = ControlServer(sim, args.control)
            await control.start()
        info = {
            "tcp_port": sim.tcp_port,
            "rtu_device": sim.rtu_device,
            "rtu_link": sim.rtu_link,
            "control": args.control,
            "units": args.units,
            "pid": os.getpid(),
        }
        if args.ready_file:
            _write_ready_file(args.ready_file, info)
        served = []
        if sim.tcp_port is not None:
            served.append(f"tcp {args.tcp[0]}:{sim.tcp_port}")
        if sim.rtu_device is not None:
            served.append(f"rtu {sim.rtu_link or sim.rtu_device}")
        log.info(
            "sim ready: %s, units %s, %d lanes each (%s)",
            ", ".join(served),
            ",".join(map(str, args.units)),
            args.lanes,
            preset.name,
        )
        await stop.wait()
    finally:
        if control is not None:
            await control.close()
        await sim.close()
        if args.ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.ready_file)
    log.info("sim stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the gate-sim console script."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    # pymodbus logs every request at INFO/DEBUG; the demo wants the board's story only.
    logging.getLogger("pymodbus").setLevel(logging.WARNING)
    try:
        return asyncio.run(_run(args))
    except (OSError, ValueError) as exc:
        print(f"gate-sim: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
