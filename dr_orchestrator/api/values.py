"""The values a request may carry in its path, query and body: each type checks its value with a
sentence naming what is wrong, and states the same rule in the OpenAPI spec (a pattern or a
format), so a client, the spec and the server agree on what is refused with 422.

Every text refuses a NUL byte: PostgreSQL cannot store one, and no name, id or reason holds one."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, WithJsonSchema

NO_NUL = r"^[^\x00]*$"
SEGMENT = r"^[^/\x00]+$"  # one path segment: what a route's {parameter} can hold
# Exactly the characters str.strip() removes (str.isspace), spelt out so that ECMA-262 (the spec's
# regex dialect) and Python agree on what a blank text is.
_SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_BLANK = rf"^[^\x00]*[^\x00{_SPACE}][^\x00]*$"
# A relative path without a ``..`` segment: one segment is anything but ``..`` (no ``/``, no NUL).
_PATH_PART = r"(?:\.{0,2}[^/\x00.][^/\x00]*|\.|\.{3,}[^/\x00]*)"
RELATIVE_PATH = rf"^{_PATH_PART}(?:/{_PATH_PART})*$"
FILE_NAME = r"^[^/\\.\x00][^/\\\x00]*$"
QUARTER = r"^(19|2[0-9])[0-9]{2}Q[1-4]$"  # 1900Q1 to 2999Q4
LIFETIME = r"^([1-9][0-9]{0,5}[smhd]|never)$"
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# RFC 3339 date-time (the spec's `format: date-time`): the zone is required.
_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                        r"([Zz]|[+-][0-9]{2}:[0-9]{2})")
# On the calendar's first and last day a zone other than UTC can fall outside it (year 1 at +05:00 is
# before year 1 in UTC): those two days are taken in UTC only, and the spec says so.
_EDGE_DAY_OFFSET = re.compile(r"(0001-01-01|9999-12-31)[Tt][0-9:.]+[+-](?!00:00$)")
UTC_ON_EDGE_DAYS = r"^(?!(0001-01-01|9999-12-31)[Tt][0-9:.]+[+-](?!00:00$))"


HOLDS_NUL = "contains a NUL byte (\\x00), which no name, id, text or parameter here may hold"


def _text(value: str) -> str:
    if "\x00" in value:
        raise ValueError(HOLDS_NUL)
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (it holds a lone surrogate)") from None
    return value


def _matching(pattern: str, message: str) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(_text(value)):
            raise ValueError(f"{value!r} {message}")
        return value

    return AfterValidator(check)


def _string(pattern: str, **extra: Any) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "pattern": pattern, **extra})


Text = Annotated[str, AfterValidator(_text), _string(NO_NUL)]
Segment = Annotated[str, _matching(SEGMENT, "is not one path segment"), _string(SEGMENT)]
NonBlank = Annotated[str, _matching(NOT_BLANK, "is blank: write something"), _string(NOT_BLANK)]
RelativePath = Annotated[str, _matching(RELATIVE_PATH, "must be a relative path without '..' segments"),
                         _string(RELATIVE_PATH)]
FileName = Annotated[str, _matching(FILE_NAME, "is not a file name (no '/', '\\' nor leading '.')"),
                     _string(FILE_NAME)]
Lifetime = Annotated[str, _matching(LIFETIME, "is not a lifetime like 90d, 12h, 30m or 3600s, or never"),
                     _string(LIFETIME)]
Quarter = Annotated[str, _matching(QUARTER, "is not a quarter like 2026Q3 (years 1900 to 2999)"),
                    _string(QUARTER, examples=["2026Q3"])]


def _moment(value: object, dates: bool) -> datetime:
    """``value`` as an aware UTC datetime; ``dates``: a date alone means its midnight UTC."""
    expected = f"{'a date (2026-10-01) or ' if dates else ''}a date-time with a zone (2026-10-01T08:00:00Z)"
    if not isinstance(value, str):
        raise ValueError(f"must be {expected}, as text")
    if dates and _DATE.fullmatch(value):
        parse = lambda: datetime.combine(date.fromisoformat(value), time(), UTC)  # noqa: E731
    elif _DATE_TIME.fullmatch(value):
        if _EDGE_DAY_OFFSET.match(value):
            raise ValueError(f"{value!r}: a moment on 0001-01-01 or 9999-12-31 is taken in UTC only (Z)")
        parse = lambda: datetime.fromisoformat(value.upper()).astimezone(UTC)  # noqa: E731
    else:
        raise ValueError(f"{_text(value)!r} is not {expected}")
    try:
        return parse()
    except (ValueError, OverflowError) as exc:  # 2026-02-30; year 1 at +05:00 is before year 1 in UTC
        raise ValueError(f"{value!r} is not a valid moment: {exc}") from None


# Query times: a date (its midnight UTC) or a date-time with its zone; never a bare number.
Moment = Annotated[datetime, BeforeValidator(lambda value: _moment(value, dates=True)),
                   WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time", "pattern": UTC_ON_EDGE_DAYS},
                                             {"type": "string", "format": "date"}]})]
# A moment in a body (incident_at): a date-time with its zone.
Instant = Annotated[datetime, BeforeValidator(lambda value: _moment(value, dates=False)),
                    WithJsonSchema({"type": "string", "format": "date-time", "pattern": UTC_ON_EDGE_DAYS})]


def where_nul(value: Any, where: str) -> str | None:
    """Where in a JSON value (keys included) a text holds a NUL byte, or None."""
    if isinstance(value, str):
        return where if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = f"{where} key {key!r}" if "\x00" in key else where_nul(item, f"{where}.{key}")
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = where_nul(item, f"{where}[{index}]")
            if found:
                return found
    return None
