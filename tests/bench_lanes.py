"""``python -m tests.bench_lanes``: credential to unlock through the real daemon, 1 M tickets.

The simulated board and the real daemon run as processes, with a pty QR scanner on L1 and a pty
SAM ID-card reader on L2 (both in this process). 1,000,000 tickets go into the daemon's cache
the way a technician loads them (``gatectl cache import`` of a JSON-lines file), then:

- ``qr_to_unlock``: t0 just before the code's bytes are written to the scanner pty, up to the
  unlock coil set on the simulated board (the board's own history; CLOCK_MONOTONIC is shared by
  every process on Linux). A fresh random ticket per trial; the visitor walks through after.
- ``qr_token_to_unlock``: the same with GT1 tokens the cache has never heard of.
- ``idcard_to_unlock``: from the moment the simulated reader wrote the last byte of its
  read-card reply to the unlock coil (the issue's "after the read completes").
- ``token_verify_us``: ``verify_token`` in this process.

Prints one line per figure, ``BENCH <name> <value> <unit>``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.control import MAX_LINE, request
from agent.testbed import Testbed, wait_for
from drivers.idcard import CMD_FIND
from drivers.sim.sam import SamReaderThread, SimCard, synthetic_id_number
from drivers.sim.scanner import SimScanner
from verify.token import KeyRing, TokenClaims, TrustedKey, kid_for, mint_token, public_key_for

SEED = bytes(range(32))
ISSUER = "demo-park"
# Real-name tickets sit at every HOLDER_STRIDE-th place among the million, one per card seq.
HOLDER_STRIDE = 1000
MAX_SEQ = 999  # synthetic ID numbers have a 3-digit sequence
IDCARD_POLL_S = 0.1  # the reader's card-detection interval (default 0.2): shorter trials
WARMUP = 5
IMPORT_REQUEST_BYTES = MAX_LINE - 4096


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def emit(name: str, value: float, unit: str) -> None:
    print(f"BENCH {name} {value:.3f} {unit}", flush=True)


def code_of(i: int) -> str:
    return f"QR{i:08d}X{i * 7919 % 100000:05d}"


def holder_seq(i: int) -> int | None:
    """The ID-card sequence number whose real-name ticket is ticket ``i``, if any."""
    seq, rest = divmod(i, HOLDER_STRIDE)
    return seq if rest == HOLDER_STRIDE // 2 and 1 <= seq <= MAX_SEQ else None


def ticket_lines(n: int, now: float) -> Iterator[str]:
    """The import as JSON lines: one product, ``n`` one-entry tickets (a few real-name)."""
    head = '{"type": "ticket", "id": "T%08d", "code": "%s", "product_id": "day", '
    tail = f'"valid_from": {now - 3600:.0f}, "valid_to": {now + 30 * 86400:.0f}}}'
    yield '{"type": "product", "id": "day", "zones": {"park": 1}}'
    for i in range(n):
        seq = holder_seq(i)
        holder = "" if seq is None else f'"holder_id": "{synthetic_id_number(seq=seq)}", '
        yield head % (i, code_of(i)) + holder + tail


def import_tickets(tb: Testbed, n: int) -> float:
    """Import through the daemon's cache_import command (what ``gatectl cache import`` sends)
    and wait until its writer has it all; seconds taken.

    Requests are packed to fit the control socket's line limit: gatectl's own 1000 records per
    request overrun it for tickets of this size.
    """
    t0 = time.monotonic()
    batch: list[str] = []
    size = 0

    def send() -> None:
        req = '{"cmd": "cache_import", "records": [' + ", ".join(batch) + "]}"
        reply = request(tb.ctl_socket, json.loads(req), timeout_s=60)
        if not reply.get("ok") or reply.get("errors"):
            raise RuntimeError(f"cache import refused: {reply}")
        batch.clear()

    for line in ticket_lines(n, time.time()):
        if size + len(line) > IMPORT_REQUEST_BYTES:
            send()
            size = 0
        batch.append(line)
        size += len(line) + 2
    send()
    wait_for(
        lambda: (c := tb.status()["cache"])["tickets"] == n and c["queued"] == 0,
        120,
        f"{n} tickets in the cache",
        poll_s=0.5,
    )
    return time.monotonic() - t0


def unlocked_at(tb: Testbed, channel: int, since: float) -> float:
    """Monotonic time the board saw the lane's entry unlock coil set, after ``since``."""
    return next(
        float(h["t"])
        for h in tb.sim.history(since)
        if h["what"] == "unlock_entry" and h["value"] and h["channel"] == channel
    )


def pass_through(tb: Testbed, channel: int) -> None:
    """The visitor walks through the open lane; returns once every lane is locked again."""
    if not tb.sim.walk(channel, "entry", wait_timeout_s=3):
        last = tb.status()["last_decisions"].get(f"L{channel}")
        raise RuntimeError(f"lane {channel} did not unlock (last decision {last})")
    tb.wait_modes("locked", timeout_s=5)


def scan_trials(tb: Testbed, scanner: SimScanner, codes: list[str]) -> list[float]:
    """Milliseconds from each code's bytes written to the scanner pty to L1's unlock coil."""
    lat = []
    for code in codes:
        tb.sim.clear_history()
        line = code.encode() + b"\r"
        t0 = time.monotonic()
        scanner.send_raw(line)
        pass_through(tb, 1)
        lat.append((unlocked_at(tb, 1, t0) - t0) * 1000)
    return lat


