"""``make bench``: timing figures of the real daemon against the simulated board.

Prints one line per figure, ``BENCH <name> <value> <unit>``. Times are taken from the
simulated board's own history (monotonic clock, shared by all processes on Linux): from the
moment an input changed on the board to the moment the board saw the coil write.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from agent.testbed import Testbed, Transport, wait_for


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def emit(name: str, value: float, unit: str) -> None:
    print(f"BENCH {name} {value:.2f} {unit}", flush=True)


def all_open(tb: Testbed) -> bool:
    lanes = tb.sim.state(1)["lanes"].values()
    return all(lane["outputs"]["unlock_entry"] and lane["outputs"]["unlock_exit"] for lane in lanes)


def emergency_latency(tb: Testbed, trials: int) -> list[float]:
    """Emergency input set on the board -> every lane's unlock coils set, in ms."""
    lat = []
    for _ in range(trials):
        tb.sim.clear_history()
        tb.sim.emergency(True)
        wait_for(lambda: all_open(tb), 2, "every lane open")
        hist = tb.sim.history()
        pressed = next(h["t"] for h in hist if h["what"] == "emergency_button" and h["value"])
        opened: dict[tuple[int, str], float] = {}
        for h in hist:
            if h["what"] in ("unlock_entry", "unlock_exit") and h["value"] and h["t"] >= pressed:
                opened.setdefault((h["channel"], h["what"]), h["t"])
        lat.append((max(opened.values()) - pressed) * 1000)
        tb.sim.emergency(False)
        wait_for(lambda: tb.ctl({"cmd": "emergency", "action": "reset"})["ok"], 2, "reset")
        tb.wait_modes("locked", timeout_s=3)
    return lat


def unlock_latency(tb: Testbed, trials: int) -> list[float]:
    """Control-socket unlock request sent -> the board sees the unlock coil, in ms."""
    lat = []
    for i in range(trials):
        lane = 1 + i % 2
        tb.sim.clear_history()
        t0 = time.monotonic()
        assert tb.ctl({"cmd": "open", "lane": f"L{lane}", "direction": "entry"})["ok"]
        wait_for(
            lambda lane=lane: tb.sim.state(1)["lanes"][str(lane)]["outputs"]["unlock_entry"],
            2,
            "unlock",
        )
        t = next(
            h["t"]
            for h in tb.sim.history()
            if h["what"] == "unlock_entry" and h["value"] and h["channel"] == lane
        )
        lat.append((t - t0) * 1000)
        tb.sim.walk(lane, "entry")
        tb.wait_modes("locked", timeout_s=3)
    return lat


def fault_latency(tb: Testbed, trials: int) -> list[float]:
    """Board stops answering -> both lanes in fault (seen through the control socket), in ms."""
    lat = []
    for _ in range(trials):
        t0 = time.monotonic()
        tb.sim.link("mute")
        tb.wait_modes("fault", timeout_s=3)
        lat.append((time.monotonic() - t0) * 1000)
        tb.sim.link("up")
        tb.wait_modes("locked", timeout_s=5)
    return lat


def run(transport: Transport, trials: int) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="gate-bench-") as d,
        Testbed(
            Path(d),
            transport=transport,
            lane={"close_time_s": 0.1, "unlock_timeout_s": 4},
            log_format="json",
        ) as tb,
    ):
        tb.start_sim()
        tb.start_daemon()
        sfx = "" if transport == "tcp" else "_rtu"
        lat = emergency_latency(tb, trials)
        emit(f"emergency_to_coils_p50_ms{sfx}", statistics.median(lat), "ms")
        emit(f"emergency_to_coils_p99_ms{sfx}", pct(lat, 99), "ms")
        emit(f"emergency_to_coils_max_ms{sfx}", max(lat), "ms")
        lat = unlock_latency(tb, max(20, trials // 4))
        emit(f"unlock_to_coil_p50_ms{sfx}", statistics.median(lat), "ms")
        emit(f"unlock_to_coil_p99_ms{sfx}", pct(lat, 99), "ms")
        lat = fault_latency(tb, 10)
        emit(f"link_loss_to_fault_max_ms{sfx}", max(lat), "ms")
        c0, t0 = tb.status()["buses"][0]["cycles"], time.monotonic()
        time.sleep(3)
        c1, t1 = tb.status()["buses"][0]["cycles"], time.monotonic()
        emit(f"poll_cycles_per_s{sfx}", (c1 - c0) / (t1 - t0), "1/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--transport", choices=["tcp", "rtu", "both"], default="both")
    args = parser.parse_args(argv)
    for transport in ("tcp", "rtu") if args.transport == "both" else (args.transport,):
        run(transport, args.trials)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
