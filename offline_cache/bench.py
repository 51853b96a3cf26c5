"""Benchmark of the cache with a million tickets: ``python -m offline_cache.bench``.

Prints ``BENCH name value unit`` lines: snapshot import time, decide (lookup + rules)
latency, durable passage commit latency (alone and while a snapshot loads), RSS and file
size. Times are wall-clock on this machine; the disk's fsync jitter dominates commit p99.
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from offline_cache.cache import Cache
from verify.model import Point, Policy

NOW = time.time()


def _tickets(n: int, seed: int, chunk: int = 10_000) -> Iterator[list[dict[str, Any]]]:
    """Synthetic tickets, produced the way a well-behaved sync client should: releasing the
    GIL every ~0.2 ms of work, so the event loop is not kept waiting (see cache.YIELD_EVERY)."""
    rng = random.Random(seed)
    for start in range(0, n, chunk):
        batch = []
        for i in range(start, min(n, start + chunk)):
            if not i % 25:
                time.sleep(0)
            batch.append(
                {
                    "id": f"{rng.getrandbits(64):016x}-{i}",
                    "code": f"{seed}{rng.getrandbits(80):020x}",
                    "channel": "ota",
                    "product_id": "day" if i % 10 else "combo",
                    "valid_from": NOW - 86400,
                    "valid_to": NOW + 86400 * 30,
                    "max_entries_per_day": 1,
                    "holder_hash": f"{rng.getrandbits(256):064x}",
                    "version": 1,
                }
            )
        yield batch


def _codes(n: int, seed: int, sample: int) -> list[str]:
    """Codes of ``sample`` tickets spread over the snapshot (same generator, same codes)."""
    wanted = set(random.Random(1).sample(range(n), sample))
    codes = []
    for chunk_index, chunk in enumerate(_tickets(n, seed)):
        for j, rec in enumerate(chunk):
            if chunk_index * 10_000 + j in wanted:
                codes.append(rec["code"])
    random.Random(2).shuffle(codes)
    return codes


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000


def _bench(line: str, value: float, unit: str) -> None:
    print(f"BENCH {line} {value:.3f} {unit}", flush=True)


def _commits(cache: Cache, codes: list[str], policy: Policy) -> list[float]:
    from verify.rules import decide

    point = Point("L1", "park")
    lat = []
    for code in codes:
        now = time.time()
        decision = decide(cache.situation(code, point, now), point, now, policy)
        reservation = cache.reserve(decision, point, now)
        if reservation is None:
            continue
        started = time.perf_counter()
        cache.commit(reservation.id, now).result()
        lat.append(time.perf_counter() - started)
    return lat


def run(tickets: int, workdir: Path) -> None:
    """Load ``tickets`` tickets, then measure lookups, decisions and commits."""
    from verify.rules import decide

    policy = Policy()
    with Cache(workdir / "gate.db", policy=policy, max_events=10_000_000) as cache:
        cache.apply_delta(
            0,
            1,
            [
                {"id": "day", "zones": {"park": None}},
                {"id": "combo", "zones": {"park": 1, "cable": 1}},
            ],
            kind="products",
        ).result()
        cache.set_zone_capacity("park", 100_000).result()
        started = time.perf_counter()
        result = cache.apply_snapshot(1, _tickets(tickets, 1))
        _bench("snapshot_import_s", time.perf_counter() - started, "s")
        assert result.status == "applied" and result.tickets == tickets, result

        codes = _codes(tickets, 1, 20_000)
        point = Point("L1", "park")
        lookups, decides = [], []
        for code in codes:
            now = time.time()
            t0 = time.perf_counter()
            situation = cache.situation(code, point, now)
            t1 = time.perf_counter()
            decide(situation, point, now, policy)
            t2 = time.perf_counter()
            lookups.append(t1 - t0)
            decides.append(t2 - t0)
        _bench("lookup_p50_ms", _pct(lookups, 0.5), "ms")
        _bench("lookup_p99_ms", _pct(lookups, 0.99), "ms")
        _bench("decide_p50_ms", _pct(decides, 0.5), "ms")
        _bench("decide_p99_ms", _pct(decides, 0.99), "ms")
        misses = [f"missing-{i}" for i in range(5000)]
        t0 = time.perf_counter()
        for code in misses:
            cache.situation(code, point, NOW)
        _bench("lookup_unknown_mean_ms", (time.perf_counter() - t0) / len(misses) * 1000, "ms")

        lat = _commits(cache, codes[:1000], policy)
        _bench("commit_p50_ms", _pct(lat, 0.5), "ms")
        _bench("commit_p99_ms", _pct(lat, 0.99), "ms")
        _bench("commit_mean_ms", statistics.fmean(lat) * 1000, "ms")

        # The same while a second snapshot streams in on another thread: a durable small
        # write (the same writer path as a passage commit) and a lookup every ~5 ms.
        outcome: list[Any] = []
        loader = threading.Thread(
            target=lambda: outcome.append(cache.apply_snapshot(2, _tickets(tickets, 2)))
        )
        started = time.perf_counter()
        loader.start()
        during: list[float] = []
        during_lookups: list[float] = []
        while loader.is_alive():
            t0 = time.perf_counter()
            cache.set_occupancy("bench", len(during)).result()
            t1 = time.perf_counter()
            cache.situation(codes[0], point, time.time())
            during.append(t1 - t0)
            during_lookups.append(time.perf_counter() - t1)
            time.sleep(0.005)
        loader.join()
        _bench("snapshot_reimport_s", time.perf_counter() - started, "s")
        _bench("commit_during_snapshot_p50_ms", _pct(during, 0.5), "ms")
        _bench("commit_during_snapshot_p99_ms", _pct(during, 0.99), "ms")
        _bench("commit_during_snapshot_max_ms", max(during) * 1000, "ms")
        _bench("lookup_during_snapshot_p50_ms", _pct(during_lookups, 0.5), "ms")
        _bench("lookup_during_snapshot_p99_ms", _pct(during_lookups, 0.99), "ms")
        _bench("lookup_during_snapshot_max_ms", max(during_lookups) * 1000, "ms")
        assert outcome and outcome[0].status == "applied", outcome
        stats = cache.stats()
    _bench("rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MB")
    _bench("db_mb", stats["db_bytes"] / 1e6, "MB")


def main() -> None:
    """Command line: ``python -m offline_cache.bench [--tickets N] [--dir DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tickets", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="work dir (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="cache-bench-"))
    try:
        run(args.tickets, workdir)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
