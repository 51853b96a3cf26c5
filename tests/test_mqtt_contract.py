"""docs/mqtt.md and docs/schemas stay true to the code a cloud team cannot see.

Convention in docs/mqtt.md: a fenced block preceded by ``<!-- schema: NAME -->`` is a message
that must validate against docs/schemas/NAME.schema.json; ``example: NAME`` names a block
these tests use (``<!-- schema: envelope, example: signed-envelope -->`` does both).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from agent.cloud.contract import DOWN_BODIES, SITE_DOWN_KINDS, UP_KINDS, UP_MESSAGES, OpenCmd
from agent.cloud.reference import GateLog
from agent.cloud.schemas import NAMES, files, schemas, stale
from agent.cloud.signing import Anchor, DownlinkVerifier, Rejected
from offline_cache.outbox import GENESIS, canonical_json, chain_hash, event_canonical
from verify.token import kid_for, public_key_for

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "mqtt.md"
SCHEMA_DIR = ROOT / "docs" / "schemas"
TEST_SEED = bytes(range(32))

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARK = re.compile(r"^<!--\s*(.*?)\s*-->\s*$")


def _blocks() -> list[tuple[int, dict[str, str], str, str]]:
    """(line, markers, language, text) of every fenced block of the doc."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    found = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = i + 1
        while not lines[end].startswith("```"):
            end += 1
        marks: dict[str, str] = {}
        mark = _MARK.match(lines[i - 1]) if i else None
        if mark is not None:
            for part in mark.group(1).split(","):
                key, _, value = part.partition(":")
                marks[key.strip()] = value.strip()
        found.append((i + 1, marks, opening.group(1), "\n".join(lines[i + 1 : end])))
        i = end + 1
    return found


BLOCKS = _blocks()
MESSAGES = [(line, m["schema"], text) for line, m, _, text in BLOCKS if "schema" in m]


def _example(name: str) -> str:
    texts = [text for _, m, _, text in BLOCKS if m.get("example") == name]
    assert len(texts) == 1, f"docs/mqtt.md needs exactly one example {name!r}"
    return texts[0]


def _run(code: str, name: str) -> tuple[dict[str, Any], str]:
    """Execute a Python example of the doc; its namespace and what it printed."""
    namespace: dict[str, Any] = {"__name__": f"mqtt_md_{name}"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"docs/mqtt.md ({name})", "exec"), namespace)
    return namespace, out.getvalue()


# --- (a) the schema files are what the models generate -------------------------------------


def test_schema_files_are_generated_from_the_models() -> None:
    assert stale(SCHEMA_DIR) == [], "run: python -m agent.cloud.schemas --write docs/schemas"
    for filename, text in files().items():
        assert (SCHEMA_DIR / filename).read_text(encoding="utf-8") == text


@pytest.mark.parametrize("name", NAMES)
def test_each_schema_is_draft_2020_12_with_id_and_title(name: str) -> None:
    schema = schemas()[name]
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"gate/v1/{name}.schema.json"
    assert schema["title"]


# --- (b) the doc's examples are valid messages ------------------------------------------------


def test_every_schema_has_an_example_in_the_doc() -> None:
    assert {name for _, name, _ in MESSAGES} == set(NAMES)


@pytest.mark.parametrize(("line", "name", "text"), MESSAGES, ids=[f"L{m[0]}" for m in MESSAGES])
def test_doc_example_validates_against_its_schema(line: int, name: str, text: str) -> None:
    message = json.loads(text)
    errors = [e.message for e in Draft202012Validator(schemas()[name]).iter_errors(message)]
    assert errors == [], f"docs/mqtt.md line {line} ({name}): {errors}"
    # The gate's own models agree with the schema on the example.
    if name in DOWN_BODIES:
        DOWN_BODIES[name].validate_python(message)
    elif name.replace("-", "/") in UP_MESSAGES:
        UP_MESSAGES[name.replace("-", "/")].model_validate(message)


def test_a_schema_refuses_what_the_gate_refuses() -> None:
    validator = Draft202012Validator(schemas()["cmd"])
    assert validator.is_valid({"cmd": "open", "lane": "L1"})
    assert not validator.is_valid({"cmd": "open", "lane": "L1", "force": True})
    assert not validator.is_valid({"cmd": "format_disk"})


