"""GB 11643-1999 citizen ID numbers and ID-card validity dates, as pure checks.

Every result is a short stable reason code; no message ever contains the number itself.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

ID_LENGTH = 18
WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
CHECK_CHARS = "10X98765432"
NO_EXPIRY = "长期"
# Nobody alive holds a card with an earlier birth year; earlier means a misread field.
EARLIEST_BIRTH_YEAR = 1880

BAD_LENGTH = "bad_length"
BAD_CHAR = "bad_char"
BAD_ADDRESS_CODE = "bad_address_code"
BAD_BIRTH_DATE = "bad_birth_date"
BAD_CHECK_DIGIT = "bad_check_digit"
BAD_VALID_DATES = "bad_valid_dates"
CARD_NOT_YET_VALID = "card_not_yet_valid"
CARD_EXPIRED = "card_expired"


@dataclass(frozen=True)
class IdCheck:
    """The outcome of checking one ID number: ok, or the reason it is not."""

    ok: bool
    reason: str | None = None


def check_char(first17: str) -> str:
    """The GB 11643 check character for the first 17 digits."""
    total = sum(int(digit) * weight for digit, weight in zip(first17, WEIGHTS, strict=True))
    return CHECK_CHARS[total % 11]


def parse_day(text: str) -> datetime.date | None:
    """A YYYYMMDD calendar date, or None if the text is not one."""
    if len(text) != 8 or not text.isascii() or not text.isdigit():
        return None
    try:
        return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def validate_id_number(text: str, today: str | None = None) -> IdCheck:
    """Check length, characters, address code, birth date (not after ``today``) and check digit."""
    number = text.strip().upper()
    if len(number) != ID_LENGTH:
        return IdCheck(False, BAD_LENGTH)
    body, last = number[:17], number[17]
    # isdigit() alone accepts fullwidth and other Unicode digits; the card holds ASCII only.
    if not (body.isascii() and body.isdigit()) or last not in "0123456789X":
        return IdCheck(False, BAD_CHAR)
    if body[0] == "0":
        return IdCheck(False, BAD_ADDRESS_CODE)
    birth = parse_day(body[6:14])
    if birth is None or birth.year < EARLIEST_BIRTH_YEAR:
        return IdCheck(False, BAD_BIRTH_DATE)
    if today is not None:
        now = parse_day(today)
        if now is not None and birth > now:
            return IdCheck(False, BAD_BIRTH_DATE)
    if check_char(body) != last:
        return IdCheck(False, BAD_CHECK_DIGIT)
    return IdCheck(True)


def card_valid_on(valid_from: str, valid_to: str, day: str) -> str | None:
    """None if the card is valid on ``day`` (YYYYMMDD, inclusive), else a reason code."""
    start = parse_day(valid_from.strip())
    end_text = valid_to.strip()
    end = None if end_text == NO_EXPIRY else parse_day(end_text)
    today = parse_day(day)
    if start is None or today is None or (end is None and end_text != NO_EXPIRY):
        return BAD_VALID_DATES
    if end is not None and end < start:
        return BAD_VALID_DATES
    if today < start:
        return CARD_NOT_YET_VALID
    if end is not None and today > end:
        return CARD_EXPIRED
    return None
