"""Properties: whatever a scanner or a file hands the cache, it answers and never crashes;
nothing is ever admitted that the cache does not hold; any event data chains and verifies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offline_cache import Cache, read_events, verify_chain
from verify.model import Point, Policy, Reason
from verify.rules import decide

NOW = 1_777_600_000.0
POINT = Point("L1", "park")
CODES = ["PLAIN-1", "'; DROP TABLE tickets; --", "票-二维码", "%", "_", "x" * 4096]
FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
WRITES = settings(FAST, max_examples=40)  # each example waits for an fsync or two


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cache]:
    with Cache(tmp_path_factory.mktemp("prop") / "gate.db") as c:
        c.import_records(
            [{"type": "product", "id": "day", "zones": ["park"]}]
            + [
                {
                    "type": "ticket",
                    "id": f"t{i}",
                    "code": code,
                    "product_id": "day",
                    "valid_from": 0,
                    "valid_to": 2e9,
                }
                for i, code in enumerate(CODES)
            ]
        )
        yield c


codes = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec=None), max_size=50),  # lone surrogates included
    st.binary().map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.sampled_from(CODES).map(lambda c: c + " "),
    st.sampled_from(["a\x00b", "*", "' OR '1'='1", "x" * 4095, "x" * 10_000, ""]),
)


@FAST
@given(code=codes)
def test_any_code_gets_a_decision_and_only_known_codes_get_in(cache: Cache, code: str) -> None:
    situation = cache.situation(code, POINT, NOW)
    decision = decide(situation, POINT, NOW, Policy())
    assert decision.allowed == (code in CODES)
    if not decision.allowed:
        assert decision.reason is Reason.UNKNOWN


def test_the_stored_codes_themselves_get_in(cache: Cache) -> None:
    for code in CODES:
        assert decide(cache.situation(code, POINT, NOW), POINT, NOW, Policy()).allowed


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@WRITES
@given(records=st.lists(json_values | st.dictionaries(st.text(), json_values), max_size=5))
def test_any_import_line_is_imported_or_reported(
    tmp_path_factory: pytest.TempPathFactory, records: list[Any]
) -> None:
    typed = [
        {**r, "type": t} if isinstance(r, dict) else r
        for r, t in zip(records, ["ticket", "product", "block", "zone", "x"], strict=False)
    ]
    skipped = [r for r in typed if isinstance(r, str) and (not r.strip() or r.lstrip()[0] == "#")]
    result = fresh(tmp_path_factory).import_records(typed)
    done = result.tickets + result.products + result.blocks + result.zones
    assert done + result.rejected + len(skipped) == len(typed)


@WRITES
@given(data=st.dictionaries(st.text(), json_values, max_size=5), lane=st.none() | st.text())
def test_any_event_data_chains_and_reads_back(
    tmp_path_factory: pytest.TempPathFactory, data: dict[str, Any], lane: str | None
) -> None:
    cache = fresh(tmp_path_factory)
    event_id = cache.append("audit", lane, payload=data)
    cache.mark_sent(0).result(timeout=5)
    [event] = [e for e in read_events(cache.path) if e.id == event_id]
    assert event.lane == lane and set(event.data) == {"payload"}
    assert verify_chain(cache.path).ok


_fresh: list[Cache] = []


def fresh(factory: pytest.TempPathFactory) -> Cache:
    """One scratch cache shared by the examples of the property tests that write."""
    if not _fresh:
        _fresh.append(Cache(factory.mktemp("scratch") / "gate.db"))
        _fresh[0].start()
    return _fresh[0]


@pytest.fixture(scope="module", autouse=True)
def close_scratch() -> Iterator[None]:
    yield
    while _fresh:
        _fresh.pop().close()