def test_the_doc_names_every_topic_and_rejection_code() -> None:
    doc = DOC.read_text(encoding="utf-8")
    for kind in SITE_DOWN_KINDS:
        assert f"`gate/v1/{{site}}/{kind}`" in doc
    for kind in (*UP_KINDS, "cmd"):
        assert f"`gate/v1/{{site}}/{{gate}}/{kind}`" in doc
    assert "`gate/v1/{site}/all/cmd`" in doc
    code = "".join(
        (ROOT / "agent" / "cloud" / f).read_text(encoding="utf-8")
        for f in ("signing.py", "service.py")
    )
    reasons = set(re.findall(r'Rejected\(\s*"(\w+)"', code))
    reasons |= set(re.findall(r'self\.rejected\["(\w+)"\]', code))
    assert len(reasons) > 15
    missing = sorted(r for r in reasons if f"`{r}`" not in doc)
    assert missing == [], f"docs/mqtt.md does not explain {missing}"


# --- (c) the worked signing example verifies at a gate ----------------------------------------


def test_the_signing_example_prints_the_documented_envelope() -> None:
    _, printed = _run(_example("sign-python"), "sign-python")
    assert printed.strip() == _example("signed-envelope").strip()


def test_the_signed_envelope_verifies_at_a_gate() -> None:
    raw = _example("signed-envelope").strip().encode()
    public = public_key_for(TEST_SEED)
    doc = DOC.read_text(encoding="utf-8")
    assert public.hex() in doc and kid_for(public).hex() in doc
    topics = {"cmd": "gate/v1/park/g1/cmd", "all_cmd": "gate/v1/park/all/cmd"}
    verifier = DownlinkVerifier(
        [Anchor(public)], topics, max_bytes=1 << 20, max_lifetime_s=7 * 86400
    )
    iat = 1767225600.0
    verified = verifier.verify("gate/v1/park/g1/cmd", raw, iat + 60)
    assert verified.body == OpenCmd(cmd="open", lane="L1", direction="entry")
    assert (verified.nonce, verified.iat, verified.exp) == (
        "q9T2vXk7LmN4pR8sW1yZ3bC5",
        iat,
        iat + 300,
    )
    with pytest.raises(Rejected, match="expired"):
        verifier.verify("gate/v1/park/g1/cmd", raw, iat + 301)
    with pytest.raises(Rejected, match="wrong_target"):
        verifier.verify("gate/v1/park/all/cmd", raw, iat + 60)
    payload = json.loads(raw)["payload"]
    assert payload == _example_by_schema("signed-payload")


def _example_by_schema(name: str) -> str:
    texts = [text for _, m, _, text in BLOCKS if m.get("schema") == name]
    assert len(texts) == 1
    return texts[0].strip()


# --- (d) the worked hash-chain example is what the gate computes --------------------------------


def _chain_events() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = json.loads(_example("chain"))["events"]
    return events


def test_the_chain_example_matches_the_outbox_hash() -> None:
    prev = GENESIS
    for e in _chain_events():
        assert e["prev_hash"] == prev
        canonical = event_canonical(
            e["id"], e["seq"], e["ts"], e["kind"], e["lane"], canonical_json(e["data"])
        )
        assert chain_hash(prev, canonical) == e["hash"], f"seq {e['seq']}"
        prev = e["hash"]
    second = _chain_events()[1]
    canonical = event_canonical(
        second["id"],
        second["seq"],
        second["ts"],
        second["kind"],
        second["lane"],
        canonical_json(second["data"]),
    )
    assert _example("chain-canonical-2").strip() == canonical


def test_the_doc_chain_checker_and_the_reference_cloud_accept_the_example() -> None:
    events = _chain_events()
    namespace, _ = _run(_example("chain-python"), "chain-python")
    assert namespace["GENESIS"] == GENESIS
    assert namespace["check_chain"](GENESIS, events) == events[-1]["hash"]
    tampered = [events[0], {**events[1], "data": {**events[1]["data"], "reason": "ok"}}]
    with pytest.raises(ValueError, match="seq 2"):
        namespace["check_chain"](GENESIS, tampered)
    ok, why = GateLog(events={e["seq"]: e for e in events}).check()
    assert ok, why
