"""What every ``postgres.*`` action shares: where a database lives (from the inventory), the step's
database, site and other site (``DatabaseAction``), and short-lived connections (psycopg 3, autocommit).

The inventory describes databases under ``dr.vars.databases``, either one database directly::

    databases: {dbname: drlab, user: drlab, port: 5432, hosts: {primary: 10.0.1.5, backup: 10.0.2.5},
                data_dirs: {...}, pg_bin: /usr/lib/postgresql/15/bin, os_user: postgres}

or several, each under its name (``databases: {main: {...}, ledger: {...}}``). Passwords are never
in the inventory: ``password`` is a reference (``env:NAME`` or ``file:/path``; ``password_env: NAME``
is the older spelling of ``password: env:NAME``), resolved when connecting and masked in evidence
and logs; without one, libpq's own ways apply (``~/.pgpass``, ``PGPASSFILE``).

The watch reads the databases through this module too (``resolve``, ``connect``), not a copy of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, TypeVar

import psycopg
from psycopg import conninfo as pg_conninfo
from pydantic import Field

from dr_orchestrator import secrets
from dr_orchestrator.actions.base import Action, ActionContext, ActionError, Params
from dr_orchestrator.actions.replicated import Servers, site_field
from dr_orchestrator.model.inventory import Inventory

# libpq waits at least 2 s, whatever connect_timeout says; more than 5 s is never worth it here.
CONNECT_TIMEOUT_S = (2, 5)
HEARTBEAT_TABLE = "dr_heartbeat"


class DatabaseUnreachable(ActionError):
    """The database server did not accept a connection."""


@dataclass(frozen=True)
class Database(Servers):
    kind: ClassVar[str] = "database"
    name: str
    dbname: str
    user: str
    port: int
    hosts: dict[str, str]  # site -> address
    ports: dict[str, int] = field(default_factory=dict)  # site -> port, where it differs
    password_env: str | None = None
    password: str | None = None  # a reference: env:NAME or file:/path
    data_dirs: dict[str, str] = field(default_factory=dict)
    log_files: dict[str, str] = field(default_factory=dict)
    pg_bin: str = "/usr/lib/postgresql/15/bin"
    os_user: str | None = None

    def port_of(self, site: str) -> int:
        return self.ports.get(site, self.port)

    def where(self, site: str) -> str:
        return f"database {self.name!r} at site {site} ({self.hosts[site]}:{self.port_of(site)})"

    def conninfo(self, site: str, connect_timeout: int = 2, dbname: str | None = None) -> str:
        self.check_site(site)
        extra: dict[str, Any] = {}
        reference = self.password or (f"env:{self.password_env}" if self.password_env else None)
        if reference:
            try:
                extra["password"] = secrets.resolve(reference)
            except secrets.SecretError as exc:
                raise ActionError(f"database {self.name!r}: {exc}") from None
        return pg_conninfo.make_conninfo(
            host=self.hosts[site],
            port=self.port_of(site),
            dbname=dbname or self.dbname,
            user=self.user,
            connect_timeout=connect_timeout,
            application_name="dr-orchestrator",
            **extra,
        )

    def remote_conninfo(self, site: str, application_name: str, dbname: str | None = None) -> str:
        """How a program on a database host reaches the server at ``site`` (primary_conninfo, pg_rewind).

        Never with a password: the host has its own (~/.pgpass), and command lines are visible."""
        fields: dict[str, Any] = {"host": self.hosts[site], "port": self.port_of(site), "user": self.user}
        if dbname:
            fields["dbname"] = dbname
        return pg_conninfo.make_conninfo(**fields, application_name=application_name)


def resolve(inventory: Inventory, name: str | None) -> Database:
    """The database ``name`` (or the only one) described in ``dr.vars.databases``."""
    described = inventory.vars.get("databases")
    if not isinstance(described, dict) or not described:
        raise ActionError(f"inventory {inventory.name!r} describes no databases (dr.vars.databases)")
    if "hosts" in described:  # one database, described directly
        own_name = str(described.get("name") or described.get("dbname") or "main")
        if name is not None and name not in (own_name, described.get("dbname")):
            raise ActionError(f"inventory {inventory.name!r} describes one database, {own_name!r}, not {name!r}")
        return _database(own_name, described)
    if name is None:
        if len(described) != 1:
            raise ActionError(f"say which database: the inventory describes {', '.join(sorted(described))}")
        name = next(iter(described))
    if name not in described or not isinstance(described[name], dict):
        raise ActionError(f"database {name!r} is not in dr.vars.databases; known: {', '.join(sorted(described))}")
    return _database(name, described[name])


def _database(name: str, spec: dict[str, Any]) -> Database:
    try:
        return Database(
            name=name,
            dbname=str(spec["dbname"]),
            user=str(spec["user"]),
            port=int(spec.get("port", 5432)),
            hosts={str(k): str(v) for k, v in dict(spec["hosts"]).items()},
            ports={str(k): int(v) for k, v in dict(spec.get("ports") or {}).items()},
            password_env=spec.get("password_env"),
            password=_password_reference(name, spec.get("password")),
            data_dirs={str(k): str(v) for k, v in dict(spec.get("data_dirs") or {}).items()},
            log_files={str(k): str(v) for k, v in dict(spec.get("log_files") or {}).items()},
            pg_bin=str(spec.get("pg_bin") or Database.pg_bin),
            os_user=spec.get("os_user"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ActionError(f"database {name!r} in dr.vars.databases is incomplete or malformed: {exc}") from None


def _password_reference(name: str, value: Any) -> str | None:
    if value is not None and not secrets.is_reference(value):
        raise ActionError(f"database {name!r}: password must be a reference (env:NAME or file:/path), not the password")
    return value


@contextmanager
def connect(db: Database, site: str, ctx: ActionContext, dbname: str | None = None) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the server at ``site``; statements may not outlast the step."""
    ctx.check_cancelled()
    low, high = CONNECT_TIMEOUT_S
    timeout = int(max(low, min(high, ctx.remaining())))
    statement_ms = max(1, int(ctx.remaining() * 1000))
    try:
        connection = psycopg.connect(
            db.conninfo(site, timeout, dbname), autocommit=True, options=f"-c statement_timeout={statement_ms}"
        )
    except psycopg.OperationalError as exc:
        # "connection failed: connection to server at ... failed: Connection refused" -> "Connection refused"
        reason = (str(exc).strip().splitlines() or ["no answer"])[0].rpartition("failed: ")[2]
        raise DatabaseUnreachable(f"{db.where(site)} is unreachable: {reason}") from None
    try:
        yield connection
    finally:
        connection.close()


