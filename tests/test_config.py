"""Configuration: the shipped files validate, and mistakes are named by key path."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from agent.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def demo() -> dict[str, Any]:
    with (ROOT / "config" / "demo.toml").open("rb") as f:
        return tomllib.load(f)


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return exc.value.errors


@pytest.mark.parametrize("name", ["demo.toml", "gate.example.toml"])
def test_shipped_configs_validate(name: str) -> None:
    site = load_config(ROOT / "config" / name)
    assert site.lane_io


def test_lane_io_resolved_from_preset_channel() -> None:
    site = parse_config(demo())
    io = site.lane_io["L2"]
    assert (io.unlock_entry, io.unlock_exit, io.alarm) == (8, 9, 10)
    assert io.obstruction is not None and io.obstruction.active_low


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["lanes"][1].update(colour="red"), "lanes[1].colour: 'red' — unknown key"),
        (lambda d: d["boards"][0].update(unit_id=300), "boards[0].unit_id: 300 — expected"),
        (lambda d: d["boards"][0].update(unit_id=0), "boards[0].unit_id: 0 — expected"),
        (lambda d: d["buses"][0].update(port="x"), "buses[0].port: 'x' — expected"),
        (lambda d: d["lanes"][0].update(fail_state="maybe"), "lanes[0].fail_state: 'maybe'"),
        (lambda d: d["lanes"][0].pop("fail_state"), "lanes[0].fail_state: missing"),
        (lambda d: d["buses"][0].update(poll_hz=10), "buses[0].poll_hz: 10 — expected"),
        (lambda d: d["buses"][0].update(type="can"), "buses[0].type: 'can'"),
        (lambda d: d["lanes"][0].update(board="nope"), "lanes[0].board: 'nope' — expected one of"),
        (lambda d: d["lanes"][1].update(channel=1), "lanes[1].io: 'coil 0' — expected a coil"),
        (lambda d: d["lanes"][1].update(channel=9), "lanes[1].channel: 9 — expected 1..4"),
        (lambda d: d["lanes"][1].update(id="L1"), "lanes[1].id: 'L1' — expected a unique"),
        (lambda d: d["boards"][0].update(preset="nope"), "boards[0].preset: 'nope'"),
        (lambda d: d["safety"]["inputs"][0].update(kind="flood"), "safety.inputs[0].kind"),
        (lambda d: d.update(extra={}), "extra: {} — unknown key"),
    ],
)
def test_mistakes_name_their_key_path(mutate: Any, expected: str) -> None:
    data = demo()
    mutate(data)
    errors = errors_of(data)
    assert any(expected in e for e in errors), errors


def test_every_error_is_reported_at_once() -> None:
    data = demo()
    data["lanes"][1]["colour"] = "red"
    data["boards"][0]["unit_id"] = 300
    data["buses"][0]["port"] = "x"
    assert len(errors_of(data)) == 3


def test_check_config_command(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(ROOT / "config" / "demo.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0 and ok.stdout.startswith("OK")
    data = demo()
    data["lanes"][1]["colour"] = "red"
    data["boards"][0]["unit_id"] = 300
    data["buses"][0]["port"] = "fast"
    bad = tmp_path / "bad.toml"
    bad.write_bytes(tomli_w.dumps(data).encode())
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode != 0
    for path in ("lanes[1].colour", "boards[0].unit_id", "buses[0].port"):
        assert path in res.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[site\nid=")
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(broken)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode != 0 and "not valid TOML" in res.stderr
