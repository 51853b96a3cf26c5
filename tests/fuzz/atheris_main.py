"""Coverage-guided fuzzing (atheris, libFuzzer) of the targets in tests/fuzz_targets.py.

    python -m tests.fuzz.atheris_main TARGET [--workdir=DIR] [libFuzzer flags ...]
    python -m tests.fuzz.atheris_main --list

e.g. ``python -m tests.fuzz.atheris_main token_text -max_total_time=60``. The seed corpus is
built in code (``fuzz_targets.seeds``) into DIR/corpus, the cache the inputs meet lives in
DIR/cache, and a finding is written to DIR/crash-<sha1>. DIR defaults to
$TMPDIR/gate-agent-fuzz/TARGET and is emptied first; give --workdir to keep a corpus that
grows from run to run. A finding prints its input in hex and exits non-zero.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris  # type: ignore[import-untyped]  # atheris ships no type stubs

# Only what reads outside input is instrumented: the drivers, verify, admission. The cache's
# writer thread runs alongside every input; its coverage would only be noise to libFuzzer.
with atheris.instrument_imports(
    include=["agent", "drivers", "verify"], exclude=["tests.fuzz_targets"]
):
    from agent import admission  # noqa: F401
    from drivers import idcard, qr_serial  # noqa: F401
    from verify import idnumber, token  # noqa: F401

from tests import fuzz_targets

DEFAULT_FLAGS = (
    # A slow input is a finding too: one lane's reader must never stall for seconds.
    "-timeout=10",
    # Structured seeds are long (a SAM read reply is 1295 bytes): mutate them whole at once.
    "-len_control=0",
    "-max_len=8192",
    "-print_final_stats=1",
)


def _usage(code: int) -> None:
    print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
    print("targets: " + " ".join(fuzz_targets.TARGETS), file=sys.stderr)
    sys.exit(code)


def _escaped(word: bytes) -> str:
    return "".join(f"\\x{b:02x}" for b in word)


def _reporting(name: str, target: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """The target, printing the input of any finding in hex before libFuzzer stops."""

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except BaseException:
            print(
                f"\nfuzz {name}: finding on this input ({len(data)} bytes, hex):\n{data.hex()}\n",
                file=sys.stderr,
                flush=True,
            )
            raise

    return one_input


def main(argv: list[str]) -> None:
    """Fuzz one target with libFuzzer until its flags say stop (or forever)."""
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        _usage(2)
    if argv[1] == "--list":
        print("\n".join(fuzz_targets.TARGETS))
        return
    name = argv[1]
    if name not in fuzz_targets.TARGETS:
        print(f"unknown target {name!r}", file=sys.stderr)
        _usage(2)
    workdir: Path | None = None
    flags: list[str] = []
    for arg in argv[2:]:
        if arg.startswith("--workdir="):
            workdir = Path(arg.split("=", 1)[1])
        else:
            flags.append(arg)
    if workdir is None:
        workdir = Path(tempfile.gettempdir()) / "gate-agent-fuzz" / name
        shutil.rmtree(workdir, ignore_errors=True)
    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(fuzz_targets.seeds()[name]):
        (corpus / f"seed-{i:03d}").write_bytes(seed)
    words = workdir / "dictionary"
    words.write_text("".join(f'"{_escaped(word)}"\n' for word in fuzz_targets.dictionary()[name]))
    # Built now, not on the first input: its set-up must not count against -timeout.
    shutil.rmtree(workdir / "cache", ignore_errors=True)
    fuzz_targets.default_context(workdir / "cache")
    given = {flag.split("=", 1)[0] for flag in flags}
    defaults = [flag for flag in DEFAULT_FLAGS if flag.split("=", 1)[0] not in given]
    if "-artifact_prefix" not in given:
        defaults.append(f"-artifact_prefix={workdir}/")
    if "-dict" not in given:
        defaults.append(f"-dict={words}")
    inputs = [flag for flag in flags if not flag.startswith("-")]
    if not inputs:
        # Given input files (a crash to reproduce) run alone; else fuzz from the seeds.
        flags.append(str(corpus))
    print(f"fuzz {name}: work folder {workdir}", file=sys.stderr, flush=True)
    atheris.Setup([argv[0], *defaults, *flags], _reporting(name, fuzz_targets.TARGETS[name]))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
