"""The systemd files ship what the safety and hardening story in docs/install.md relies on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "gate-agent.service"
BINARY = "/opt/gate-agent/bin/gate-agent"
CONFIG = "/etc/gate-agent/gate.toml"


def _unit() -> configparser.ConfigParser:
    """Parse the unit as INI: case-sensitive keys, no interpolation of % specifiers."""
    parser = configparser.ConfigParser(
        strict=False, interpolation=None, empty_lines_in_values=False
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT, encoding="utf-8")
    return parser


def _all_values(section: str, key: str) -> list[str]:
    """Every value of a directive that systemd allows to repeat (configparser keeps the last)."""
    values: list[str] = []
    current = ""
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        name, _, value = line.partition("=")
        if current == section and name.strip() == key:
            values.append(value.strip())
    return values


@pytest.fixture(scope="module")
def service() -> configparser.SectionProxy:
    """The [Service] section."""
    return _unit()["Service"]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("Restart", "always"),
        ("RestartSec", "1"),
        ("TimeoutStopSec", "10"),
        ("KillSignal", "SIGTERM"),
        ("User", "gate-agent"),
        ("Group", "gate-agent"),
        ("RuntimeDirectory", "gate-agent"),
        ("StateDirectory", "gate-agent"),
        ("ConfigurationDirectory", "gate-agent"),
        ("UMask", "0007"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/var/lib/gate-agent"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictRealtime", "yes"),
        ("SystemCallArchitectures", "native"),
        ("CapabilityBoundingSet", ""),
        ("DevicePolicy", "closed"),
    ],
)
def test_service_directive(service: configparser.SectionProxy, key: str, expected: str) -> None:
    assert service.get(key) == expected


def test_watchdog_is_set(service: configparser.SectionProxy) -> None:
    assert service.getint("WatchdogSec") == 5


def test_config_is_checked_before_the_daemon_starts(service: configparser.SectionProxy) -> None:
    assert service["ExecStartPre"] == f"{BINARY} check-config {CONFIG}"
    assert service["ExecStart"] == f"{BINARY} run --config {CONFIG}"


def test_serial_ports_and_control_socket_groups(service: configparser.SectionProxy) -> None:
    groups = service["SupplementaryGroups"].split()
    assert "dialout" in groups
    assert "gate-ops" in groups


def test_only_serial_devices_are_allowed() -> None:
    assert sorted(_all_values("Service", "DeviceAllow")) == [
        "char-ttyACM rw",
        "char-ttyS rw",
        "char-ttyUSB rw",
    ]


def test_address_families() -> None:
    assert _all_values("Service", "RestrictAddressFamilies") == ["AF_UNIX AF_INET AF_INET6"]


def test_enabled_at_boot() -> None:
    assert _unit()["Install"]["WantedBy"] == "multi-user.target"


def test_restarts_are_never_rate_limited() -> None:
    assert _unit()["Unit"]["StartLimitIntervalSec"] == "0"


def test_sysusers_creates_the_user_and_the_technicians_group() -> None:
    entries = [
        line.split()[:3]
        for line in (SYSTEMD / "gate-agent.sysusers").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ["u", "gate-agent", "-"] in entries
    assert ["m", "gate-agent", "dialout"] in entries
    assert ["g", "gate-ops", "-"] in entries


def test_tmpfiles_keeps_the_config_directory_closed() -> None:
    entries = [
        line.split()
        for line in (SYSTEMD / "gate-agent.tmpfiles").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ["d", "/etc/gate-agent", "0750", "root", "gate-agent", "-"] in entries


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not here")
def test_systemd_accepts_every_directive(tmp_path: Path) -> None:
    # verify also insists that ExecStart exists: point it at a stand-in for the installed binary.
    stand_in = tmp_path / "gate-agent"
    stand_in.write_text("#!/bin/sh\n", encoding="utf-8")
    stand_in.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text(encoding="utf-8").replace(BINARY, str(stand_in)), "utf-8")

    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--generators=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    complaints = [line for line in result.stderr.splitlines() if str(unit) in line]
    assert result.returncode == 0, result.stderr
    assert complaints == []
