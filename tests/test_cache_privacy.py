"""Holder identifiers only as keyed hashes: the site key file is guarded, and an ID number
given at import is hashed at once and found nowhere afterwards: not in the file, not in logs."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

import pytest

from offline_cache import Cache, SiteKeyError, holder_hash, load_site_key, read_events
from verify.model import Point, Policy, Reason
from verify.rules import decide

ID_NUMBER = "11010519491231002X"
KEY = bytes(range(32))
NOW = 1_777_600_000.0


def key_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "site.key"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_a_private_key_file_loads(tmp_path: Path) -> None:
    assert load_site_key(key_file(tmp_path, KEY)) == KEY


def test_a_hex_key_file_is_decoded(tmp_path: Path) -> None:
    assert load_site_key(key_file(tmp_path, KEY.hex().encode() + b"\n")) == KEY


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o666])
def test_a_key_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    with pytest.raises(SiteKeyError, match="chmod 600"):
        load_site_key(key_file(tmp_path, KEY, mode))


def test_a_short_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SiteKeyError, match="at least 32"):
        load_site_key(key_file(tmp_path, b"x" * 31))


def test_a_missing_key_or_a_symlink_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SiteKeyError, match="cannot open"):
        load_site_key(tmp_path / "nope.key")
    target = key_file(tmp_path, KEY)
    link = tmp_path / "link.key"
    link.symlink_to(target)
    with pytest.raises(SiteKeyError):
        load_site_key(link)


def test_the_hash_is_hmac_sha256_of_the_normalised_number() -> None:
    expected = hmac.new(KEY, ID_NUMBER.encode(), hashlib.sha256).hexdigest()
    assert holder_hash(KEY, ID_NUMBER) == expected
    assert holder_hash(KEY, " 11010519491231002x\n") == expected
    assert holder_hash(KEY, "１１０１０５１９４９１２３１００２ｘ") == expected  # full-width
    assert holder_hash(bytes(32), ID_NUMBER) != expected
    with pytest.raises(ValueError):
        holder_hash(KEY, "  ")


def test_an_id_number_is_stored_nowhere_and_logged_nowhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "gate.db"
    ticket = {
        "type": "ticket",
        "id": "t1",
        "code": "C-1",
        "product_id": "day",
        "valid_from": 0,
        "valid_to": 2e9,
        "holder_id": ID_NUMBER,
    }
    bad = {**ticket, "id": "t2", "code": "C-2", "valid_to": "never"}
    both = {**ticket, "id": "t3", "code": "C-3", "holder_hash": "ab" * 32}
    block = {"type": "block", "kind": "holder", "holder_id": ID_NUMBER.lower(), "reason": "r"}
    with Cache(path, site_key=KEY) as cache:
        result = cache.import_records(
            [{"type": "product", "id": "day", "zones": ["park"]}, ticket, bad, both, block]
        )
        assert (result.tickets, result.blocks, result.rejected) == (1, 1, 2)
        point = Point("L1", "park")
        s = cache.situation("C-1", point, NOW)
        assert s.ticket is not None and s.ticket.holder_hash == holder_hash(KEY, ID_NUMBER)
        assert decide(s, point, NOW, Policy()).reason is Reason.BLOCKED
        cache.append("denied", "L1", reason="blocked", ticket="t1")
        problems = " ".join(p.reason for p in result.problems)
    for name in os.listdir(tmp_path):
        raw = (tmp_path / name).read_bytes()
        for form in (ID_NUMBER, ID_NUMBER.lower(), ID_NUMBER[:14]):
            assert form.encode() not in raw, f"{form} found in {name}"
            assert form.encode("utf-16-le") not in raw
    for form in (ID_NUMBER, ID_NUMBER.lower(), ID_NUMBER[:14]):
        assert form not in caplog.text
        assert form not in problems
        assert all(form not in str(e.data) for e in read_events(path))


def test_an_id_number_without_a_site_key_is_refused_not_stored(tmp_path: Path) -> None:
    with Cache(tmp_path / "gate.db") as cache:
        rec = {
            "type": "ticket",
            "id": "t1",
            "code": "C-1",
            "product_id": "day",
            "valid_from": 0,
            "valid_to": 2e9,
            "holder_id": ID_NUMBER,
        }
        result = cache.import_records([rec])
    assert result.rejected == 1 and "no site key" in result.problems[0].reason
    assert ID_NUMBER.encode() not in (tmp_path / "gate.db").read_bytes()


def test_a_holder_hash_from_the_cloud_must_look_like_one(tmp_path: Path) -> None:
    with Cache(tmp_path / "gate.db") as cache:
        rec = {"id": "t", "code": "c", "product_id": "p", "valid_from": 0, "valid_to": 1}
        result = cache.apply_snapshot(1, [[{**rec, "holder_hash": ID_NUMBER}]])
    assert result.status == "rejected" and "holder_hash" in result.problems[0].reason