def one(connection: psycopg.Connection, query: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    row = connection.execute(query.encode(), params).fetchone()
    assert row is not None  # every query given here returns exactly one row
    return tuple(row)


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def role_of(connection: psycopg.Connection) -> dict[str, Any]:
    """A server's role and WAL position: standby (in recovery) or primary, and whether it takes writes."""
    in_recovery, read_only = one(
        connection, "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only') = 'on'"
    )
    if in_recovery:
        receive, replay, replayed_at, receiver, now = one(
            connection,
            "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp(),"
            " (SELECT status FROM pg_stat_wal_receiver), clock_timestamp()",
        )
        return {
            "role": "standby",
            "writable": False,
            "receive_lsn": receive,
            "replay_lsn": replay,
            "last_replayed_commit_at": iso(replayed_at),
            "wal_receiver": receiver or "stopped",
            "observed_at": iso(now),
        }
    current, now = one(connection, "SELECT pg_current_wal_lsn()::text, clock_timestamp()")
    return {"role": "primary", "writable": not read_only, "current_lsn": current, "observed_at": iso(now)}


def probe_role(db: Database, site: str, ctx: ActionContext) -> dict[str, Any]:
    """``role_of`` the server at ``site``, or ``{"role": "unreachable", "error": ...}``."""
    try:
        with connect(db, site, ctx) as connection:
            return role_of(connection)
    except DatabaseUnreachable as exc:
        return {"role": "unreachable", "writable": False, "error": str(exc)}
    except psycopg.Error as exc:
        return {"role": "unknown", "writable": False, "error": f"{db.where(site)}: {exc}".strip()}


def latest_heartbeat(connection: psycopg.Connection, sites: list[str],
                     not_after: datetime | None = None) -> dict[str, Any] | None:
    """The newest heartbeat row written at one of ``sites`` that this server holds, written at or
    before ``not_after`` when given (None: no such heartbeat)."""
    until = "" if not_after is None else " AND at <= %s"
    try:
        row = connection.execute(
            f"SELECT id, site, at, primary_lsn::text, sync_state, clock_timestamp() FROM {HEARTBEAT_TABLE}"
            f" WHERE site = ANY(%s){until} ORDER BY id DESC LIMIT 1".encode(),
            (sites,) if not_after is None else (sites, not_after),
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    if row is None:
        return None
    beat_id, site, at, lsn, sync_state, now = row
    return {
        "id": beat_id,
        "site": site,
        "at": at.isoformat(),
        "primary_lsn": lsn,
        "sync_state": sync_state,
        "age_s": round((now - at).total_seconds(), 6),
    }


def lsn_value(lsn: str) -> int:
    """'16/B374D848' as a number, for comparing WAL positions."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


# ---------------------------------------------------------------- the actions' base


class DatabaseParams(Params):
    database: str | None = Field(
        default=None,
        description="Database in dr.vars.databases; may be left out when the inventory describes one.",
        json_schema_extra={"refers_to": "database"},
    )


class SiteParams(DatabaseParams):
    """A step acting at one site of the database (each action says which in ``site``'s description)."""

    site: str = site_field("Site of the server the step acts on.")


DP = TypeVar("DP", bound=DatabaseParams)


class DatabaseAction(Action[DP]):
    """Base of the ``postgres.*`` actions: the one place that finds the step's database in the
    inventory, checks that it has a server at the step's site, and picks the other site it works with."""

    @staticmethod
    def database(params: DatabaseParams, ctx: ActionContext, site: str | None = None) -> Database:
        """The database ``params`` names (or the inventory's only one); with ``site``, checked to have a
        server there."""
        db = resolve(ctx.inventory, params.database)
        if site is not None:
            db.check_site(site)
        return db

    @classmethod
    def database_and_other_site(cls, params: SiteParams, ctx: ActionContext, given: str | None,
                                what: str) -> tuple[Database, str]:
        """The database at ``params.site`` and the other site the step works with: ``given`` (checked),
        else the database's one other site; ``what`` names that site in errors ("old primary")."""
        db = cls.database(params, ctx, params.site)
        return db, db.other_site(params.site, given, what)
