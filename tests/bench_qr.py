"""``python -m tests.bench_qr``: QR decode time per camera frame and serial line latency.

Prints one line per figure, ``BENCH <name> <value> <unit>``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from drivers.base import Credential
from drivers.camera import decode_qr, to_gray
from drivers.qr_serial import SerialScanner
from drivers.sim.camera import blank_frame, qr_frame
from drivers.sim.scanner import SimScanner

# A signed ticket token is about this long; longer codes mean denser QR codes.
TOKEN = "GA1.eyJ0IjoiVDAwMDEyMzQ1IiwiZXYiOiJFVjIwMjYiLCJ6IjoiQSJ9.Q2hlY2tzdW1TaWduYXR1cmU"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def emit(name: str, value: float, unit: str) -> None:
    print(f"BENCH {name} {value:.3f} {unit}", flush=True)


def camera_decode(frames: int, density: int = 1) -> tuple[list[float], list[float]]:
    """Milliseconds to convert and decode 640×480 BGR frames with and without a code."""
    with_code = [qr_frame(TOKEN, bgr=True, at=(20 + n % 40, 40 + n % 200)) for n in range(16)]
    empty = blank_frame()
    decode_qr(to_gray(with_code[0]))
    code_ms: list[float] = []
    blank_ms: list[float] = []
    for n in range(frames):
        frame = with_code[n % len(with_code)]
        t0 = time.perf_counter()
        texts = decode_qr(to_gray(frame), density=density)
        code_ms.append((time.perf_counter() - t0) * 1000)
        assert texts == [TOKEN], texts
        t0 = time.perf_counter()
        decode_qr(empty, density=density)
        blank_ms.append((time.perf_counter() - t0) * 1000)
    return code_ms, blank_ms


async def serial_latency(trials: int) -> list[float]:
    """Milliseconds from a code's bytes written to the scanner pty to the listener call."""
    latencies: list[float] = []
    with SimScanner() as sim:
        scanner = SerialScanner("bench", sim.path, debounce_s=0)
        heard = asyncio.Event()
        sent_at = 0.0

        def listener(_: Credential) -> None:
            latencies.append((time.perf_counter() - sent_at) * 1000)
            heard.set()

        task = asyncio.create_task(scanner.run(listener))
        try:
            deadline = time.monotonic() + 5
            while not scanner.stats()["connected"]:
                assert time.monotonic() < deadline, "the scanner did not connect"
                await asyncio.sleep(0.01)
            for n in range(trials):
                heard.clear()
                sent_at = time.perf_counter()
                sim.scan(f"{TOKEN}.{n}")
                async with asyncio.timeout(2):
                    await heard.wait()
                # A person needs far longer than this between two scans.
                await asyncio.sleep(0.003)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return latencies


def main() -> None:
    """Run both benchmarks and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--scans", type=int, default=500)
    args = parser.parse_args()

    code_ms, blank_ms = camera_decode(args.frames)
    emit("camera_qr_decode_ms", statistics.median(code_ms), "ms")
    emit("camera_qr_decode_p99_ms", pct(code_ms, 99), "ms")
    emit("camera_blank_decode_ms", statistics.median(blank_ms), "ms")
    code_ms, _ = camera_decode(args.frames, density=2)
    emit("camera_qr_decode_density2_ms", statistics.median(code_ms), "ms")

    lat = asyncio.run(serial_latency(args.scans))
    emit("qr_serial_line_to_listener_p50_ms", statistics.median(lat), "ms")
    emit("qr_serial_line_to_listener_p99_ms", pct(lat, 99), "ms")


if __name__ == "__main__":
    main()
