"""``gate-agent``: run the daemon, or check a configuration file."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import signal
import sys
from pathlib import Path

from agent import __version__
from agent.config import ConfigError, load_config


def _check(path: str) -> int:
    try:
        site = load_config(path)
    except ConfigError as exc:
        print(f"{exc.path}: configuration has {len(exc.errors)} error(s):", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 2
    cfg = site.config
    readers = sum(len(lane.readers) for lane in cfg.lanes)
    sync = f"cloud sync with {cfg.cloud.host}:{cfg.cloud.port}" if cfg.cloud else "no cloud sync"
    print(
        f"OK: {path}: site {cfg.site.id}, gate {cfg.site.gate_id}, {len(cfg.buses)} bus(es), "
        f"{len(cfg.boards)} board(s), {len(cfg.lanes)} lane(s) with {readers} reader(s), "
        f"{len(cfg.safety.inputs)} safety input(s), {sync}"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    # Imported here so that check-config stays fast and free of driver imports.
    from agent import logs
    from agent.daemon import Daemon
    from offline_cache.errors import CacheError

    try:
        site = load_config(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{exc.path}: {line}", file=sys.stderr)
        return 2
    d = site.config.daemon
    # `kill -USR1 <pid>` dumps every thread's stack: the first thing to ask for when a
    # controller in the field misbehaves.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # Threads (cache writer, uplink, snapshot apply) hand the GIL back to the event loop after
    # 1 ms instead of 5: the lanes' decisions wait less behind bulk work.
    sys.setswitchinterval(0.001)
    logs.setup(args.log_level or d.log_level, args.log_format or d.log_format)
    try:
        daemon = Daemon(
            site,
            state_dir=args.state_dir,
            control_socket=args.control_socket,
            config_path=Path(args.config),
        )
    except (CacheError, OSError) as exc:
        # A missing/unsafe site key or an unusable database: say so plainly, exit non-zero;
        # the board's watchdog keeps the lanes in their fail state meanwhile.
        print(f"gate-agent: cannot start: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(daemon.run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gate-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gate-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gate daemon")
    run.add_argument("--config", required=True, help="TOML configuration file")
    run.add_argument("--state-dir", type=Path, help="override daemon.state_dir")
    run.add_argument("--control-socket", type=Path, help="override daemon.control_socket")
    run.add_argument("--log-format", choices=["json", "text"], help="override daemon.log_format")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return _check(args.path)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
