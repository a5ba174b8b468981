"""Where evidence goes and how SQLite is set up for several writers."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from dr_orchestrator.evidence import migrate
from dr_orchestrator.evidence.database import DEFAULT_URL, database_url, make_engine


def test_url_explicit_then_environment_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DR_DATABASE_URL", raising=False)
    assert database_url() == DEFAULT_URL == "sqlite:///dr-evidence.db"
    monkeypatch.setenv("DR_DATABASE_URL", "sqlite:////var/lib/dr/evidence.db")
    assert database_url() == "sqlite:////var/lib/dr/evidence.db"
    assert database_url("sqlite:///other.db") == "sqlite:///other.db"


@pytest.mark.parametrize(
    "given", ["postgresql://dr@db.bank.example/evidence", "postgres://dr@db.bank.example/evidence"]
)
def test_plain_postgresql_urls_use_psycopg(given: str) -> None:
    assert database_url(given) == "postgresql+psycopg://dr@db.bank.example/evidence"


def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        with pytest.raises(IntegrityError, match="FOREIGN KEY"), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO markers (run_id, step_id, marker, at, recorded_at) "
                    "VALUES ('no-such-run', 's', 'm', '2026-11-28T10:00:00.000000+00:00', "
                    "'2026-11-28T10:00:00.000000+00:00')"
                )
            )
    finally:
        engine.dispose()
