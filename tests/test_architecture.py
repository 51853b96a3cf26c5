"""Guards of the layout (STYLE.md): one owner per vendor library, a pure safety core."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "drivers", "verify", "offline_cache")

OWNERS = {
    "serial": {"drivers/serial_port.py"},
    "paho": {"agent/cloud/mqtt.py"},
    "cv2": {"drivers/camera.py"},
    "pyzbar": {"drivers/camera.py"},
    # The simulator is a program of its own: its Modbus server is the only other pymodbus user.
    "pymodbus": {"drivers/modbus.py", "drivers/sim/server.py"},
    "onnxruntime": set(),
    "insightface": set(),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _modules() -> dict[str, set[str]]:
    return {
        str(p.relative_to(ROOT)): _imports(p)
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).rglob("*.py"))
    }


def test_each_vendor_library_has_one_owner() -> None:
    modules = _modules()
    for lib, owners in OWNERS.items():
        users = {m for m, imports in modules.items() if lib in imports}
        assert users == owners, f"{lib} imported by {sorted(users - owners)}"


def test_safety_core_imports_only_the_standard_library_and_driver_interfaces() -> None:
    allowed = set(sys.stdlib_module_names) | {"agent", "drivers"}
    for path in sorted((ROOT / "agent" / "gate").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                top = node.module.split(".")[0]
                assert top in allowed, f"{path.name} imports {node.module}"
                if top == "drivers":
                    assert node.module == "drivers.base", f"{path.name} imports {node.module}"
                if top == "agent":
                    assert node.module.startswith("agent.gate"), f"{path.name}: {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in allowed, f"{path.name}: {alias.name}"