def card_trials(tb: Testbed, sam: SamReaderThread, seqs: list[int]) -> list[float]:
    """Milliseconds from the reader's last read-reply byte written to L2's unlock coil."""

    def finds() -> int:
        return sam.sim.requests[CMD_FIND]

    lat = []
    for seq in seqs:
        # The daemon's reader must see the reader empty once, or it keeps the last card latched.
        sam.remove_card()
        empty_from = finds()
        wait_for(lambda: finds() > empty_from, 5, "a poll of the empty reader")  # noqa: B023
        tb.sim.clear_history()
        t_put = time.monotonic()
        sam.put_card(SimCard(synthetic_id_number(seq=seq)))
        pass_through(tb, 2)
        read_at = sam.read_sent_at
        assert read_at is not None and read_at > t_put, "no read reply timed"
        lat.append((unlocked_at(tb, 2, t_put) - read_at) * 1000)
    sam.remove_card()
    return lat


def token_texts(n: int, prefix: str) -> list[str]:
    now = int(time.time())
    return [
        mint_token(
            TokenClaims(
                issuer=ISSUER,
                ticket_id=f"{prefix}{i:06d}",
                product="web-day",
                zones={"park": 1},
                not_before=now - 60,
                expires=now + 86400,
                issued_at=now - 60,
                channel="web",
            ),
            SEED,
        )
        for i in range(n)
    ]


def token_verify(iterations: int) -> list[float]:
    """Microseconds per verify_token of a valid token, in this process."""
    from verify.token import verify_token

    public = public_key_for(SEED)
    keys = KeyRing([TrustedKey(kid_for(public), public, ISSUER)])
    text = token_texts(1, "TV")[0]
    now = time.time()
    assert verify_token(text, keys, now).ok
    lat = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        verify_token(text, keys, now)
        lat.append((time.perf_counter() - t0) * 1e6)
    return lat


def report(name: str, lat: list[float], p50: bool = True) -> None:
    if p50:
        emit(f"{name}_p50_ms", statistics.median(lat), "ms")
    emit(f"{name}_p99_ms", pct(lat, 99), "ms")
    emit(f"{name}_max_ms", max(lat), "ms")


def timed(what: str, fn: Callable[[], Any]) -> Any:
    t0 = time.monotonic()
    result = fn()
    print(f"# {what}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    return result


def run(n: int, qr_trials: int, token_trials: int, card_trials_n: int) -> None:
    rng = random.Random(4)
    # Every trial a ticket that has never been used, so it is admitted.
    picks = rng.sample(range(n), 2 * (qr_trials + WARMUP + 1))
    codes = [code_of(i) for i in picks if holder_seq(i) is None][: qr_trials + WARMUP + 1]
    seqs = rng.sample(range(1, min(MAX_SEQ, (n - 1) // HOLDER_STRIDE) + 1), card_trials_n + WARMUP)
    tokens = token_texts(token_trials + WARMUP, "TK")
    with tempfile.TemporaryDirectory(prefix="gate-bench-lanes-") as d:
        work = Path(d)
        site_key = work / "site.key"
        site_key.write_bytes(os.urandom(32))
        site_key.chmod(0o600)
        extra = (
            f'[admission]\nholder_key_file = "{site_key}"\n\n'
            f'[[trusted_keys]]\nissuer = "{ISSUER}"\n'
            f'public_key = "{public_key_for(SEED).hex()}"\n'
        )
        scanner = SimScanner(work / "scanner")
        sam = SamReaderThread(work / "sam")
        try:
            with Testbed(
                work / "gate",
                lane={"zone": "park", "close_time_s": 0.1, "unlock_timeout_s": 4},
                lane_readers={
                    1: [{"type": "qr-serial", "port": scanner.path, "debounce_s": 0.2}],
                    2: [{"type": "idcard", "port": sam.path, "poll_s": IDCARD_POLL_S}],
                },
                log_format="json",
                extra_toml=extra,
            ) as tb:
                tb.start_sim()
                tb.start_daemon()
                emit("cache_import_s", timed("import", lambda: import_tickets(tb, n)), "s")
                # The first scan after the import (cold page cache and code paths), then warm.
                first = scan_trials(tb, scanner, codes[:1])
                emit("qr_to_unlock_first_ms", first[0], "ms")
                scan_trials(tb, scanner, codes[1 : 1 + WARMUP])
                lat = timed("qr", lambda: scan_trials(tb, scanner, codes[1 + WARMUP :]))
                report("qr_to_unlock", lat)
                lat = timed("token", lambda: scan_trials(tb, scanner, tokens))[WARMUP:]
                report("qr_token_to_unlock", lat)
                lat = timed("idcard", lambda: card_trials(tb, sam, seqs))[WARMUP:]
                report("idcard_to_unlock", lat)
                passages = len(tb.events("passage"))
                expected = len(codes) + len(tokens) + len(seqs)
                assert passages == expected, f"{passages} passages, expected {expected}"
        finally:
            sam.close()
            scanner.close()
    lat = token_verify(5000)
    emit("token_verify_us", statistics.median(lat), "us")
    emit("token_verify_p99_us", pct(lat, 99), "us")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_lanes", description=__doc__)
    parser.add_argument("--tickets", type=int, default=1_000_000)
    parser.add_argument("--qr-trials", type=int, default=300)
    parser.add_argument("--token-trials", type=int, default=100)
    parser.add_argument("--card-trials", type=int, default=200)
    args = parser.parse_args(argv)
    run(args.tickets, args.qr_trials, args.token_trials, args.card_trials)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
