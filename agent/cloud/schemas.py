"""JSON Schemas of the MQTT contract, generated from its models (docs/schemas, docs/mqtt.md).

``python -m agent.cloud.schemas --write docs/schemas`` rewrites the committed files;
``--check docs/schemas`` exits non-zero when they differ from the models.
tests/test_mqtt_contract.py holds the committed files to what this module generates.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from agent.cloud.contract import (
    DOWN_BODIES,
    PREFIX,
    UP_MESSAGES,
    Envelope,
    SignedPayload,
)

DIALECT = "https://json-schema.org/draft/2020-12/schema"


@dataclass(frozen=True)
class _Message:
    title: str
    description: str
    model: TypeAdapter[Any] | type[BaseModel]


_MESSAGES: dict[str, _Message] = {
    "envelope": _Message(
        "Downlink envelope",
        "What travels on every downlink topic: a signed payload and who signed it.",
        Envelope,
    ),
    "signed-payload": _Message(
        "Signed payload",
        "The JSON text inside envelope.payload: target topic, nonce, validity and the body.",
        SignedPayload,
    ),
    "cmd": _Message(
        "Command body",
        "body on gate/v1/{site}/{gate}/cmd and gate/v1/{site}/all/cmd; cmd selects the shape.",
        DOWN_BODIES["cmd"],
    ),
    "tickets": _Message(
        "Tickets body",
        "body on gate/v1/{site}/tickets: a tickets or products delta, or a snapshot chunk.",
        DOWN_BODIES["tickets"],
    ),
    "blocklist": _Message(
        "Blocklist body",
        "body on gate/v1/{site}/blocklist: a delta, or the whole blocklist.",
        DOWN_BODIES["blocklist"],
    ),
    "keys": _Message(
        "Issuer keys body",
        "body on gate/v1/{site}/keys (retained): every issuer key for signed tickets.",
        DOWN_BODIES["keys"],
    ),
    "faces": _Message(
        "Faces body",
        "body on gate/v1/{site}/faces: face enrolment delta (reserved, not applied yet).",
        DOWN_BODIES["faces"],
    ),
    "events": _Message(
        "Events message",
        "gate/v1/{site}/{gate}/events: consecutive outbox events, oldest first.",
        UP_MESSAGES["events"],
    ),
    "status": _Message(
        "Status message",
        "gate/v1/{site}/{gate}/status (retained): online state, versions, lanes, outbox.",
        UP_MESSAGES["status"],
    ),
    "telemetry": _Message(
        "Telemetry message",
        "gate/v1/{site}/{gate}/telemetry: counts per lane over the interval, zone occupancy.",
        UP_MESSAGES["telemetry"],
    ),
    "cmd-ack": _Message(
        "Command acknowledgement",
        "gate/v1/{site}/{gate}/cmd/ack: the outcome of one command, by its nonce.",
        UP_MESSAGES["cmd/ack"],
    ),
    "resync": _Message(
        "Resync request",
        "gate/v1/{site}/{gate}/resync: the gate asks for data from the version it holds.",
        UP_MESSAGES["resync"],
    ),
}

NAMES = tuple(_MESSAGES)
"""Schema names, one per message; the file of each is ``<name>.schema.json``."""


def schema_id(name: str) -> str:
    """The ``$id`` of a message's schema."""
    return f"{PREFIX}/{name}.schema.json"


def schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one message."""
    msg = _MESSAGES[name]
    model = msg.model
    generated = model.json_schema() if isinstance(model, TypeAdapter) else model.model_json_schema()
    result: dict[str, Any] = {
        "$schema": DIALECT,
        "$id": schema_id(name),
        **generated,
        "title": msg.title,
        "description": msg.description,
    }
    if name == "envelope":
        # Annotations only: a validator does not parse the string, a reader learns what it holds.
        payload = result["properties"]["payload"]
        payload["contentMediaType"] = "application/json"
        payload["contentSchema"] = {"$ref": "signed-payload.schema.json"}
    return result


def schemas() -> dict[str, dict[str, Any]]:
    """Every message's JSON Schema, by name."""
    return {name: schema(name) for name in NAMES}


def render(obj: dict[str, Any]) -> str:
    """The committed text of a schema: sorted keys, indent 2, trailing newline."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def files() -> dict[str, str]:
    """File name -> text of every schema file."""
    return {f"{name}.schema.json": render(s) for name, s in schemas().items()}


def write(directory: Path) -> list[Path]:
    """Write every schema file into ``directory``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in files().items():
        path = directory / filename
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale(directory: Path) -> list[str]:
    """Schema files in ``directory`` that are missing, differ, or are not generated here."""
    expected = files()
    found = {p.name for p in directory.glob("*.schema.json")} if directory.is_dir() else set()
    bad = [
        name
        for name, text in expected.items()
        if name not in found or (directory / name).read_text(encoding="utf-8") != text
    ]
    return sorted(bad + sorted(found - set(expected)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.cloud.schemas", description="JSON Schemas of the MQTT contract"
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, metavar="DIR", help="write the schema files")
    group.add_argument("--check", type=Path, metavar="DIR", help="fail if files are stale")
    args = parser.parse_args(argv)
    if args.write is not None:
        for path in write(args.write):
            print(path)
        return 0
    bad = stale(args.check)
    for name in bad:
        print(f"stale: {name}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
