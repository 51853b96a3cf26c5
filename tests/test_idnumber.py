"""GB 11643 ID numbers and card validity dates: tables of valid and invalid inputs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verify.idnumber import IdCheck, card_valid_on, check_char, validate_id_number

# Synthetic numbers only: address code 99xxxx belongs to no region. "11010519491231002X" is
# the worked example printed in GB 11643-1999 itself.
VALID = [
    "990101199001010019",
    "99010119900101006X",
    "99010119900101006x",
    "11010519491231002X",
    "990101200002290011",
    " 990101199001010019 ",
]

INVALID = [
    ("", "bad_length"),
    ("99010119900101001", "bad_length"),
    ("9901011990010100190", "bad_length"),
    ("99010119900101001A", "bad_char"),
    ("9901011990010X0019", "bad_char"),
    ("99010119900101００19", "bad_char"),
    ("990101199001010011", "bad_check_digit"),
    ("990101199001010060", "bad_check_digit"),
    ("090101199001010019", "bad_address_code"),
    ("990101199002300019", "bad_birth_date"),
    ("990101190002290019", "bad_birth_date"),
    ("990101177001010019", "bad_birth_date"),
    ("990101199013010019", "bad_birth_date"),
]


@pytest.mark.parametrize("number", VALID)
def test_valid_numbers_pass(number: str) -> None:
    assert validate_id_number(number) == IdCheck(True)


@pytest.mark.parametrize(("number", "reason"), INVALID)
def test_invalid_numbers_give_a_reason(number: str, reason: str) -> None:
    assert validate_id_number(number) == IdCheck(False, reason)


def test_birth_after_today_is_rejected() -> None:
    body = "99010120300101001"
    number = body + check_char(body)
    assert validate_id_number(number).ok
    assert validate_id_number(number, today="20261125").reason == "bad_birth_date"


REASONS = {"bad_length", "bad_char", "bad_address_code", "bad_birth_date", "bad_check_digit"}


@given(st.text(max_size=24) | st.text(alphabet="0123456789Xx", min_size=18, max_size=18))
def test_any_text_gives_ok_or_a_stable_reason(text: str) -> None:
    check = validate_id_number(text)
    assert check == IdCheck(True) or (not check.ok and check.reason in REASONS)


@pytest.mark.parametrize(
    ("valid_from", "valid_to", "day", "reason"),
    [
        ("20200101", "20300101", "20261125", None),
        ("20200101", "20300101", "20200101", None),
        ("20200101", "20300101", "20300101", None),
        ("20200101", "20300101", "20300102", "card_expired"),
        ("20200101", "20300101", "20191231", "card_not_yet_valid"),
        ("20060101", "长期", "20991231", None),
        ("20060101", " 长期 ", "20261125", None),
        ("20260101", "长期", "20251231", "card_not_yet_valid"),
        ("20200101", "20250231", "20261125", "bad_valid_dates"),
        ("2020011", "20300101", "20261125", "bad_valid_dates"),
        ("20300101", "20200101", "20261125", "bad_valid_dates"),
        ("", "", "20261125", "bad_valid_dates"),
        ("20200101", "永久", "20261125", "bad_valid_dates"),
        ("20200101", "20300101", "not-a-day", "bad_valid_dates"),
    ],
)
def test_card_validity(valid_from: str, valid_to: str, day: str, reason: str | None) -> None:
    assert card_valid_on(valid_from, valid_to, day) == reason
