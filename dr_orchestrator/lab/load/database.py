"""Ask a writing service's own databases which site takes writes and which acknowledged keys they hold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from dr_orchestrator.lab.config import SITES, LabConfig


@dataclass(frozen=True)
class SiteDatabase:
    site: str
    conninfo: str
    reachable: bool
    read_write: bool
    error: str | None = None


def site_databases(config: LabConfig, service: str) -> list[SiteDatabase]:
    """`service`'s database at each site."""
    # The lab's DSNs carry a short connect_timeout: a killed site refuses at once, a hung one must not hang us.
    return [_probe(site, config.dsn(site, service)) for site in SITES]


def _probe(site: str, conninfo: str) -> SiteDatabase:
    try:
        with psycopg.connect(conninfo) as connection:
            # A primary set read-only (fenced) takes no writes: it is not where writes go now.
            row = connection.execute(
                "SELECT NOT pg_is_in_recovery() AND current_setting('default_transaction_read_only') = 'off'"
            ).fetchone()
    except psycopg.Error as error:
        return SiteDatabase(site, conninfo, reachable=False, read_write=False, error=str(error).strip())
    return SiteDatabase(site, conninfo, reachable=True, read_write=row is not None and bool(row[0]))


def present_keys(database: SiteDatabase, table: str, column: str, keys: Sequence[str]) -> set[str]:
    """The subset of ``keys`` that has a row in ``table`` at that site."""
    if not keys:
        return set()
    query = sql.SQL("SELECT {column} FROM {table} WHERE {column} = ANY(%s)").format(
        column=sql.Identifier(column), table=sql.Identifier(table)
    )
    with psycopg.connect(database.conninfo) as connection:
        return {row[0] for row in connection.execute(query, (list(keys),))}
