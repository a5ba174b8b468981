"""Column types of the evidence tables (apart from the database module: the models need them, and the
database module's sessions need the chain, which needs the models)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, String
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC with microseconds on every backend.

    PostgreSQL: ``timestamp with time zone``. SQLite has no such type: fixed-width ISO-8601 text
    (``2026-11-28T03:04:37.123456+00:00``), which sorts in time order. Naive datetimes are refused:
    a timestamp without a zone is not evidence."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(32))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} refused: evidence timestamps carry a time zone")
        utc = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return utc.isoformat(timespec="microseconds")
        return utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else value
        if parsed.tzinfo is None:  # stored by something other than this type
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
