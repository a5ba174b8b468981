"""`dr db ...`: the evidence database's schema (Alembic migrations)."""

from __future__ import annotations

import click

from dr_orchestrator.cli.common import UserError, database_of


@click.group()
def db() -> None:
    """The evidence database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Create or migrate the evidence database."""
    from dr_orchestrator.evidence import migrate
    from dr_orchestrator.evidence.database import database_url

    url = database_url(database_of(ctx))
    try:
        migrate.upgrade(url, revision)
    except migrate.MigrationError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"evidence database {migrate.display_url(url)} is at revision {migrate.current_revision(url)}")


@db.command("downgrade")
@click.argument("revision")
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str) -> None:
    """Migrate the evidence database down to REVISION (`base` removes every table)."""
    from dr_orchestrator.evidence import migrate
    from dr_orchestrator.evidence.database import database_url

    url = database_url(database_of(ctx))
    try:
        migrate.downgrade(url, revision)
    except migrate.MigrationError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"evidence database {migrate.display_url(url)} is at revision {migrate.current_revision(url)}")
