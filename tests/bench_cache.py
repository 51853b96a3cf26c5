"""Offline cache figures with 1,000,000 tickets (part of ``make bench``).

Snapshot import (streamed, 10,000 per chunk), decide latency (cache lookup + rules, the
way a lane decides: ``Admission.lookup``), durable passage commits, memory and file size.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from agent.admission import Admission
from agent.gate.core import Direction
from offline_cache import Cache
from verify.model import Policy

CHUNK = 10_000


def emit(name: str, value: float, unit: str) -> None:
    print(f"BENCH {name} {value:.3f} {unit}", flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def tickets(n: int, now: float) -> Iterator[list[dict[str, object]]]:
    """The snapshot as the cloud streams it: chunks of ticket records."""
    products = ("day", "combo", "season")
    for start in range(0, n, CHUNK):
        yield [
            {
                "id": f"T{i:08d}",
                "code": f"QR{i:08d}X{i * 7919 % 100000:05d}",
                "channel": ("ota", "miniapp", "window", "group")[i % 4],
                "product_id": products[i % 3],
                "valid_from": now - 86400,
                "valid_to": now + 30 * 86400,
                "max_entries_total": 1 + i % 3,
                "version": 1,
            }
            for i in range(start, min(start + CHUNK, n))
        ]


class Lane:
    def __init__(self, lane_id: str) -> None:
        self.id = lane_id
        self.auth: str | None = None

    def unlock(self, direction: Direction, auth: str) -> tuple[bool, str | None]:
        self.auth = auth
        return True, None


def run(n: int, lookups: int, commits: int) -> None:
    now = time.time()
    with tempfile.TemporaryDirectory(prefix="gate-cache-bench-") as d:
        path = Path(d) / "gate.db"
        with Cache(path, policy=Policy()) as cache:
            cache.import_records(
                [
                    {"type": "product", "id": "day", "zones": {"park": 1}},
                    {"type": "product", "id": "combo", "zones": {"park": 1, "cable": 1}},
                    {
                        "type": "product",
                        "id": "season",
                        "zones": {"park": None},
                        "reentry": {"mode": "always"},
                    },
                ]
            )
            t0 = time.monotonic()
            result = cache.apply_snapshot(1, tickets(n, now))
            assert result.status == "applied" and result.tickets == n, result
            emit("snapshot_import_s", time.monotonic() - t0, "s")

            adm = Admission(cache, {"A": "park", "B": "park"}, Policy())
            rng = random.Random(1)
            point = adm.point("A", "entry")
            codes = [
                f"QR{i:08d}X{i * 7919 % 100000:05d}"
                for i in (rng.randrange(n) for _ in range(lookups))
            ]
            codes[::10] = [f"NOPE{i}" for i in range(len(codes[::10]))]
            lat = []
            for code in codes:
                t = time.perf_counter()
                adm.lookup(code, point)
                lat.append((time.perf_counter() - t) * 1000)
            emit("decide_p50_ms", statistics.median(lat), "ms")
            emit("decide_p99_ms", pct(lat, 99), "ms")

            lane = Lane("A")
            commit_lat = []
            for i in range(commits):
                code = f"QR{i:08d}X{i * 7919 % 100000:05d}"
                decision, outcome = adm.present(lane, code, "entry")
                assert outcome == "unlocked", decision
                assert lane.auth is not None
                t = time.perf_counter()
                cache.commit(lane.auth, time.time()).result()
                commit_lat.append((time.perf_counter() - t) * 1000)
            emit("commit_p50_ms", statistics.median(commit_lat), "ms")
            emit("commit_p99_ms", pct(commit_lat, 99), "ms")

            # Decisions while a second full snapshot applies (the sync issue's case).
            during: list[float] = []
            snap = threading.Thread(target=cache.apply_snapshot, args=(2, tickets(n, now)))
            snap.start()
            while snap.is_alive():
                code = codes[len(during) % len(codes)]
                t = time.perf_counter()
                adm.lookup(code, point)
                during.append((time.perf_counter() - t) * 1000)
                time.sleep(0.001)
            snap.join()
            emit("decide_during_snapshot_p99_ms", pct(during, 99), "ms")
            emit("rss_mb", rss_mb(), "MB")
            emit("rss_peak_mb", rss_mb("VmHWM"), "MB")
        size = sum(p.stat().st_size for p in Path(d).glob("gate.db*"))
        emit("db_size_mb", size / 1e6, "MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_cache", description=__doc__)
    parser.add_argument("--tickets", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=20_000)
    parser.add_argument("--commits", type=int, default=500)
    args = parser.parse_args(argv)
    run(args.tickets, args.lookups, args.commits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
